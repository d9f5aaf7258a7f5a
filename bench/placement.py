"""Where a batch-1 GEMV's blocks run, and when (bench/NOTES.md, r15): needs a kernel library built with
-DAWQE_PROBE_PLACEMENT, whose M = 1 GEMV records per block its SM and %globaltimer at entry, when its wait for the
kernel before returned and when its sums were done (awq_edge_kernels.h, awqe_probe_placement).

Each probed shape is the last launch of a CUDA graph of GEMVs chained as the decode step chains them (programmatic
dependent launch on sm_90): `alone`, the same shape over and over (as bench/kernels.py times it), or `layer`, a
Llama layer's four products in order (qkv, o, gate/up, down), ending with the probed one. Weights cycle over sets
larger than L2, as bench/kernels.py's do. What it reports per launch: blocks per SM, how long after the kernel
before finished its last block started, each SM's idle share of the launch's span, and the tail (the span less the
median SM's end).
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from awq_edge.outputs import write_atomic  # noqa: E402
from awq_edge.runtime import kernels  # noqa: E402
from bench.decode import graph_times  # noqa: E402
from bench.kernels import n_sets_for, matmul_nbits_bytes, parse_shapes, random_matmul_nbits  # noqa: E402

GROUP = 128
# Llama-2-7B's layer (qkv, o, gate/up, down), then Llama-3-8B's qkv and gate/up
SHAPES = "12288x4096,4096x4096,22016x4096,4096x11008,6144x4096,28672x4096"
LAYERS = [[(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],  # Llama-2-7B
          [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]]  # Llama-3-8B


def chain_for(shape: tuple, mode: str, length: int) -> list:
    """The graph's products in launch order, `length` of them, the probed shape last."""
    if mode == "alone":
        return [shape] * length
    layer = next((la for la in LAYERS if shape in la), None)
    if layer is None:
        raise ValueError(f"{shape[0]}x{shape[1]} is in no layer of {LAYERS}: probe it alone")
    end = layer.index(shape)
    return [layer[(end - (length - 1 - i)) % len(layer)] for i in range(length)]


def analyse(records: list, product_s: float, n_sm: int) -> dict:
    """Per-launch figures from the probe's records (tuples of kernels.PROBE_FIELDS) on a GPU of n_sm SMs, times in
    microseconds; product_s: the graph's seconds over its products."""
    rec = [dict(zip(kernels.PROBE_FIELDS, r)) for r in records]
    if not rec or any(r["done_ns"] == 0 for r in rec):
        raise ValueError("a block left no record: the library is not a probe build, or the launch did not run")
    release = min(r["released_ns"] for r in rec)
    end = max(r["done_ns"] for r in rec)
    span = end - release
    per_sm = {}
    for r in rec:
        per_sm.setdefault(r["sm"], []).append(r)
    counts = sorted(len(v) for v in per_sm.values())
    sm_end = {sm: max(r["done_ns"] for r in v) for sm, v in per_sm.items()}
    sm_busy = {sm: max(r["done_ns"] for r in v) - max(release, min(r["entry_ns"] for r in v)) for sm, v in
               per_sm.items()}
    busy = sum(sm_busy.values()) / (n_sm * span) if span else 1.0
    durations = [r["done_ns"] - max(r["entry_ns"], r["released_ns"]) for r in rec]
    cycles = [r["done_cycles"] / (r["done_ns"] - r["entry_ns"]) for r in rec if r["done_ns"] - r["entry_ns"] > 2000]
    by_count = {}
    for sm, v in per_sm.items():
        by_count.setdefault(len(v), []).append(sm_end[sm] - release)
    us = 1e-3
    return {
        "blocks": len(rec),
        "warps_a_block": rec[0]["threads"] // 32,
        "sms_used": len(per_sm),
        "blocks_per_sm": {"min": counts[0], "median": statistics.median(counts), "max": counts[-1]},
        "blocks_per_sm_histogram": {str(c): counts.count(c) for c in sorted(set(counts))},
        "graph_us_per_product": product_s * 1e6,  # the graph's time over its products (layer: their mean)
        "span_us": span * us,
        "early_us": (release - min(r["entry_ns"] for r in rec)) * us,  # first block resident before the release
        "last_entry_us": (max(r["entry_ns"] for r in rec) - release) * us,  # last block's start after it
        "tail_us": (end - statistics.median(sm_end.values())) * us,
        "sm_busy_share": busy,  # of n_sm x span, SMs without a block counted idle
        "block_us": {"p10": _pct(durations, 10) * us, "median": statistics.median(durations) * us,
                     "p90": _pct(durations, 90) * us},
        "sm_end_us_by_blocks": {str(c): statistics.median(v) * us for c, v in sorted(by_count.items())},
        "sm_clock_ghz": statistics.median(cycles) if cycles else None,
    }


