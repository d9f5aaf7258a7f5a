"""Wall time and peak memory of `awq-edge quantize` on this machine, one subprocess per setting.

Writes bench/results/quantize_cpu.json. Usage: python bench/quantize_cpu.py [--n-samples 8,32] [--threads 2]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(model: str, n: int, method: str, group: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "awq_edge.cli", "quantize", model, "-o", f"{d}/q", "--method", method,
               "--group-size", str(group), "--device", "cpu"] + (["--n-samples", str(n)] if n else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        # ru_maxrss of children is the largest child so far; each setting runs in size order, so it is this one's.
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        meta = json.loads((Path(d) / "q" / "config.json").read_text())["awq_edge"]
    return {"method": method, "group_size": group, "n_samples": n, "seqlen": 512, "threads": threads,
            "wall_seconds": round(wall, 1), "quantize_seconds": meta["quantize_seconds"],
            "peak_rss_mb": round(max(peak, before) / 1024), "command": " ".join(cmd[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-samples", default="8,32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize_cpu.json"))
    args = ap.parse_args()
    env = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "command": " ".join(["python"] + sys.argv),
           "note": "wall includes loading the model and preparing the calibration text; quantize_seconds is the layer loop"}
    rows = []
    settings = [(0, "rtn")] + [(int(v), "awq") for v in args.n_samples.split(",")]
    for n, method in settings:
        rows.append(run_one(args.model, n, method, 64, args.threads))
        print(json.dumps(rows[-1]), flush=True)
        # Written after every row, so a run stopped early keeps what it measured.
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
