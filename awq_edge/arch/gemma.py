"""Gemma 1/2/3: RMSNorm scales by (1 + weight); Gemma 2/3 feed the MLP from pre_feedforward_layernorm."""

from awq_edge.arch.base import Adapter, ScaleGroup


def gemma_groups(layer, config):
    attn = layer.self_attn
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    mlp_norm = "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"
    groups.append(ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


ADAPTER = Adapter(model_types=("gemma", "gemma2", "gemma3_text"), groups=gemma_groups, norm_offset=1.0)
