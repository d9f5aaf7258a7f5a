"""Bit packing of integer weights: AutoAWQ "GEMM" and onnxruntime MatMulNBits layouts.

Both take the output of `quant.quantize`: q uint8 [out, in], scales float
[out, n_groups], zeros uint8 [out, n_groups].
"""

import torch

# AutoAWQ packs eight 4-bit values per int32; nibble i holds column AWQ_ORDER[i]
# of each group of eight (awq/modules/linear/gemm.py, from_linear).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column c of a group of eight sits in nibble AWQ_REVERSE[c].
AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_awq_int32(x: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols] of 4-bit values -> int32 [rows, cols / 8] in AutoAWQ order."""
    rows, cols = x.shape
    if cols % 8:
        raise ValueError(f"AutoAWQ packing needs a multiple of 8 columns, got {cols}")
    x = x.to(torch.int32).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    # Summing disjoint nibbles is an OR; int32 wraps, which is the bit pattern we want.
    return (x << _SHIFTS.to(x.device)).sum(dim=-1, dtype=torch.int32)


def unpack_awq_int32(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_awq_int32`: int32 [rows, cols / 8] -> uint8 [rows, cols]."""
    nibbles = ((p.unsqueeze(-1) >> _SHIFTS.to(p.device)) & 0xF).to(torch.uint8)
    return nibbles[..., list(AWQ_REVERSE)].reshape(p.shape[0], -1)


def to_awq_gemm(q, scales, zeros, group_size: int) -> dict:
    """AutoAWQ GEMM tensors: qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]."""
    out_f, in_f = q.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group size {group_size}")
    return {
        "qweight": pack_awq_int32(q.t().contiguous()),
        "qzeros": pack_awq_int32(zeros.t().contiguous()),
        "scales": scales.t().contiguous().half(),
    }


def from_awq_gemm(qweight, qzeros, scales):
    """AutoAWQ GEMM tensors -> (q uint8 [out, in], scales fp32 [out, n_groups], zeros uint8 [out, n_groups])."""
    return (
        unpack_awq_int32(qweight).t().contiguous(),
        scales.float().t().contiguous(),
        unpack_awq_int32(qzeros).t().contiguous(),
    )


def to_matmul_nbits(q, scales, zeros, block_size: int, bits: int) -> dict:
    """onnxruntime com.microsoft MatMulNBits inputs for W [N, K] = q: B, scales, zero_points.

    B is uint8 [N, n_blocks, block_size * bits / 8], values along K, low nibble
    first, the last block padded with zero points; scales [N * n_blocks];
    zero_points uint8 [N * ceil(n_blocks * bits / 8)], two 4-bit values a byte
    for bits=4, each row padded to whole bytes.
    """
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits export supports 4 or 8 bits, not {bits}")
    n, k = q.shape
    nb = -(-k // block_size)
    pad = nb * block_size - k
    qp = torch.cat([q, zeros[:, -1:].expand(n, pad)], dim=1) if pad else q
    if bits == 4:
        pairs = qp.reshape(n, nb, block_size // 2, 2).to(torch.uint8)
        b = pairs[..., 0] | (pairs[..., 1] << 4)
        zp = zeros if nb % 2 == 0 else torch.cat([zeros, zeros.new_zeros(n, 1)], dim=1)
        zp = zp.reshape(n, -1, 2)
        zp = (zp[..., 0] | (zp[..., 1] << 4)).reshape(-1)
    else:
        b = qp.reshape(n, nb, block_size).to(torch.uint8)
        zp = zeros.reshape(-1).to(torch.uint8)
    return {"B": b.contiguous(), "scales": scales.reshape(-1).contiguous(), "zero_points": zp.contiguous()}


def from_matmul_nbits(b, scales, zero_points, k: int, block_size: int, bits: int):
    """Inverse of `to_matmul_nbits`: (q uint8 [N, K], scales [N, n_blocks], zeros uint8 [N, n_blocks])."""
    n, nb = b.shape[0], b.shape[1]
    if bits == 4:
        q = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(n, nb * block_size)
        zp = zero_points.reshape(n, -1)
        zeros = torch.stack([zp & 0xF, zp >> 4], dim=-1).reshape(n, -1)[:, :nb]
    else:
        q = b.reshape(n, nb * block_size)
        zeros = zero_points.reshape(n, nb)
    return q[:, :k].contiguous(), scales.reshape(n, nb), zeros.contiguous()
