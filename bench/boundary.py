"""What a kernel boundary costs in a CUDA graph of dependent kernels (bench/NOTES.md, r22): builds bench/boundary.cu
with nvcc for this GPU, runs it, and writes its rows with the command, as JSON and a Markdown table.

A chain of launches of one kernel (one-warp blocks, each busy for a set time once its dependency resolves) resolved
three ways: plain stream order, programmatic dependent launch with griddepcontrol.wait (the decode step today), and a
flag chain (each block spins on a counter the previous launch's blocks increment), the last in four forms (r24:
counters adjacent or a line apart, dependents triggered at entry or after the poll). The boundary: what a launch adds
to the graph (graphs of `kernels` and kernels / 2 launches, so the gap between replays cancels) less the busy time.
Every block checks the word the launch before it wrote, so a chain that let a kernel run early shows errors.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from awq_edge.outputs import write_atomic  # noqa: E402

SOURCE = ROOT / "bench" / "boundary.cu"


def counts(text: str) -> list:
    """A comma-separated list of non-negative integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': counts are integers >= 0")
    return values


def build(nvcc: str, arch: str, work: Path) -> Path:
    exe = work / "boundary"
    proc = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}", str(SOURCE), "-o", str(exe)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/boundary.py: nvcc failed to build {SOURCE.name}:\n{proc.stderr[-2000:]}")
    return exe


MODES = ("plain", "pdl", "flag", "flag_pad", "flag_late", "flag_late_pad")  # boundary.cu's kModeNames, in order


def table(result: dict) -> str:
    """Per blocks and busy time: each mode's boundary (us a launch adds less the busy time) side by side, the flag
    mode without errors that adds least, with pdl's time a launch over its own, and each mode's errors."""
    modes = [m for m in MODES if any(r["mode"] == m for r in result["rows"])]
    lines = [f"# Kernel boundaries in a CUDA graph on {result['device']}", "",
             f"`{result['command']}`: graphs of {result['kernels']} and {result['kernels'] // 2} launches, "
             f"{result['reps']} replays each; the boundary in us: what a launch adds (the difference over the "
             "launches between them) less the busy time. pad: counters 128 bytes apart; late: launch_dependents "
             "after the poll.", "",
             "| blocks | busy us | " + " | ".join(modes) + " | best flag vs pdl | errors |",
             "| --- | --- | " + " | ".join("---" for _ in modes) + " | --- | --- |"]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["blocks"], r["work_ns"]), {})[r["mode"]] = r
    for (blocks, work), m in by.items():
        cells = [f"{m[mode]['boundary_us']:.2f}" if mode in m else "" for mode in modes]
        flags = [(r["us_per_added_kernel"], mode) for mode, r in m.items()
                 if mode.startswith("flag") and not r["errors"]]
        ratio = (f"{min(flags)[1]} {m['pdl']['us_per_added_kernel'] / min(flags)[0]:.3f}x"
                 if "pdl" in m and flags else "")
        errors = ", ".join(f"{mode} {r['errors']}" for mode, r in m.items() if r["errors"]) or "0"
        lines.append(f"| {blocks} | {work / 1000:g} | " + " | ".join(cells) + f" | {ratio} | {errors} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=64, help="launches in the longer graph (>= 4)")
    parser.add_argument("--reps", type=int, default=200, help="graph replays timed")
    parser.add_argument("--blocks", type=counts, default=[132, 768, 1376],
                        help="blocks a launch, comma list (132: one a SM on an H100; 768 and 1376: Llama-2-7B's qkv "
                             "and gate/up tiles)")
    parser.add_argument("--work-ns", type=counts, default=[0, 2000, 8000], help="each block's busy time, comma list")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "boundary",
                        help="results stem: writes STEM.json and STEM.md")
    args = parser.parse_args()
    if args.kernels < 4 or args.reps < 1 or min(args.blocks) < 1:
        parser.error("--kernels >= 4, --reps >= 1 and --blocks >= 1")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("bench/boundary.py: nvcc not found; put the CUDA toolkit's bin on PATH")
    import torch  # only here: the argument errors above need no torch

    if not torch.cuda.is_available():
        sys.exit("bench/boundary.py: no CUDA GPU; run it on the GPU machine")
    major, minor = torch.cuda.get_device_capability(0)
    command = "python -P bench/boundary.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as work:
        exe = build(nvcc, f"sm_{major}{minor}", Path(work))
        try:
            proc = subprocess.run([str(exe), "--kernels", str(args.kernels), "--reps", str(args.reps), "--blocks",
                                   ",".join(map(str, args.blocks)), "--work-ns", ",".join(map(str, args.work_ns))],
                                  capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            sys.exit("bench/boundary.py: the benchmark ran past 30 minutes (a flag chain that never resolves?); "
                     "fewer --reps or --blocks")
    if proc.returncode != 0:
        sys.exit(f"bench/boundary.py: the benchmark failed: {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout)
    result.update(command=command, arch=f"sm_{major}{minor}", what=__doc__.split("\n\n")[1].replace("\n", " "))
    md = table(result)
    print(md)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", md)):
        write_atomic(args.out.with_name(args.out.name + suffix), text.encode())
    if any(r["errors"] for r in result["rows"]):
        sys.exit("bench/boundary.py: a launch read its predecessor's word before it was written (errors above)")
    if stuck := [r for r in result["rows"] if r["replays"] != args.reps + 5]:  # + the 5 warm-up replays
        sys.exit(f"bench/boundary.py: the epoch did not advance once a replay ({stuck[0]['mode']}, "
                 f"{stuck[0]['blocks']} blocks: {stuck[0]['replays']} for {args.reps + 5}), so the error check "
                 "could not see an early start")


if __name__ == "__main__":
    main()
