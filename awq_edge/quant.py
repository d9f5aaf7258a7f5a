"""Group-wise integer quantisation primitives: pure functions on tensors.

A weight W [out, in] is split along `in` into groups of `group_size`
columns. When `in` is not a multiple of the group size, the last group is
ragged; it is padded with copies of its own last column so that its min/max
(and so its scale and zero point) depend on real values only, the way a
MatMulNBits block of ceil(K / block_size) blocks treats it.

`QuantLinear` and `FloatLinear` are the one description of a linear that every
stage passes on: the quantiser produces them, the checkpoint reader returns
them, the exporter and the runtimes consume them.
"""

from dataclasses import dataclass

import torch

from awq_edge.errors import AwqEdgeError

# The group sizes the checkpoint, MatMulNBits and the CUDA kernels all take, largest first (the automatic pick).
GROUP_SIZES = (128, 64, 32)


def check_group_size(group_size, flag: str = "--group-size",
                     fix: str = "use --group-size 128, 64 or 32, or leave it out to pick the largest that fits") -> int:
    """The one group-size rule of the API, the CLI and the exporter: a power of two of at least 16 (MatMulNBits'
    block sizes; the CUDA kernels take 32, 64 and 128 and say so at load)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 \
            or group_size & (group_size - 1):
        raise AwqEdgeError(f"{flag} {group_size!r} is not a power of two of at least 16 (MatMulNBits' block sizes)",
                           fix)
    return group_size


@dataclass(frozen=True)
class QConfig:
    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True

    def __post_init__(self):
        if self.w_bit not in (2, 3, 4, 8):
            raise ValueError(f"w_bit must be 2, 3, 4 or 8, not {self.w_bit}")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, not {self.group_size}")


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size], replicating the last column into any padding."""
    out_f, in_f = w.shape
    pad = n_groups(in_f, group_size) * group_size - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, group_size)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def group_qparams(wg: torch.Tensor, cfg: QConfig):
    """Scales and integer zero points [out, n_groups] for grouped weights [out, n_groups, g].

    Scales are rounded to fp16, as checkpoints store them, so the search sees what is deployed.
    """
    if cfg.zero_point:
        max_int = 2**cfg.w_bit - 1
        w_max = wg.amax(dim=-1)
        w_min = wg.amin(dim=-1)
        scales = ((w_max - w_min).clamp(min=1e-5) / max_int).half().float()
        zeros = (-torch.round(w_min / scales)).clamp(0, max_int)
    else:
        max_int = 2 ** (cfg.w_bit - 1) - 1
        scales = (wg.abs().amax(dim=-1).clamp(min=1e-5) / max_int).half().float()
        zeros = torch.full_like(scales, 2 ** (cfg.w_bit - 1))
    return scales, zeros


def quantize_groups(wg: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, w_bit: int) -> torch.Tensor:
    """Unsigned integers in [0, 2^bits) with w ~= (q - zero) * scale."""
    q = torch.round(wg / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp(0, 2**w_bit - 1)


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return (q - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)


def quantize(w: torch.Tensor, cfg: QConfig):
    """W [out, in] -> (q uint8 [out, in], scales [out, n_groups], zeros uint8 [out, n_groups]).

    The symmetric scheme is stored unsigned with a constant zero point of
    2^(bits-1), which is what AutoAWQ kernels and MatMulNBits' default expect.
    """
    wg = to_groups(w.float(), cfg.group_size)
    scales, zeros = group_qparams(wg, cfg)
    q = quantize_groups(wg, scales, zeros, cfg.w_bit)
    return from_groups(q, w.shape[1]).to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `quantize`: float32 W [out, in]."""
    in_f = q.shape[1]
    qg = to_groups(q.float(), group_size)
    return from_groups(dequantize_groups(qg, scales.float(), zeros.float()), in_f)


def fake_quantize(w: torch.Tensor, cfg: QConfig) -> torch.Tensor:
    """Quantise then dequantise, in w's dtype and shape."""
    wg = to_groups(w.float(), cfg.group_size)
    scales, zeros = group_qparams(wg, cfg)
    q = quantize_groups(wg, scales, zeros, cfg.w_bit)
    return from_groups(dequantize_groups(q, scales, zeros), w.shape[1]).to(w.dtype)


@dataclass
class QuantLinear:
    """One quantised linear W [out, in] = (q - zeros) * scales per group along `in`; bits 4 (or 8 for a
    sensitive linear kept wider), bias where the model has one."""

    q: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 (fp16-exact) [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]
    group_size: int
    bits: int = 4
    bias: torch.Tensor | None = None

    @property
    def shape(self):
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.group_size)

    def to(self, device) -> "QuantLinear":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantLinear(move(self.q), move(self.scales), move(self.zeros), self.group_size, self.bits,
                           move(self.bias))


@dataclass
class FloatLinear:
    """A linear kept in floating point (8-bit fallbacks are stored dequantised)."""

    weight: torch.Tensor  # float32 [out, in]
    bias: torch.Tensor | None = None

    @property
    def shape(self):
        return tuple(self.weight.shape)


def as_float(lin) -> FloatLinear:
    """A linear as float weights (a QuantLinear dequantised)."""
    return lin if isinstance(lin, FloatLinear) else FloatLinear(lin.dequantize(), lin.bias)


def fuse_rows(linears):
    """One linear computing several at once (outputs concatenated), or None when they cannot share a node."""
    if len(linears) == 1:
        return linears[0]
    if all(isinstance(x, QuantLinear) for x in linears) and len({(x.group_size, x.bits) for x in linears}) == 1:
        merged = QuantLinear(
            torch.cat([x.q for x in linears]), torch.cat([x.scales for x in linears]),
            torch.cat([x.zeros for x in linears]), linears[0].group_size, linears[0].bits,
        )
    elif all(isinstance(x, FloatLinear) for x in linears):
        merged = FloatLinear(torch.cat([x.weight for x in linears]))
    else:
        return None
    biases = [x.bias for x in linears]
    if any(b is not None for b in biases):
        merged.bias = torch.cat([b if b is not None else torch.zeros(x.shape[0]) for b, x in zip(biases, linears)])
    return merged
