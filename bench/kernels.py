"""Build, check and time the int4 kernels against torch's int4 kernel, fp16 cuBLAS and a device copy (one GPU run)."""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from awq_edge.outputs import write_atomic
from awq_edge.packing import from_matmul_nbits
from awq_edge.runtime import kernels

REPO = Path(__file__).resolve().parent.parent
# Llama-2-7B / Llama-3-8B linears, N x K: attention, MLP up/gate, MLP down, fused QKV (GQA).
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (6144, 4096)]
MS = [1, 4, 8, 16]
GROUP = 128  # torch's int4 kernel is compared at the same group size
PREFILL_MS = [64, 512]  # beyond the GEMV's range: slices of 16 rows, for comparison with cuBLAS only
WARP_SWEEP = [0, 1, 2, 4, 8]  # warps per tile at M = 1 and 16; 0 = the library's own choice


def parse_shapes(text: str) -> list:
    """'NxK,NxK' -> [(N, K), ...]; K a multiple of the group size 128 (torch's int4 kernel needs it too)."""
    shapes = []
    for piece in text.split(","):
        try:
            n, k = (int(v) for v in piece.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{piece!r} is not N x K, e.g. 4096x4096") from None
        if n < 8 or n % 8 or k < GROUP or k % GROUP:
            raise argparse.ArgumentTypeError(f"{piece}: N must be a multiple of 8 and K of {GROUP}")
        shapes.append((n, k))
    return shapes


def build(arch: str) -> None:
    build_dir = REPO / "plugins" / "build"
    subprocess.run(["cmake", "-S", str(REPO / "plugins"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_CUDA_ARCHITECTURES={arch}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", "16"], check=True, stdout=subprocess.DEVNULL)


def time_per_call(step, n_sets: int, min_calls: int = 32, reps: int = 20) -> float:
    """Median seconds per call of step(i), i cycling over n_sets, from CUDA events around graph replays.

    A graph of many calls keeps Python and launch overhead out of microsecond kernels; cycling over sets
    larger than L2 makes every call read its weights from device memory.
    """
    calls = n_sets * math.ceil(min_calls / n_sets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: module load, handles, autotuning happen outside the graph
        for i in range(2 * n_sets):
            step(i % n_sets)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i % n_sets)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    # Replays for about 50 ms before timing: in v4a the first timing after a pause ran up to 15% slow.
    for _ in range(max(3, math.ceil(50 / start.elapsed_time(end)))):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e-3 / calls


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy: the ceiling for streaming kernels."""
    src = torch.randn(512 * 2**20, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    t = time_per_call(lambda i: dst.copy_(src), 1, min_calls=5)
    return 2 * src.numel() * 2 / t


def read_bandwidth() -> float:
    """Bytes read per second by a 1 GiB sum: what a kernel that only reads can reach."""
    src = torch.randn(512 * 2**20, dtype=torch.float16, device="cuda")
    return src.numel() * 2 / time_per_call(lambda i: src.sum(dtype=torch.float32), 1, min_calls=5)


def launch_floor() -> float:
    """Seconds per call of our kernel on a 16 x 64 weight: the fixed cost every call pays in a graph."""
    b, scales, zp = random_matmul_nbits(16, 64, 64)
    w = kernels.repack_matmul_nbits(b, scales, zp, 64, 64)
    x = torch.randn(1, 64, dtype=torch.float16, device="cuda")
    y = torch.empty(1, 16, dtype=torch.float16, device="cuda")
    return time_per_call(lambda i: kernels.gemm(x, w, out=y), 1)


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    return 2 * 8192**3 / time_per_call(lambda i: a @ b, 1, min_calls=5, reps=10)


def matmul_nbits_bytes(n: int, k: int, bs: int) -> int:
    """Weight + scale + zero-point bytes of the MatMulNBits format: the least any int4 kernel must read."""
    nb = math.ceil(k / bs)
    return n * nb * bs // 2 + n * nb * 2 + n * math.ceil(nb / 2)


def n_sets_for(set_bytes: int, l2: int) -> int:
    return max(2, math.ceil(2.5 * l2 / set_bytes))


def random_matmul_nbits(n: int, k: int, bs: int):
    nb = math.ceil(k / bs)
    b = torch.randint(0, 256, (n, nb, bs // 2), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n * nb, device="cuda") * 0.02 + 0.001).half()
    zp = torch.randint(0, 256, (n * math.ceil(nb / 2),), dtype=torch.uint8, device="cuda")
    return b, scales, zp


def check_shape(n: int, k: int, bs: int, gen: torch.Generator) -> dict:
    """Relative error against a float64 reference, fresh inputs, NaN-poisoned outputs, M in MS."""
    b, scales, zp = random_matmul_nbits(n, k, bs)
    w = kernels.repack_matmul_nbits(b, scales, zp, k, bs)
    q, s, z = from_matmul_nbits(b, scales.float(), zp, k, bs, 4)
    w64 = ((q.double() - z.double().repeat_interleave(bs, 1)[:, :k]) * s.double().repeat_interleave(bs, 1)[:, :k])
    errors = {}
    for m in MS:
        x = torch.randn(m, k, generator=gen).half().cuda()
        y = kernels.gemm(x, w, out=torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda"))
        ref = x.double() @ w64.T
        errors[m] = float("nan") if not torch.isfinite(y).all() else ((y.double() - ref).norm() / ref.norm()).item()
    return errors


def time_shape(n: int, k: int, l2: int) -> dict:
    out = {"ours": {}, "ours_warps": {}, "torch_int4": {}, "cublas_f16": {}, "dequant_cublas": {}}
    # ours: repacked MatMulNBits weights
    sets = n_sets_for(matmul_nbits_bytes(n, k, GROUP), l2)
    packed = [kernels.repack_matmul_nbits(*random_matmul_nbits(n, k, GROUP), k, GROUP) for _ in range(sets)]
    for m in MS:
        xs = [torch.randn(m, k, dtype=torch.float16, device="cuda") for _ in range(sets)]
        y = torch.empty(m, n, dtype=torch.float16, device="cuda")
        by_warps = {w: time_per_call(lambda i: kernels.gemm(xs[i], packed[i], out=y, warps_per_tile=w), sets)
                    for w in (WARP_SWEEP if m in (1, 16) else [0])}
        out["ours"][m] = by_warps[0]
        if len(by_warps) > 1:
            out["ours_warps"][m] = by_warps
    dense = torch.empty(n, k, dtype=torch.float16, device="cuda")
    for m in PREFILL_MS:
        xs = [torch.randn(m, k, dtype=torch.float16, device="cuda") for _ in range(sets)]
        y = torch.empty(m, n, dtype=torch.float16, device="cuda")
        out["ours"][m] = time_per_call(lambda i: kernels.gemm(xs[i], packed[i], out=y), sets)
        out["dequant_cublas"][m] = time_per_call(
            lambda i: torch.mm(xs[i], kernels.dequantize(packed[i], out=dense).T, out=y), sets)
    del dense
    out["ours_sets"], out["ours_packed_bytes"] = sets, packed[0].data.numel()
    del packed
    # torch's tinygemm int4 kernel: bf16 activations, bf16 scales and zeros per group of 128
    int4_bytes = n * k // 2 + (k // GROUP) * n * 2 * 2
    sets = n_sets_for(int4_bytes, l2)
    w4 = [torch.ops.aten._convert_weight_to_int4pack(
        torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"), 8) for _ in range(sets)]
    sz = [(torch.rand(k // GROUP, n, 2, device="cuda") * 0.02).bfloat16() for _ in range(sets)]
    for m in MS:
        xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
        out["torch_int4"][m] = time_per_call(
            lambda i: torch.ops.aten._weight_int4pack_mm(xs[i], w4[i], GROUP, sz[i]), sets)
    out["torch_int4_sets"], out["torch_int4_bytes"] = sets, int4_bytes
    del w4, sz
    # fp16 cuBLAS through F.linear
    sets = n_sets_for(2 * n * k, l2)
    w16 = [torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02 for _ in range(sets)]
    for m in MS + PREFILL_MS:
        xs = [torch.randn(m, k, dtype=torch.float16, device="cuda") for _ in range(sets)]
        out["cublas_f16"][m] = time_per_call(lambda i: F.linear(xs[i], w16[i]), sets)
    out["cublas_f16_sets"] = sets
    del w16
    torch.cuda.empty_cache()
    return out


def summarize(n: int, k: int, timing: dict, copy_bw: float, tc_flops: float) -> list[dict]:
    """Per M: the two floors, each kernel's time and bandwidth, and the ratios from this one run."""
    nbytes = matmul_nbits_bytes(n, k, GROUP)
    rows = []
    for m in MS:
        ours, int4, f16 = timing["ours"][m], timing["torch_int4"][m], timing["cublas_f16"][m]
        rows.append({
            "M": m, "floor_bytes_s": (nbytes + 2 * m * (n + k)) / copy_bw, "floor_flops_s": 2 * m * n * k / tc_flops,
            "ours_s": ours, "ours_GBps": nbytes / ours / 1e9,
            "ours_packed_GBps": timing["ours_packed_bytes"] / ours / 1e9, "ours_frac_of_copy": nbytes / ours / copy_bw,
            "torch_int4_s": int4, "torch_int4_GBps": timing["torch_int4_bytes"] / int4 / 1e9,
            "cublas_f16_s": f16, "cublas_f16_GBps": 2 * n * k / f16 / 1e9,
            "speedup_vs_torch_int4": int4 / ours, "speedup_vs_cublas_f16": f16 / ours,
            "ours_by_warps_s": timing["ours_warps"].get(m),
        })
    return rows


def print_table(result: dict) -> None:
    print(f"\n{result['label']} on {result['device']}: copy {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s "
          f"(read+write), read {result['read_bandwidth_Bps'] / 1e12:.2f} TB/s, fp16 matmul "
          f"{result['f16_matmul_flops'] / 1e12:.0f} TFLOP/s, launch floor {result['launch_floor_s'] * 1e6:.1f} us")
    print(f"{'N x K':>12} {'M':>3} {'floor us':>8} {'ours us':>8} {'GB/s':>6} {'%copy':>6} {'int4 us':>8} "
          f"{'x int4':>6} {'f16 us':>8} {'x f16':>6}  us by warps per tile (auto, 1, 2, 4, 8)")
    for s in result["shapes"]:
        for r in s["rows"]:
            sweep = " ".join(f"{t * 1e6:.1f}" for t in r["ours_by_warps_s"].values()) if r["ours_by_warps_s"] else ""
            print(f"{s['N']:>6}x{s['K']:<5} {r['M']:>3} {r['floor_bytes_s'] * 1e6:8.1f} {r['ours_s'] * 1e6:8.1f} "
                  f"{r['ours_GBps']:6.0f} {100 * r['ours_frac_of_copy']:5.0f}% {r['torch_int4_s'] * 1e6:8.1f} "
                  f"{r['speedup_vs_torch_int4']:6.2f} {r['cublas_f16_s'] * 1e6:8.1f} {r['speedup_vs_cublas_f16']:6.2f}"
                  f"  {sweep}")
    print("prefill, us: slices of 16 rows / dequantise + fp16 cuBLAS / fp16 cuBLAS alone")
    for s in result["shapes"]:
        print(f"{s['N']:>6}x{s['K']:<5} " + "   ".join(
            f"M={m}: {p['ours_s'] * 1e6:.0f} / {p['dequant_cublas_s'] * 1e6:.0f} / {p['cublas_f16_s'] * 1e6:.0f}"
            for m, p in s["prefill"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", metavar="ARCH", help="build plugins/build for this CUDA arch first, e.g. 90-real")
    ap.add_argument("--label", default="dev", help="kernel version named in the results")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kernels.json")
    ap.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                    help="comma list of N x K weight shapes, e.g. 37888x3584,3584x18944 (default: the Llama-2-7B / "
                         "Llama-3-8B linears); K a multiple of 128")
    args = ap.parse_args()
    t0 = time.time()
    if args.build:
        build(args.build)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    copy_bw, tc_flops = copy_bandwidth(), matmul_flops()
    result = {
        "label": args.label, "device": props.name, "sm_count": props.multi_processor_count, "l2_bytes": l2,
        "torch": torch.__version__, "group_size": GROUP, "copy_bandwidth_Bps": copy_bw, "f16_matmul_flops": tc_flops,
        "read_bandwidth_Bps": read_bandwidth(), "launch_floor_s": launch_floor(),
        "timing": "median per call over 20 CUDA-event-timed graph replays, each of >= 32 calls cycling over "
                  "weight sets totalling >= 2.5x L2",
        "shapes": [], "command": " ".join(["python -P bench/kernels.py", *sys.argv[1:]]),
    }
    gen = torch.Generator().manual_seed(0)
    for n, k in args.shapes:
        errors = {bs: check_shape(n, k, bs, gen) for bs in kernels.BLOCK_SIZES}
        timing = time_shape(n, k, l2)
        result["shapes"].append({
            "N": n, "K": k, "matmul_nbits_bytes": matmul_nbits_bytes(n, k, GROUP), "rel_error": errors,
            "rows": summarize(n, k, timing, copy_bw, tc_flops),
            "prefill": {m: {"ours_s": timing["ours"][m], "dequant_cublas_s": timing["dequant_cublas"][m],
                            "cublas_f16_s": timing["cublas_f16"][m]} for m in PREFILL_MS},
            "sets": {key: timing[key] for key in timing if key.endswith("_sets")},
        })
        print(f"{n}x{k} done, max rel error {max(max(e.values()) for e in errors.values()):.2e}", flush=True)
    result["wall_s"] = time.time() - t0
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print_table(result)


if __name__ == "__main__":
    main()
