"""What the AWQ search needs to know of an architecture, as data."""

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
    model_types: tuple
    groups: callable  # (layer, config) -> list[ScaleGroup]
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (offset + weight)
    no_clip: tuple = ("q_proj", "k_proj", "qkv_proj")  # attention-score error is not seen by the clip loss
    layers_path: str = "model.layers"

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
