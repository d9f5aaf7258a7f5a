"""Llama-style decoders: Llama (SmolLM2), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norms)."""

from awq_edge.arch.base import Adapter, ScaleGroup


def llama_groups(layer, config):
    attn = layer.self_attn
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    # v's output feeds o only channel for channel without GQA; with GQA the widths differ.
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


ADAPTER = Adapter(model_types=("llama", "mistral", "qwen2"), groups=llama_groups)
QWEN3 = Adapter(model_types=("qwen3",), groups=llama_groups, qk_norms=("self_attn.q_norm", "self_attn.k_norm"))