def _pct(values: list, p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def probe(shape: tuple, mode: str, length: int, l2: int, reps: int) -> dict:
    chain = chain_for(shape, mode, length)
    shapes = sorted(set(chain))
    sets = {s: n_sets_for(matmul_nbits_bytes(*s, GROUP), l2) for s in shapes}
    weights = {s: [kernels.repack_matmul_nbits(*random_matmul_nbits(*s, GROUP), s[1], GROUP) for _ in range(sets[s])]
               for s in shapes}
    xs = {k: torch.randn(1, k, dtype=torch.float16, device="cuda") for k in {s[1] for s in shapes}}
    ys = {s: torch.empty(1, s[0], dtype=torch.float16, device="cuda") for s in shapes}
    seen = dict.fromkeys(shapes, 0)
    steps = []
    for s in chain:
        steps.append((s, seen[s] % sets[s]))
        seen[s] += 1

    def run():
        for s, i in steps:
            kernels.gemm(xs[s[1]], weights[s][i], out=ys[s])

    launches, blocks = [], _blocks(shape)
    graph_s = statistics.median(graph_times(run, reps, after=lambda: launches.append(kernels.probe_placement(blocks))))
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    runs = [analyse(r, graph_s / len(steps), n_sm) for r in launches]
    mid = sorted(runs, key=lambda r: r["span_us"])[len(runs) // 2]  # the replay of median span
    mid["span_us_all"] = sorted(r["span_us"] for r in runs)
    mid["chain"] = [f"{n}x{k}" for n, k in chain[-4:]]
    return mid


def _blocks(shape: tuple) -> int:
    """Blocks of the M = 1 launch: one a 16-row tile."""
    return math.ceil(shape[0] / 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(SHAPES), help=f"N x K list ({SHAPES})")
    parser.add_argument("--modes", default="alone,layer", help="comma list of alone, layer")
    parser.add_argument("--length", type=int, default=64, help="products in the graph")
    parser.add_argument("--reps", type=int, default=9, help="graph replays read back; the median span's is kept")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in ("alone", "layer")]:
        parser.error(f"--modes: unknown {bad}; choose from alone, layer")
    if "layer" in modes and (alone := [f"{n}x{k}" for n, k in args.shapes if not any((n, k) in la for la in LAYERS)]):
        parser.error(f"--modes layer: {', '.join(alone)} in no Llama layer of this script; probe them with --modes "
                     "alone")
    if not torch.cuda.is_available():
        sys.exit("bench/placement.py: no CUDA GPU; run it on the GPU machine")
    if kernels.probe_placement(1) is None:
        sys.exit(f"bench/placement.py: {kernels.library_path()} has no probe; build it with "
                 "-DCMAKE_CUDA_FLAGS=-DAWQE_PROBE_PLACEMENT and point AWQ_EDGE_KERNELS_LIB at it")
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    result = {"device": props.name, "sm_count": props.multi_processor_count, "label": args.label,
              "what": __doc__.split("\n\n")[1].replace("\n", " "), "probes": []}
    print(f"{props.name}: {'shape':>11} {'mode':>5} {'warps':>5} {'blk/SM':>9} {'us/prod':>7} {'span us':>7} "
          f"{'last in':>7} {'tail us':>7} {'SM busy':>7}")
    for shape in args.shapes:
        for mode in modes:
            r = probe(shape, mode, args.length, l2, args.reps)
            r.update(shape=f"{shape[0]}x{shape[1]}", mode=mode)
            result["probes"].append(r)
            b = r["blocks_per_sm"]
            print(f"{'':{len(props.name) + 1}} {r['shape']:>11} {mode:>5} {r['warps_a_block']:>5} "
                  f"{b['min']:>3}-{b['max']:<5} {r['graph_us_per_product']:7.1f} {r['span_us']:7.1f} "
                  f"{r['last_entry_us']:7.1f} {r['tail_us']:7.1f} {r['sm_busy_share']:7.0%}")
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
