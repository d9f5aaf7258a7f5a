"""Tests for awq_edge.runtime.kernels and the C ABI of libawq_edge_kernels (GPU checks skip without a GPU)."""

import pytest
import torch

from awq_edge.errors import AwqEdgeError
from awq_edge.packing import to_matmul_nbits
from awq_edge.quant import QConfig, dequantize, quantize
from awq_edge.runtime import kernels

needs_library = pytest.mark.skipif(not kernels.library_path().is_file(),
                                   reason=f"{kernels.library_path()} not built (run `make plugins`)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

# Fake device addresses: the argument checks must reject a call before any CUDA work touches them.
ALIGNED = 0x10000
GOOD_GEMM = dict(x=ALIGNED, packed=ALIGNED, bias=None, y=ALIGNED, M=1, N=64, K=576, block_size=64, warps=0)


def call_gemm(lib, **overrides):
    a = {**GOOD_GEMM, **overrides}
    return lib.awqe_gemm_f16_ex(a["x"], a["packed"], a["bias"], a["y"], a["M"], a["N"], a["K"], a["block_size"],
                                None, 0, a["warps"], None)


@needs_library
def test_status_strings_name_each_status():
    lib = kernels.load_library()
    names = [lib.awqe_status_string(s).decode() for s in range(4)]
    assert names == ["ok", "invalid argument", "unsupported", "CUDA error"]


@needs_library
@pytest.mark.parametrize("n, k, block_size, expected", [
    (16, 64, 64, 512 + 64),                # one tile, one chunk, one block
    (17, 576, 128, 2 * 10 * 512 + 2 * 5 * 64),  # ragged N and K: 2 tiles, 5 blocks = 10 chunks
    (16, 96, 32, 2 * 512 + 4 * 64),       # 3 blocks padded to 2 chunks, whose 4 blocks all carry parameters
    (16, 64, 16, 0),                       # unsupported block size
])
def test_packed_weight_bytes_counts_tiles_chunks_and_block_parameters(n, k, block_size, expected):
    assert kernels.load_library().awqe_packed_weight_bytes(n, k, block_size) == expected


@needs_library
@pytest.mark.parametrize("override, status, fragment", [
    (dict(block_size=16), kernels.INVALID_ARGUMENT, "block_size"),
    (dict(N=0), kernels.INVALID_ARGUMENT, "N must"),
    (dict(K=0), kernels.INVALID_ARGUMENT, "K must"),
    (dict(K=12), kernels.UNSUPPORTED, "multiple of 8"),
    (dict(M=-1), kernels.INVALID_ARGUMENT, "M must"),
    (dict(x=None), kernels.INVALID_ARGUMENT, "x must"),
    (dict(x=ALIGNED + 8), kernels.INVALID_ARGUMENT, "x must"),
    (dict(packed=ALIGNED + 4), kernels.INVALID_ARGUMENT, "packed must"),
    (dict(y=None), kernels.INVALID_ARGUMENT, "y must"),
    (dict(bias=ALIGNED + 1), kernels.INVALID_ARGUMENT, "bias must"),
    (dict(warps=16), kernels.INVALID_ARGUMENT, "warps_per_tile"),
])
def test_gemm_rejects_bad_arguments_before_any_cuda_call(override, status, fragment):
    lib = kernels.load_library()
    assert call_gemm(lib, **override) == status
    assert fragment in lib.awqe_last_error().decode()


@needs_library
@pytest.mark.parametrize("override, fragment", [
    (dict(norm_w=ALIGNED), "both be given"),
    (dict(norm_w=ALIGNED, norm_out=ALIGNED + 64, gated=1), "gated"),
    (dict(rms=ALIGNED + 8), "rms_input must"),
    (dict(rms=ALIGNED, eps=-1.0), "eps must"),
    (dict(norm_w=ALIGNED, norm_out=ALIGNED), "norm_out not y"),
    (dict(gated=1, N=24), "multiple of 16"),
    (dict(rms_sumsq=ALIGNED), "rms_input_sumsq needs rms_input"),
    (dict(rms=ALIGNED, rms_sumsq=ALIGNED + 2), "rms_input_sumsq must be a 4-byte aligned"),
    (dict(sumsq_out=ALIGNED + 2), "sumsq_out must be a 4-byte aligned"),
    (dict(sumsq_out=ALIGNED * 64, gated=1), "sumsq_out is not available with the gated epilogue"),
    (dict(rms=ALIGNED * 32, rms_sumsq=ALIGNED * 64, sumsq_out=ALIGNED * 64 + 4), "rms_input_sumsq must not overlap"),
    (dict(sumsq_out=ALIGNED + 4), "sumsq_out must not overlap"),  # inside y
    (dict(rms=ALIGNED * 32, rms_sumsq=ALIGNED + 8), "rms_input_sumsq must not overlap y"),
])
def test_gemm_norm_rejects_bad_folds_before_any_cuda_call(override, fragment):
    a = {**GOOD_GEMM, "gated": 0, "rms": None, "rms_sumsq": None, "eps": 1e-5, "norm_w": None, "norm_out": None,
         "sumsq_out": None, **override}
    lib = kernels.load_library()
    status = lib.awqe_gemm_norm_f16(a["x"], a["packed"], a["bias"], a["y"], a["M"], a["N"], a["K"], a["block_size"],
                                    a["gated"], a["rms"], a["rms_sumsq"], a["eps"], a["norm_w"], a["norm_out"],
                                    a["sumsq_out"], None)
    assert status == kernels.INVALID_ARGUMENT
    assert fragment in lib.awqe_last_error().decode()


@needs_library
def test_gemm_norm_refuses_an_unknown_gate_activation():
    lib = kernels.load_library()
    a = GOOD_GEMM
    assert lib.awqe_gemm_norm_f16(a["x"], a["packed"], None, a["y"], 1, 64, 576, 64, 4, None, None, 0.0, None, None,
                                  None, None) == kernels.INVALID_ARGUMENT
    assert "GELU" in lib.awqe_last_error().decode()


GOOD_GEMM_BOUNDARY = dict(x=ALIGNED * 8, packed=ALIGNED * 16, bias=None, y=ALIGNED, N=640, K=1024, block_size=128,
                          out_norm=ALIGNED * 2, h=ALIGNED * 4, next_norm=ALIGNED * 2, x_out=ALIGNED * 6, eps=1e-6,
                          ticket=ALIGNED * 10)


@needs_library
@pytest.mark.parametrize("override, fragment", [
    (dict(N=641), "must be even"),
    (dict(eps=float("nan")), "finite"),
    (dict(h=ALIGNED * 4 + 4), "8-byte aligned"),
    (dict(ticket=None), "must be non-null"),
    (dict(out_norm=ALIGNED * 2 + 2), "out_norm 4-byte aligned"),
    (dict(x_out=ALIGNED + 4), "must not overlap"),   # inside y
    (dict(h=ALIGNED + 8), "must not overlap"),       # inside y
    (dict(x_out=ALIGNED * 8 + 64), "must not overlap"),  # inside x
])
def test_gemm_residual_norm_rejects_bad_arguments_before_any_cuda_call(override, fragment):
    a = {**GOOD_GEMM_BOUNDARY, **override}
    lib = kernels.load_library()
    assert lib.awqe_gemm_residual_norm_f16(a["x"], a["packed"], a["bias"], a["y"], a["N"], a["K"], a["block_size"],
                                           a["out_norm"], a["h"], a["next_norm"], a["x_out"], a["eps"], a["ticket"],
                                           None) == kernels.INVALID_ARGUMENT
    assert fragment in lib.awqe_last_error().decode()


GOOD_RESIDUAL_NORM = dict(y=ALIGNED, out_norm=ALIGNED, h=ALIGNED * 2, next_norm=ALIGNED, x=ALIGNED * 4, rows=2,
                          dim=640, eps=1e-6)


@needs_library
@pytest.mark.parametrize("override, fragment", [
    (dict(dim=641), "even dim"),
    (dict(rows=-1), "even dim"),
    (dict(eps=float("inf")), "finite"),
    (dict(eps=-1.0), "finite"),
    (dict(h=ALIGNED * 2 + 4), "8-byte aligned"),
    (dict(next_norm=None), "must be non-null"),
    (dict(y=ALIGNED + 2), "4-byte aligned where given"),
    (dict(x=ALIGNED * 2 + 8), "overlap"),      # inside h
    (dict(x=ALIGNED + 1280), "overlap"),        # the second half of y's two rows
])
def test_residual_norm_rejects_bad_arguments_before_any_cuda_call(override, fragment):
    a = {**GOOD_RESIDUAL_NORM, **override}
    lib = kernels.load_library()
    assert lib.awqe_residual_norm_f16(a["y"], a["out_norm"], a["h"], a["next_norm"], a["x"], a["rows"], a["dim"],
                                      a["eps"], None) == kernels.INVALID_ARGUMENT
    assert fragment in lib.awqe_last_error().decode()
    # no rows: nothing to check beyond the arguments, no CUDA call
    b = {**GOOD_RESIDUAL_NORM, "rows": 0}
    assert lib.awqe_residual_norm_f16(b["y"], b["out_norm"], b["h"], b["next_norm"], b["x"], 0, b["dim"], b["eps"],
                                      None) == kernels.OK


@needs_library
@pytest.mark.parametrize("q_norm, k_norm, eps, softcap, fragment", [
    (ALIGNED, None, 1e-6, 0.0, "both be given"),
    (ALIGNED, ALIGNED + 1, 1e-6, 0.0, "both be given"),
    (ALIGNED, ALIGNED, float("inf"), 0.0, "finite eps"),
    (None, None, 0.0, float("inf"), "softcap must be finite"),
    (None, None, 0.0, -1.0, "softcap must be finite"),
])
def test_attention_with_head_norms_rejects_bad_arguments_before_any_cuda_call(q_norm, k_norm, eps, softcap, fragment):
    lib = kernels.load_library()
    ws = lib.awqe_attention_workspace_bytes(8, 128, 512)
    status = lib.awqe_decode_attention_ex_f16(ALIGNED, ALIGNED, ALIGNED, ALIGNED, ALIGNED, ALIGNED, ALIGNED, 8, 2, 128,
                                              512, 0, 0.088, q_norm, k_norm, eps, softcap, 0, ALIGNED, ws, None)
    assert status == kernels.INVALID_ARGUMENT
    assert fragment in lib.awqe_last_error().decode()


@needs_library
@pytest.mark.parametrize("span", [-1, 513])
def test_attention_rejects_a_span_outside_the_cache_before_any_cuda_call(span):
    lib = kernels.load_library()
    ws = lib.awqe_attention_workspace_bytes(8, 128, 512)
    status = lib.awqe_decode_attention_ex_f16(ALIGNED, ALIGNED, ALIGNED, ALIGNED, ALIGNED, ALIGNED, ALIGNED, 8, 2, 128,
                                              512, 0, 0.088, None, None, 0.0, 0.0, span, ALIGNED, ws, None)
    assert status == kernels.INVALID_ARGUMENT
    assert f"span must be 0 (all of max_len) or 1 .. max_len 512, got {span}" in lib.awqe_last_error().decode()


@needs_library
def test_gemm_with_no_rows_succeeds_without_touching_memory():
    assert call_gemm(kernels.load_library(), M=0) == kernels.OK


@needs_library
@pytest.mark.parametrize("args, fragment", [
    ((ALIGNED, ALIGNED, None, 64, 576, 48, ALIGNED), "block_size"),
    ((None, ALIGNED, None, 64, 576, 64, ALIGNED), "B is null"),
    ((ALIGNED, ALIGNED + 1, None, 64, 576, 64, ALIGNED), "scales"),
    ((ALIGNED, ALIGNED, None, 64, 576, 64, ALIGNED + 2), "packed must"),
])
def test_repack_rejects_bad_arguments_before_any_cuda_call(args, fragment):
    lib = kernels.load_library()
    assert lib.awqe_repack_matmul_nbits(*args, None) == kernels.INVALID_ARGUMENT
    assert fragment in lib.awqe_last_error().decode()


def test_missing_library_error_says_to_build_it(tmp_path):
    with pytest.raises(AwqEdgeError, match="make plugins"):
        kernels.load_library(str(tmp_path / "libawq_edge_kernels.so"))


def test_gemm_refuses_cpu_activations():
    w = kernels.PackedInt4(torch.empty(0, dtype=torch.uint8), n=64, k=576, block_size=64)
    with pytest.raises(AwqEdgeError, match="fp16 CUDA tensor"):
        kernels.gemm(torch.zeros(1, 576, dtype=torch.float16), w)


def random_layer(n, k, block_size, zero_point, device, gen):
    """A quantised random layer: its MatMulNBits tensors on `device` and its float64 weights."""
    q, scales, zeros = quantize(torch.randn(n, k, generator=gen), QConfig(4, block_size, zero_point))
    mm = to_matmul_nbits(q, scales, zeros, block_size, 4)
    w64 = dequantize(q, scales, zeros, block_size).double()
    zp = mm["zero_points"].to(device) if zero_point else None  # symmetric: every zero point is the default 8
    return mm["B"].to(device), mm["scales"].half().to(device), zp, w64.to(device)


def relative_error(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


# SmolLM2-135M's linears (N x K): q/o 576 x 576, k/v 192 x 576, gate/up 1536 x 576, down 576 x 1536;
# 200 x 584 has a ragged last tile and a K that is not a multiple of 64.
GPU_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (200, 584)]


@needs_library
@needs_gpu
@pytest.mark.parametrize("n, k", GPU_SHAPES)
@pytest.mark.parametrize("block_size", kernels.BLOCK_SIZES)
@pytest.mark.parametrize("zero_point", [True, False])
def test_gemm_matches_float64_reference(n, k, block_size, zero_point):
    gen = torch.Generator().manual_seed(n * 1000 + k + block_size + zero_point)
    dev = torch.device("cuda")
    b, scales, zp, w64 = random_layer(n, k, block_size, zero_point, dev, gen)
    w = kernels.repack_matmul_nbits(b, scales, zp, k, block_size)
    for m, with_bias in [(1, False), (1, True), (3, True), (8, False), (9, True), (16, False), (40, True)]:
        x = torch.randn(m, k, generator=gen).half().to(dev)  # fresh inputs for every check
        bias = torch.randn(n, generator=gen).half().to(dev) if with_bias else None
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device=dev)
        y = kernels.gemm(x, w, bias, out=out)
        ref = x.double() @ w64.T + (bias.double() if with_bias else 0)
        assert torch.isfinite(y).all(), f"M={m}: unwritten or non-finite outputs"
        assert relative_error(y, ref) < 2e-3, f"M={m} bias={with_bias}"


