"""Gemma 1/2/3: RMSNorm scales by (1 + weight), embeddings by sqrt(hidden); Gemma 2/3 normalise both sides of
each block (the MLP reads pre_feedforward_layernorm); Gemma 3 adds q/k norms."""

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


ADAPTER = Adapter(model_types=("gemma",), groups=gemma_groups, norm_offset=1.0, embed_scaled=True)
_SANDWICH = dict(groups=gemma_groups, norm_offset=1.0, embed_scaled=True, mlp_norm="pre_feedforward_layernorm",
                 attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                 act_key="hidden_activation")
GEMMA2 = Adapter(model_types=("gemma2",), **_SANDWICH)
GEMMA3 = Adapter(model_types=("gemma3_text",), qk_norms=("self_attn.q_norm", "self_attn.k_norm"), **_SANDWICH)
