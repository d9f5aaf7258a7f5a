"""ctypes binding of libawq_edge_kernels: repack MatMulNBits int4 weights and multiply by them on the GPU."""

import ctypes
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from awq_edge.errors import AwqEdgeError

LIB_ENV = "AWQ_EDGE_KERNELS_LIB"
DEFAULT_LIB = Path(__file__).resolve().parents[2] / "plugins" / "build" / "libawq_edge_kernels.so"
BLOCK_SIZES = (32, 64, 128)
GATES = {"silu": 1, "gelu_tanh": 2, "gelu": 3}  # the gated epilogue's activations (awq_edge.arch.spec.ACTIVATIONS)
OK, INVALID_ARGUMENT, UNSUPPORTED, CUDA_ERROR = 0, 1, 2, 3
_FIXES = {
    INVALID_ARGUMENT: "pass contiguous CUDA tensors of the shapes, dtypes and alignment in awq_edge_kernels.h",
    UNSUPPORTED: "run this layer through onnxruntime's MatMulNBits or PyTorch instead",
    CUDA_ERROR: "check that the GPU works and that every tensor is on the current device",
}

_vp, _int, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {
    "awqe_status_string": ([_int], ctypes.c_char_p),
    "awqe_last_error": ([], ctypes.c_char_p),
    "awqe_packed_weight_bytes": ([_int, _int, _int], _size),
    "awqe_workspace_bytes": ([_int, _int, _int, _int], _size),
    "awqe_repack_matmul_nbits": ([_vp, _vp, _vp, _int, _int, _int, _vp, _vp], _int),
    "awqe_dequantize_f16": ([_vp, _int, _int, _int, _vp, _vp], _int),
    "awqe_gemm_f16": ([_vp, _vp, _vp, _vp, _int, _int, _int, _int, _vp, _size, _vp], _int),
    "awqe_gemm_f16_ex": ([_vp, _vp, _vp, _vp, _int, _int, _int, _int, _vp, _size, _int, _vp], _int),
    "awqe_rmsnorm_f16": ([_vp, _vp, _vp, _int, _int, ctypes.c_float, _vp], _int),
    "awqe_rope_kv_f16": ([_vp, _vp, _vp, _vp, _vp, _vp, _vp, _int, _int, _int, _int, _int, _vp], _int),
    "awqe_attention_workspace_bytes": ([_int, _int, _int], _size),
    "awqe_decode_attention_f16": ([_vp, _vp, _vp, _vp, _vp, _vp, _vp, _int, _int, _int, _int, _int, ctypes.c_float,
                                   _vp, _size, _vp], _int),
    "awqe_decode_attention_ex_f16": ([_vp, _vp, _vp, _vp, _vp, _vp, _vp, _int, _int, _int, _int, _int, ctypes.c_float,
                                      _vp, _vp, ctypes.c_float, ctypes.c_float, _int, _vp, _size, _vp], _int),
    "awqe_residual_norm_f16": ([_vp, _vp, _vp, _vp, _vp, _int, _int, ctypes.c_float, _vp], _int),
    "awqe_gemm_residual_norm_f16": ([_vp, _vp, _vp, _vp, _int, _int, _int, _vp, _vp, _vp, _vp, ctypes.c_float, _vp,
                                     _vp], _int),
    "awqe_gemm_gated_f16": ([_vp, _vp, _vp, _vp, _int, _int, _int, _int, _vp], _int),
    "awqe_gemm_norm_f16": ([_vp, _vp, _vp, _vp, _int, _int, _int, _int, _int, _vp, _vp, ctypes.c_float, _vp, _vp,
                            _vp, _vp], _int),
    "awqe_set_programmatic_launch": ([_int], None),
    "awqe_silu_mul_f16": ([_vp, _vp, _int, _int, _vp], _int),
    "awqe_probe_placement": ([_vp, _int], _int),
}


class KernelError(AwqEdgeError):
    """A failure status from the kernel library; `status` is its awqe_status code."""

    def __init__(self, status: int, problem: str, fix: str):
        super().__init__(problem, fix)
        self.status = status


def library_path() -> Path:
    """$AWQ_EDGE_KERNELS_LIB, else the library `make plugins` builds in plugins/build."""
    return Path(os.environ.get(LIB_ENV) or DEFAULT_LIB)