@needs_library
@needs_gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gemm_agrees_with_reference_for_every_warp_split(m):
    gen = torch.Generator().manual_seed(m)
    dev = torch.device("cuda")
    b, scales, zp, w64 = random_layer(256, 4160, 128, True, dev, gen)  # 66 chunks: uneven splits and a K tail
    w = kernels.repack_matmul_nbits(b, scales, zp, 4160, 128)
    for warps in (1, 2, 4, 8):
        x = torch.randn(m, 4160, generator=gen).half().to(dev)
        y = kernels.gemm(x, w, out=torch.full((m, 256), float("nan"), dtype=torch.float16, device=dev),
                         warps_per_tile=warps)
        assert torch.isfinite(y).all() and relative_error(y, x.double() @ w64.T) < 2e-3, f"{warps=}"


@needs_library
def test_dequantize_rejects_bad_arguments_before_any_cuda_call():
    lib = kernels.load_library()
    assert lib.awqe_dequantize_f16(ALIGNED, 64, 576, 64, ALIGNED + 1, None) == kernels.INVALID_ARGUMENT
    assert "w must" in lib.awqe_last_error().decode()
    assert lib.awqe_dequantize_f16(ALIGNED, 64, 576, 96, ALIGNED, None) == kernels.INVALID_ARGUMENT


