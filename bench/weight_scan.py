"""Time and memory of the quantiser's weight scan (FileModel.check_weights: every stored tensor finite and of a
sane size, before any work) on a random float folder of a model's shape, on this machine's CPU.

Writes bench/results/weight_scan.json. Usage: python -P bench/weight_scan.py --work DIR [--models llama3-8b]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ off sys.path (a script run without -P puts it first, and its files would shadow packages: transformers
# imports `kernels`), the repository on it: siblings come as bench.NAME.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench import quantize_scale  # noqa: E402
# tiny: a shape that runs in a second (tests/test_bench_weight_scan.py); head size 128 (hidden / heads)
SHAPES = {**quantize_scale.SHAPES, "tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                                rope_theta=10000.0)}
# In a child process, so its peak RSS is the loader's and the scan's alone (not the folder's writing; VmHWM, since
# ru_maxrss keeps the parent's across exec).
_SCAN = """
import json, sys, time
from pathlib import Path
from awq_edge.arch import get_adapter
from awq_edge.quantizer.api import peak_rss_gib
from awq_edge.quantizer.layer_loader import FileModel
fm = FileModel(Path(sys.argv[1]), get_adapter("llama"))
before = peak_rss_gib()
times = []
for _ in range(2):
    t0 = time.perf_counter()
    fm.check_weights()
    times.append(round(time.perf_counter() - t0, 2))
print(json.dumps({"scan_s": times, "peak_rss_gib_before": round(before, 2),
                  "peak_rss_gib_after": round(peak_rss_gib(), 2)}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="llama3-8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache" / "awq-edge" / "smollm2-135m-f16"),
                    help="folder with tokenizer files to put beside the weights (SmolLM2's, ids < 49152)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight_scan.json"))
    args = ap.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        folder = Path(args.work) / model
        quantize_scale.write_random_model(model, folder, Path(args.tokenizer), shape=SHAPES[model])
        proc = subprocess.run([sys.executable, "-c", _SCAN, str(folder)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        bytes_ = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows.append({"model": model, "weights_gib": round(bytes_ / 2**30, 2), **json.loads(proc.stdout.splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "command": " ".join(["python", "-P", "bench/weight_scan.py", *(argv if argv is not None else sys.argv[1:])])}
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
