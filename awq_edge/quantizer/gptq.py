"""GPTQ weight rounding (Frantar et al., 2022): pure functions on tensors, in the format of `quant.quantize`."""

import warnings

import torch

from awq_edge.errors import AwqEdgeError
from awq_edge.quant import QConfig, dequantize_groups, group_qparams, n_groups, quantize_groups, to_groups

# Dampening, a fraction of the Hessian's mean diagonal. GPTQ's paper and AutoGPTQ use 0.01; 0.1 measured better on
# both real models on WikiText-2 test, which no calibration text contains (SmolLM2 g64/g128 35.19/37.82 ->
# 34.29/36.84, bench/results/history/quality_extra.md, transcribed by hand; Gemma-3-270M 68.54/71.28 -> 66.78/67.82,
# history/quality_gemma3.md).
DAMP = 0.1


class HessianAccumulator:
    """H = 2/n * sum over tokens of x x^T, accumulated in float32 over micro-batches of x [..., in]."""

    def __init__(self):
        self.xtx = None
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, weight: float = 1.0):
        """Count each row of x [..., in] `weight` times."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.xtx.addmm_(x.t(), x, alpha=weight)
        self.n += x.shape[0] * weight

    def take(self) -> torch.Tensor:
        """The Hessian in the accumulator's own memory; the accumulator is spent."""
        H = self._xtx().mul_(2 / self.n)
        self.xtx = None
        return H

    def _xtx(self) -> torch.Tensor:
        if self.n and self.xtx is None:
            raise AwqEdgeError("this GPTQ Hessian was taken already", "read .hessian before take()")
        if not self.n:
            raise AwqEdgeError("the GPTQ Hessian has seen no calibration tokens", "call add() with the linear's inputs")
        return self.xtx

    @property
    def hessian(self) -> torch.Tensor:
        return self._xtx() * (2 / self.n)


def inverse_hessian_cholesky(H: torch.Tensor, damp: float = DAMP, retries: int = 3) -> torch.Tensor:
    """Upper Cholesky factor (row-major) of (H + damp * mean(diag H) * I)^-1, damping x10 on each failure.
    H's diagonal is damped in place and restored (at 14336 inputs each copy of H is 0.8 GB)."""
    diag = H.diagonal().clone()
    mean_diag = diag.mean()
    try:
        for attempt in range(retries + 1):
            d = damp * 10**attempt
            H.diagonal().copy_(diag + d * mean_diag)
            L, info = torch.linalg.cholesky_ex(H)
            if info == 0:
                inverse = torch.cholesky_inverse(L)
                del L
                L, info = torch.linalg.cholesky_ex(inverse)
                del inverse
                if info == 0:
                    return L.mT.contiguous()  # U = L^T; a no-copy view where the solver returns column-major L
            del L
    finally:
        H.diagonal().copy_(diag)
    raise AwqEdgeError(f"the GPTQ Hessian is not positive definite even with damping {d:g}",
                       "check the calibration activations for NaN or Inf, or pass a larger damp")


_FUSED_BROKEN = []  # the first error of the Triton loop where it cannot run here (auto mode then uses PyTorch's)


def _fused_block():
    """The Triton column loop (gptq_triton.py), or None where Triton is missing."""
    try:
        from awq_edge.quantizer.gptq_triton import gptq_block
    except ImportError:
        return None
    return gptq_block


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, cfg: QConfig, *, block_size: int = 128, damp: float = DAMP,
                  act_order: bool = False, fused: bool | None = None, overwrite: bool = False):
    """W [out, in], H [in, in] -> (q uint8 [out, in], scales [out, n_groups], zeros uint8 [out, n_groups]).

    Columns are rounded one at a time; each rounding error is spread over the
    columns not yet rounded so that x W^T moves least (H = 2/n X^T X). Without
    act_order a group's scale and zero point come from its weights as updated
    when the loop reaches its first column; with act_order (largest H_ii
    first) they are fixed from the original weights beforehand ("static
    groups"), so groups stay contiguous in the stored layout either way.
    `fused` (None: wherever it applies, a CUDA tensor without act_order and
    whole groups) runs each block's column loop as one Triton kernel, the same
    arithmetic. `overwrite` lets it use w's and H's memory (float32 inputs are
    then undefined).
    """
    W, H = w.detach().float(), H.detach().float()
    if not overwrite:
        W, H = W.clone(), H.clone()
    out_f, in_f = W.shape
    gs = cfg.group_size
    dead = H.diagonal() == 0  # an input that is always zero: its weights are free, zero keeps them small
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.empty(out_f, n_groups(in_f, gs), dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    perm = None
    if act_order:
        scales, zeros = group_qparams(to_groups(W, gs), cfg)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm if act_order else torch.arange(in_f)).div(gs, rounding_mode="floor").tolist()
    Hinv = inverse_hessian_cholesky(H, damp)

    # A block is whole groups, so a group's qparams see every update made before its first column.
    block = max(block_size // gs, 1) * gs
    kernel = None
    if fused is not False and W.is_cuda and not act_order and in_f % gs == 0 and (fused or not _FUSED_BROKEN):
        kernel = _fused_block()
    if fused and kernel is None:
        raise AwqEdgeError("the fused GPTQ loop needs Triton, a CUDA tensor, no act_order and whole groups",
                           "install triton or pass fused=None")
    Q = torch.empty_like(W)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        if kernel is not None:
            g1, g2 = i1 // gs, i2 // gs
            s1, z1 = scales[:, g1:g2].contiguous(), zeros[:, g1:g2].contiguous()
            try:
                kernel(W1, Hinv[i1:i2, i1:i2], Q[:, i1:i2], E1, s1, z1, gs, cfg.w_bit, cfg.zero_point)
            except Exception as e:  # e.g. Triton without a compiler for this GPU: the PyTorch loop, said once
                if fused:
                    raise
                _FUSED_BROKEN.append(e)
                warnings.warn(f"GPTQ's Triton loop cannot run here ({type(e).__name__}: {str(e)[:200]}); "
                              "using the PyTorch loop, about 15x slower")
                kernel = None
            else:
                scales[:, g1:g2], zeros[:, g1:g2] = s1, z1
                W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
                continue
        for i in range(i2 - i1):
            c, g = i1 + i, group_of[i1 + i]
            if not act_order and c % gs == 0:
                s, z = group_qparams(W1[:, i:i + gs].unsqueeze(1), cfg)  # min/max of real columns only
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, g], zeros[:, g]
            q = quantize_groups(W1[:, i:i + 1], s, z, cfg.w_bit)
            Q[:, c] = q[:, 0]
            E1[:, i] = (W1[:, i] - dequantize_groups(q, s, z)[:, 0]) / Hinv[c, c]
            W1[:, i + 1:] -= E1[:, i:i + 1] * Hinv[c, c + 1:i2]
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]

    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.uint8), scales, zeros.to(torch.uint8)