@needs_library
@needs_gpu
@pytest.mark.parametrize("block_size", kernels.BLOCK_SIZES)
@pytest.mark.parametrize("zero_point", [True, False])
def test_dequantize_gives_the_fp16_rounding_of_the_float64_weights(block_size, zero_point):
    gen = torch.Generator().manual_seed(block_size + zero_point)
    b, scales, zp, w64 = random_layer(200, 584, block_size, zero_point, torch.device("cuda"), gen)
    w = kernels.repack_matmul_nbits(b, scales, zp, 584, block_size)
    out = kernels.dequantize(w, out=torch.full((200, 584), float("nan"), dtype=torch.float16, device="cuda"))
    assert torch.equal(out, w64.half())  # (q - zero) * scale is exact in fp32, so one rounding to fp16


@needs_library
@needs_gpu
def test_gemm_reports_a_misaligned_activation_as_invalid_argument():
    gen = torch.Generator().manual_seed(0)
    b, scales, zp, _ = random_layer(64, 576, 64, True, torch.device("cuda"), gen)
    w = kernels.repack_matmul_nbits(b, scales, zp, 576, 64)
    x = torch.randn(577, dtype=torch.float16, device="cuda")[1:].reshape(1, 576)  # 2-byte offset
    with pytest.raises(kernels.KernelError, match="x must be a non-null, 16-byte aligned") as err:
        kernels.gemm(x, w)
    assert err.value.status == kernels.INVALID_ARGUMENT