@lru_cache(maxsize=None)
def load_library(path: str | None = None) -> ctypes.CDLL:
    """The kernel library at `path` (default: `library_path()`), with its C signatures declared."""
    lib_path = Path(path) if path else library_path()
    if not lib_path.is_file():
        raise AwqEdgeError(
            f"the CUDA kernel library {lib_path} does not exist",
            f"run `make plugins` (needs nvcc and cmake), or set {LIB_ENV} to a built libawq_edge_kernels.so",
        )
    lib = ctypes.CDLL(str(lib_path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def check(lib: ctypes.CDLL, status: int) -> None:
    if status != OK:
        detail = lib.awqe_last_error().decode()
        raise KernelError(status, f"int4 kernel: {lib.awqe_status_string(status).decode()}: {detail}",
                          _FIXES.get(status, "report this as a bug"))


@dataclass(frozen=True)
class PackedInt4:
    """W [n, k] of 4-bit values in blocks of `block_size` along k, in the kernels' layout (uint8 on a GPU)."""

    data: torch.Tensor
    n: int
    k: int
    block_size: int


def _require(cond: bool, problem: str, fix: str) -> None:
    if not cond:
        raise AwqEdgeError(problem, fix)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def repack_matmul_nbits(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, k: int,
                        block_size: int) -> PackedInt4:
    """MatMulNBits B uint8 [N, n_blocks, block_size/2], scales [N * n_blocks] and packed zero points (or None)."""
    _require(b.is_cuda and b.dtype == torch.uint8 and b.dim() == 3 and b.is_contiguous(),
             f"B must be a contiguous uint8 CUDA tensor [N, n_blocks, block_size/2], got {b.dtype} {tuple(b.shape)} "
             f"on {b.device}", "export the weights with awq_edge.packing.to_matmul_nbits and move them to the GPU")
    n, n_blocks = b.shape[0], -(-k // block_size)
    _require(block_size in BLOCK_SIZES and tuple(b.shape) == (n, n_blocks, block_size // 2),
             f"B has shape {tuple(b.shape)}, expected ({n}, {n_blocks}, {block_size // 2}) for K={k}, "
             f"block_size={block_size}", f"use block_size in {BLOCK_SIZES} and the K the weights were packed with")
    scales = scales.to(device=b.device, dtype=torch.float16).contiguous()
    _require(scales.numel() == n * n_blocks, f"scales has {scales.numel()} values, expected {n * n_blocks}",
             "pass one scale per row and block")
    if zero_points is not None:
        zero_points = zero_points.to(b.device).contiguous()
        expected = n * -(-n_blocks // 2)
        _require(zero_points.dtype == torch.uint8 and zero_points.numel() == expected,
                 f"zero_points must be {expected} uint8 values (two per byte), got {zero_points.numel()} "
                 f"{zero_points.dtype}", "pack zero points as awq_edge.packing.to_matmul_nbits does, or pass None")
    lib = load_library()
    packed = torch.empty(lib.awqe_packed_weight_bytes(n, k, block_size), dtype=torch.uint8, device=b.device)
    with torch.cuda.device(b.device):
        check(lib, lib.awqe_repack_matmul_nbits(b.data_ptr(), scales.data_ptr(), _ptr(zero_points), n, k,
                                                block_size, packed.data_ptr(), _stream(b.device)))
    return PackedInt4(packed, n, k, block_size)


def _gemm_inputs(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None):
    """x as contiguous rows [M, k] and the bias as contiguous fp16 on x's GPU, both checked against W."""
    _require(x.is_cuda and x.dtype == torch.float16 and x.shape[-1] == w.k,
             f"x must be an fp16 CUDA tensor [..., {w.k}], got {x.dtype} {tuple(x.shape)} on {x.device}",
             "cast activations to fp16 and move them to the weights' GPU")
    if bias is not None:
        _require(bias.shape == (w.n,), f"bias has shape {tuple(bias.shape)}, expected ({w.n},)",
                 "pass one bias value per output feature")
        bias = bias.to(device=x.device, dtype=torch.float16).contiguous()
    return x.reshape(-1, w.k).contiguous(), bias


def gemm(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
         warps_per_tile: int = 0) -> torch.Tensor:
    """y [..., n] = x [..., k] @ W^T (+ bias), fp16; `warps_per_tile` 0 lets the library choose (see the header)."""
    x2, bias = _gemm_inputs(x, w, bias)
    if out is None:
        out = torch.empty(*x.shape[:-1], w.n, dtype=torch.float16, device=x.device)
    _require(out.dtype == torch.float16 and out.is_contiguous() and out.numel() == x2.shape[0] * w.n,
             f"out must be a contiguous fp16 tensor of {x2.shape[0] * w.n} values", "let gemm allocate it")
    lib = load_library()
    with torch.cuda.device(x.device):
        check(lib, lib.awqe_gemm_f16_ex(x2.data_ptr(), w.data.data_ptr(), _ptr(bias), out.data_ptr(), x2.shape[0],
                                        w.n, w.k, w.block_size, None, 0, warps_per_tile, _stream(x.device)))
    return out


def dequantize(w: PackedInt4, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense fp16 W [n, k] = (q - zero) * scale: for products whose M is too large for `gemm` to win."""
    if out is None:
        out = torch.empty(w.n, w.k, dtype=torch.float16, device=w.data.device)
    _require(out.dtype == torch.float16 and out.is_contiguous() and out.numel() == w.n * w.k,
             f"out must be a contiguous fp16 tensor of {w.n * w.k} values", "let dequantize allocate it")
    lib = load_library()
    with torch.cuda.device(w.data.device):
        check(lib, lib.awqe_dequantize_f16(w.data.data_ptr(), w.n, w.k, w.block_size, out.data_ptr(),
                                           _stream(w.data.device)))
    return out


# ---- The other kernels of a decoder step. Thin wrappers: shapes are the caller's (awq_edge.runtime.cuda);
# the library checks sizes, pointers and alignment, and these check what the library cannot see. ----


def _f16(*tensors):
    for t in tensors:
        _require(t.is_cuda and t.dtype == torch.float16 and t.is_contiguous(),
                 f"expected a contiguous fp16 CUDA tensor, got {t.dtype} {tuple(t.shape)} on {t.device}",
                 "keep decoder activations and caches in fp16 on the GPU")


def _same_device(first: torch.Tensor, *others) -> None:
    """Every tensor given (None skipped) on first's GPU: a launch goes to one device's context."""
    _require(all(t is None or t.device == first.device for t in others),
             f"tensors on several devices; expected all on {first.device}", "move them to one GPU")


def _require_rope_tables(what: str, cos: torch.Tensor, sin: torch.Tensor, max_len: int, d: int) -> None:
    _require(cos.dtype == torch.float32 and cos.shape == (max_len, d // 2) and sin.shape == cos.shape
             and cos.is_contiguous() and sin.is_contiguous(),
             f"{what}: cos/sin must be fp32 [{max_len}, {d // 2}]", "slice the rope tables to the cache length")


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """out [rows, dim] = w * fp16(x * rsqrt(mean(x^2) + eps))."""
    _f16(x, w, out)
    dim = x.shape[-1]
    _require(w.numel() == dim and out.shape == x.shape, "rmsnorm: w must be [dim] and out the shape of x",
             "pass the norm weight of this hidden size")
    lib = load_library()
    check(lib, lib.awqe_rmsnorm_f16(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                                    _stream(x.device)))
    return out


def rope_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Rotate q and k of qkv [M, (H + 2 KV) * D] at `positions` (int32 [M]); k, v into the caches [KV, L, D]."""
    _f16(qkv, q_out, k_cache, v_cache)
    n_kv, max_len, d = k_cache.shape
    m, n_heads = q_out.shape[0], q_out.shape[1]
    _require(positions.dtype == torch.int32 and positions.numel() == m and positions.is_cuda,
             "rope_kv: positions must be int32 [M] on the GPU", "pass the decoder's position buffer")
    _require_rope_tables("rope_kv", cos, sin, max_len, d)
    _require(qkv.numel() == m * (n_heads + 2 * n_kv) * d and v_cache.shape == k_cache.shape,
             "rope_kv: qkv, q_out and caches disagree in shape", "pass [M, (H + 2 KV) * D] and [KV, L, D]")
    lib = load_library()
    check(lib, lib.awqe_rope_kv_f16(qkv.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                    q_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), m, n_heads, n_kv, d,
                                    max_len, _stream(qkv.device)))
    return q_out


def attention_workspace(n_heads: int, head_dim: int, max_len: int, device) -> torch.Tensor:
    """Zeroed workspace for decode_attention (its ticket counters must start at zero; the kernel resets them)."""
    lib = load_library()
    n = lib.awqe_attention_workspace_bytes(n_heads, head_dim, max_len)
    return torch.zeros(-(-n // 8), dtype=torch.float64, device=device)  # 8-byte aligned


def decode_attention(qkv: torch.Tensor, position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, workspace: torch.Tensor,
                     scale: float, window: int = 0, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, eps: float = 0.0, softcap: float = 0.0,
                     span: int | None = None) -> torch.Tensor:
    """One decode step: rotate q and k of qkv [1, (H + 2 KV) * D] at position[0] (int32 on the GPU), write k and v
    into the caches [KV, L, D], and out [1, H * D] = attention over positions 0 .. position[0]. q_norm and k_norm
    ([D], both or neither): each head's RMSNorm before the rotation; softcap > 0: scores capped by tanh. span (None:
    the cache's length L): the launch covers positions below it only, one block a head per 32 of them; a position at
    or past it gives NaN."""
    _f16(qkv, k_cache, v_cache, out)
    n_kv, max_len, d = k_cache.shape
    n_heads = out.numel() // d
    _require(position.dtype == torch.int32 and position.is_cuda and qkv.numel() == (n_heads + 2 * n_kv) * d,
             "attention: position must be int32 on the GPU and qkv hold one token's q, k and v",
             "pass the decoder's buffers")
    _require_rope_tables("attention", cos, sin, max_len, d)
    _require((q_norm is None) == (k_norm is None), "attention: pass both q_norm and k_norm or neither",
             "pass the layer's two head norms")
    if q_norm is not None:
        _f16(q_norm, k_norm)
        _require(q_norm.numel() == d and k_norm.numel() == d, f"attention: q_norm and k_norm must be [{d}]",
                 "pass the per-head norm weights")
    span = max_len if span is None else span
    _require(1 <= span <= max_len, f"attention: span {span} is outside 1 .. the cache's {max_len} positions",
             "pass a span past the step's position, at most the cache's length")
    _same_device(qkv, position, cos, sin, k_cache, v_cache, out, workspace, q_norm, k_norm)
    lib = load_library()
    with torch.cuda.device(qkv.device):
        check(lib, lib.awqe_decode_attention_ex_f16(
            qkv.data_ptr(), position.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), out.data_ptr(), n_heads, n_kv, d, max_len, window, scale, _ptr(q_norm), _ptr(k_norm),
            eps, softcap, span, workspace.data_ptr(), workspace.numel() * 8, _stream(qkv.device)))
    return out


def residual_norm(y: torch.Tensor | None, out_norm: torch.Tensor | None, h: torch.Tensor, next_norm: torch.Tensor,
                  eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gemma 2/3's block boundary: h (fp32 [rows, dim], in place) += out_norm * rmsnorm(y) (out_norm None: + y; y None:
    nothing), then fp16 next_norm * rmsnorm(h), returned (in `out` when given)."""
    _require(h.is_cuda and h.dtype == torch.float32 and h.is_contiguous(),
             f"residual_norm: h must be a contiguous fp32 CUDA tensor, got {h.dtype} {tuple(h.shape)}",
             "keep the residual stream in float32 on the GPU")
    dim = h.shape[-1]
    for t in (y, out_norm):
        if t is not None:
            _f16(t)
    _f16(next_norm)
    _require(next_norm.numel() == dim and (out_norm is None or out_norm.numel() == dim)
             and (y is None or y.numel() == h.numel()),
             "residual_norm: y must have h's size and the norms [dim]", "pass the block output and the layer's norms")
    if out is None:
        out = torch.empty(h.shape, dtype=torch.float16, device=h.device)
    _f16(out)
    _require(out.numel() == h.numel(), "residual_norm: out must have h's size", "let residual_norm allocate it")
    _same_device(h, y, out_norm, next_norm, out)
    lib = load_library()
    with torch.cuda.device(h.device):
        check(lib, lib.awqe_residual_norm_f16(_ptr(y), _ptr(out_norm), h.data_ptr(), next_norm.data_ptr(),
                                              out.data_ptr(), h.numel() // dim, dim, eps, _stream(h.device)))
    return out


def gemm_gated(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None,
               activation: str = "silu") -> torch.Tensor:
    """y [..., n/2] = fp16(act(gate)) * up for W whose rows alternate gate/up in blocks of 8
    (awq_edge.runtime.cuda.interleave_gate_up): gemm_norm with the gate and no norm folded in."""
    return gemm_norm(x, w, bias, gated=True, activation=activation)


def sumsq_parts(n: int) -> int:
    """Per-row floats of gemm_norm's sumsq_out for a product of n output columns: one per 16 rows of W."""
    return (n + 15) // 16


def gemm_norm(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None, gated: bool = False,
              rms_input: torch.Tensor | None = None, eps: float = 0.0, norm_weight: torch.Tensor | None = None,
              out: torch.Tensor | None = None, norm_out: torch.Tensor | None = None, activation: str = "silu",
              rms_sumsq: torch.Tensor | None = None, sumsq_out: torch.Tensor | None = None):
    """The product with RMSNorms folded in (see awqe_gemm_norm_f16): y = rsqrt(mean(rms_input^2) + eps) *
    (x @ W^T) + bias, where x = norm weight * rms_input was pre-scaled (by the previous call's norm_out); gated
    adds the gate of gemm_gated with `activation` (a key of GATES). With norm_weight, also norm_out =
    fp16(norm_weight * y). With sumsq_out (fp32 [m, sumsq_parts(n)], not gated), also the sums of fp16(y)^2 over
    each 16 columns, which the next call takes as rms_sumsq (with rms_input = this y) instead of re-reading y's rows
    for its mean. Returns y, or (y, norm_out) when norm_weight is given."""
    _require(not gated or activation in GATES, f"gate activation {activation!r} is not one of {', '.join(GATES)}",
             "run this MLP's gate in PyTorch")
    x2, bias = _gemm_inputs(x, w, bias)
    m, n_out = x2.shape[0], w.n // 2 if gated else w.n
    if out is None:
        out = torch.empty(*x.shape[:-1], n_out, dtype=torch.float16, device=x.device)
    _require(out.dtype == torch.float16 and out.is_contiguous() and out.numel() == m * n_out,
             f"out must be a contiguous fp16 tensor of {m * n_out} values", "let gemm_norm allocate it")
    if rms_input is not None:
        _f16(rms_input)
        _require(rms_input.numel() == m * w.k, f"rms_input must hold [{m}, {w.k}] values",
                 "pass the un-normalised hidden state the pre-scaled x came from")
    for name, t, cols in (("rms_sumsq", rms_sumsq, sumsq_parts(w.k)), ("sumsq_out", sumsq_out, sumsq_parts(w.n))):
        if t is not None:
            _require(t.dtype == torch.float32 and t.is_cuda and t.is_contiguous() and t.numel() == m * cols,
                     f"{name} must be a contiguous fp32 CUDA tensor of [{m}, {cols}] values",
                     "allocate it as torch.empty(m, sumsq_parts(n), dtype=torch.float32, device='cuda')")
    _require(rms_sumsq is None or rms_input is not None, "rms_sumsq needs rms_input",
             "pass the hidden state its sums came from as rms_input")
    _require(sumsq_out is None or not gated, "sumsq_out is not available with the gated epilogue",
             "take the sums from a plain product")
    if norm_weight is not None:
        _f16(norm_weight)
        _require(not gated and norm_weight.numel() == w.n, f"norm_weight must be [{w.n}] (and not gated)",
                 "pass the next RMSNorm's weight")
        if norm_out is None:
            norm_out = torch.empty_like(out)
        _f16(norm_out)
        _require(norm_out.shape == out.shape, "norm_out must have y's shape", "let gemm_norm allocate it")
    lib = load_library()
    with torch.cuda.device(x.device):
        check(lib, lib.awqe_gemm_norm_f16(x2.data_ptr(), w.data.data_ptr(), _ptr(bias), out.data_ptr(), m, w.n, w.k,
                                          w.block_size, GATES[activation] if gated else 0, _ptr(rms_input),
                                          _ptr(rms_sumsq), eps, _ptr(norm_weight),
                                          _ptr(norm_out) if norm_weight is not None else None, _ptr(sumsq_out),
                                          _stream(x.device)))
    return out if norm_weight is None else (out, norm_out)


def gemm_residual_norm(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None, out_norm: torch.Tensor | None,
                       h: torch.Tensor, next_norm: torch.Tensor, eps: float, ticket: torch.Tensor,
                       y: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token's product y = x @ W^T (+ bias) and Gemma 2/3's block boundary after it in one launch: h (fp32
    [1, n], in place) += out_norm * rmsnorm(y) (out_norm None: + y), then returns fp16 next_norm * rmsnorm(h), as
    residual_norm(gemm(x, w, bias), out_norm, h, next_norm, eps) computes it up to the order of the fp32 sums.
    ticket: int32 [1] on the GPU, zero before the first call (each call leaves it at zero), one per stream. y and out
    (fp16 [1, n], allocated when not given): the product and the returned next input."""
    x2, bias = _gemm_inputs(x, w, bias)
    _require(x2.shape[0] == 1, f"gemm_residual_norm takes one token, got {x2.shape[0]} rows",
             "run gemm then residual_norm for a prompt")
    _require(h.is_cuda and h.dtype == torch.float32 and h.is_contiguous() and h.numel() == w.n,
             f"gemm_residual_norm: h must be a contiguous fp32 CUDA tensor of {w.n} values, got {h.dtype} "
             f"{tuple(h.shape)}", "keep the residual stream in float32 on the GPU")
    _require(ticket.is_cuda and ticket.dtype == torch.int32 and ticket.numel() == 1,
             "gemm_residual_norm: ticket must be one int32 on the GPU", "allocate torch.zeros(1, dtype=torch.int32)")
    _f16(next_norm)
    _require(next_norm.numel() == w.n, f"gemm_residual_norm: next_norm must be [{w.n}]", "pass the layer's norm")
    if out_norm is not None:
        _f16(out_norm)
        _require(out_norm.numel() == w.n, f"gemm_residual_norm: out_norm must be [{w.n}]", "pass the layer's norm")
    _same_device(x2, h, next_norm, out_norm, ticket)
    y = torch.empty(1, w.n, dtype=torch.float16, device=x.device) if y is None else y
    out = torch.empty(1, w.n, dtype=torch.float16, device=x.device) if out is None else out
    _f16(y, out)
    _require(y.numel() == w.n and out.numel() == w.n, f"gemm_residual_norm: y and out must hold {w.n} values",
             "let gemm_residual_norm allocate them")
    lib = load_library()
    with torch.cuda.device(x.device):
        check(lib, lib.awqe_gemm_residual_norm_f16(x2.data_ptr(), w.data.data_ptr(), _ptr(bias), y.data_ptr(), w.n,
                                                   w.k, w.block_size, _ptr(out_norm), h.data_ptr(),
                                                   next_norm.data_ptr(), out.data_ptr(), eps, ticket.data_ptr(),
                                                   _stream(x.device)))
    return out.view(*h.shape)


def set_programmatic_launch(enable: bool) -> None:
    """Programmatic dependent launch on sm_90+ (default on); off for A/B timing."""
    load_library().awqe_set_programmatic_launch(int(enable))


PROBE_FIELDS = ("entry_ns", "released_ns", "done_ns", "sm", "wait_cycles", "done_cycles", "threads")


def probe_placement(max_blocks: int) -> list[tuple] | None:
    """Blocks [0, max_blocks) of the last M <= 8 GEMM launched, one tuple of PROBE_FIELDS each (awq_edge_kernels.h's
    awqe_probe_placement; the records are cleared after), from a library built with -DAWQE_PROBE_PLACEMENT; None
    from any other build."""
    buf = ctypes.create_string_buffer(40 * max_blocks)
    n = load_library().awqe_probe_placement(ctypes.addressof(buf), max_blocks)
    if n < 0:
        return None
    return list(struct.iter_unpack("<QQQIIII", buf.raw[:40 * n]))


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, I] = fp16(silu(gate)) * up for gate_up [M, 2 I] alternating gate/up columns in blocks of 8."""
    _f16(gate_up, out)
    inter = out.shape[-1]
    m = out.numel() // inter
    _require(gate_up.numel() == 2 * m * inter, "silu_mul: gate_up must be [M, 2 * inter]", "fuse gate and up rows")
    lib = load_library()
    check(lib, lib.awqe_silu_mul_f16(gate_up.data_ptr(), out.data_ptr(), m, inter, _stream(out.device)))
    return out
