"""GPTQ's column loop over one block as one Triton kernel (CUDA only).

In eager PyTorch the loop costs about a dozen kernel launches per column, some
100 us on a GPU whatever the width: 4 s a layer at Llama-3-8B shapes. Every
row of W is independent inside the loop (it reads only its own weights and the
shared inverse Hessian), so a program takes BLOCK_R rows, keeps their block of
columns in registers and runs the whole loop. The arithmetic is gptq.py's,
step for step: fp16-rounded group scales from the updated weights at each
group's first column, round-half-to-even, IEEE division. Imported lazily: no
Triton (a CPU wheel, some Jetson wheels) means the PyTorch loop.
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK_R = 32
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests): no libdevice there


@triton.jit
def _rint(x, MAGIC: tl.constexpr):
    """Round half to even, as torch.round. MAGIC: by adding 1.5 * 2^23 (exact below 2^22; beyond, every caller
    clamps to [0, 2^bits) anyway)."""
    if MAGIC:
        return (x + 12582912.0) - 12582912.0
    return libdevice.rint(x)


@triton.jit
def _gptq_block(w_ptr, h_ptr, q_ptr, e_ptr, s_ptr, z_ptr, rows, width, ld_w, ld_h, ld_q, ld_e, ld_s,
                B: tl.constexpr, GS: tl.constexpr, MAXQ: tl.constexpr, SYM_MAX: tl.constexpr,
                ZERO_POINT: tl.constexpr, BLOCK: tl.constexpr, MAGIC: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, B)
    live = r < rows
    mask = live[:, None] & (cols[None, :] < width)
    w = tl.load(w_ptr + r[:, None] * ld_w + cols[None, :], mask=mask, other=0.0)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    z = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, width):
        col = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)
        if i % GS == 0:  # this group's scale and zero point, from its weights as updated so far
            in_group = (cols[None, :] >= i) & (cols[None, :] < i + GS)
            if ZERO_POINT:
                w_max = tl.max(tl.where(in_group, w, float("-inf")), axis=1)
                w_min = tl.min(tl.where(in_group, w, float("inf")), axis=1)
                s = tl.div_rn(tl.maximum(w_max - w_min, 1e-5), MAXQ * 1.0).to(tl.float16).to(tl.float32)
                z = tl.minimum(tl.maximum(-_rint(tl.div_rn(w_min, s), MAGIC), 0.0), MAXQ * 1.0)
            else:
                w_abs = tl.max(tl.where(in_group, tl.abs(w), 0.0), axis=1)
                s = tl.div_rn(tl.maximum(w_abs, 1e-5), SYM_MAX * 1.0).to(tl.float16).to(tl.float32)
                z = tl.full([BLOCK], (MAXQ + 1) // 2, tl.float32)
            tl.store(s_ptr + r * ld_s + i // GS, s, mask=live)
            tl.store(z_ptr + r * ld_s + i // GS, z, mask=live)
        q = tl.minimum(tl.maximum(_rint(tl.div_rn(col, s), MAGIC) + z, 0.0), MAXQ * 1.0)
        err = tl.div_rn(col - (q - z) * s, tl.load(h_ptr + i * ld_h + i))
        tl.store(q_ptr + r * ld_q + i, q, mask=live)
        tl.store(e_ptr + r * ld_e + i, err, mask=live)
        h = tl.load(h_ptr + i * ld_h + cols, mask=(cols > i) & (cols < width), other=0.0)
        w = w - err[:, None] * h[None, :]


def gptq_block(W1: torch.Tensor, Hinv: torch.Tensor, Q1: torch.Tensor, E1: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, group_size: int, w_bit: int, zero_point: bool) -> None:
    """One block, in place: W1 [rows, width] (a view of W), Hinv [width, width] (a view of the inverse Hessian's
    factor), Q1 [rows, width] and E1 [rows, width] filled, scales/zeros [rows, width / group_size] filled."""
    rows, width = W1.shape
    B = triton.next_power_of_2(width)
    for t in (W1, Hinv, Q1, E1, scales, zeros):
        assert t.dtype == torch.float32 and t.stride(-1) == 1, "float32 views with unit column stride"
    _gptq_block[(triton.cdiv(rows, BLOCK_R),)](
        W1, Hinv, Q1, E1, scales, zeros, rows, width, W1.stride(0), Hinv.stride(0), Q1.stride(0), E1.stride(0),
        scales.stride(0), B=B, GS=group_size, MAXQ=2**w_bit - 1, SYM_MAX=2 ** (w_bit - 1) - 1,
        ZERO_POINT=zero_point, BLOCK=BLOCK_R, MAGIC=INTERPRETED, num_warps=4,
        enable_fp_fusion=False)  # no FMA contraction: the same roundings as the PyTorch loop
