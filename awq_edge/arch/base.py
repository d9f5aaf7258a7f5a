"""A model family as data: what the AWQ search folds, and the decoder block every later stage builds."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one activation, and where a per-channel scale of it can be folded.

    `prev` is the op whose output is that activation (a norm, or a linear whose
    last output rows produce it); `inspect` is the module whose output measures
    the error of a candidate scale (the attention block for q/k/v, the MLP for
    gate/up, the linear itself otherwise). Names are relative to a decoder layer.
    """

    prev: str
    linears: tuple
    inspect: str


@dataclass(frozen=True)
class Adapter:
    """One family. Tensor names are relative to a decoder layer; a single name in `qkv` or `gate_up` is a linear
    whose output rows are the parts in that order. Everything that varies with the config (dimensions, windows,
    RoPE, soft-capping, query scaling) is read by `awq_edge.arch.spec.describe`."""

    model_types: tuple
    groups: callable  # (layer, config) -> list[ScaleGroup]
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (offset + weight)
    no_clip: tuple = ("q_proj", "k_proj", "qkv_proj")  # attention-score error is not seen by the clip loss
    layers_path: str = "model.layers"
    qkv: tuple = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    gate_up: tuple = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_out_norm: str = ""  # Gemma 2/3 normalise each block's output before the residual add
    mlp_out_norm: str = ""
    qk_norms: tuple = ()  # (q norm, k norm) over each head, before RoPE (Qwen3, Gemma 3)
    embed_scaled: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    act_key: str = "hidden_act"  # the config key transformers reads the MLP's activation from
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"

    def layers(self, model) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)


def fold_scale(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor, norm_offset: float) -> None:
    """Multiply the group's linears' input channels by `scales` and divide them out of `prev`.

    The float function of the layer is unchanged: prev(x) / s feeds W * s.
    """
    prev = layer.get_submodule(group.prev)
    s = scales.to(torch.float32)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            rows = prev.weight[-s.numel():]
            rows.copy_((rows.float() / s.view(-1, 1)).to(rows.dtype))
            if prev.bias is not None:
                b = prev.bias[-s.numel():]
                b.copy_((b.float() / s).to(b.dtype))
        else:
            w = prev.weight
            w.copy_(((norm_offset + w.float()) / s - norm_offset).to(w.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
        for name in group.linears:
            lin = layer.get_submodule(name)
            lin.weight.copy_((lin.weight.float() * s.view(1, -1)).to(lin.weight.dtype))
