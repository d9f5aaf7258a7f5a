"""Phi-3: fused qkv_proj (v rows last) and gate_up_proj (up rows last)."""

from awq_edge.arch.base import Adapter, ScaleGroup


def phi3_groups(layer, config):
    groups = [ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn")]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads == kv_heads:
        groups.append(ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"))
    groups.append(ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


ADAPTER = Adapter(model_types=("phi3",), groups=phi3_groups, qkv=("self_attn.qkv_proj",),
                  gate_up=("mlp.gate_up_proj",))
