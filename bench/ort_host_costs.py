"""The host's share of our onnxruntime loop's decode step: what `awq-edge generate` pays outside onnxruntime's run.

Two parts, on the machine it runs on:
- the argmax of one row of logits at given vocabulary sizes, fp16 as the GPU export writes them: numpy's argmax of
  a float32 copy (what a step did before OrtDecoder.greedy_tokens) against awq_edge.runtime.ort.argmax (ordered
  int16 keys), medians of many calls on a row in cache;
- on an exported folder: the greedy loop's step time, the part inside onnxruntime's run, and the rest (ours), as
  bench/onnx_gpu.py times it, for the bound step and the fixed-buffer step without a CUDA graph, and (CUDA) the
  default, those replayed as CUDA graphs.
Writes OUT.json.

  python -P bench/ort_host_costs.py --folder EXPORT [--provider cpu|cuda] [--vocab 49152,128256] --out OUT
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from awq_edge.export.folder import read_export_info  # noqa: E402
from awq_edge.runtime.ort import argmax  # noqa: E402
from bench.onnx_gpu import gpu_name, time_ort, timed_decoder  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    """Median over 5 batches of `calls` calls, us a call."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def argmax_costs(vocab: int, calls: int) -> dict:
    row = (np.random.default_rng(0).standard_normal(vocab) * 4).astype(np.float16)
    assert argmax(row) == int(np.argmax(row.astype(np.float32)))
    return {"float32_copy_and_argmax_us": per_call_us(lambda: np.argmax(row.astype(np.float32)), calls),
            "int16_keys_us": per_call_us(lambda: argmax(row), calls)}


def step_costs(folder: str, provider: str, prompt: int, new: int, rounds: int) -> dict:
    ids = list(range(100, 100 + prompt))
    out = {}
    loops = [("bound", {"cuda_graph": False}), ("fixed", {"fixed_buffers": True, "cuda_graph": False})]
    if provider == "cuda":  # the default there: the fixed buffers' steps replayed as CUDA graphs
        loops.append(("graph", {}))
    for label, kw in loops:
        dec = timed_decoder(folder, provider=provider, **kw)
        runs = [time_ort(dec, ids, new) for _ in range(rounds + 1)][1:]  # one warm-up round
        step = statistics.median(1e6 / r[1] for r in runs)
        inside = statistics.median(1e6 * r[3] for r in runs)
        out[label] = {"step_us": step, "inside_run_us": inside, "outside_run_us": step - inside,
                      "cuda_graph": all(r[4] for r in runs)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True, help="an `awq-edge export` folder")
    ap.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--vocab", default="49152,128256", help="vocabulary sizes for the argmax part")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = {"command": "python -P " + " ".join(sys.argv), "device": gpu_name(args.provider), "host": platform.platform(),
           "processor": platform.processor() or platform.machine(), "provider": args.provider,
           "export": read_export_info(Path(args.folder)),
           "argmax": {v: argmax_costs(int(v), args.calls) for v in args.vocab.split(",")},
           "step": step_costs(args.folder, args.provider, args.prompt, args.new, args.rounds)}
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
