"""bench/boundary.py and bench/boundary.cu: the options and the table on the CPU, the CUDA program compiled and its
option errors where nvcc is, the whole benchmark on a tiny chain on a GPU."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_script

ROOT = Path(__file__).resolve().parents[1]
boundary = bench_script("boundary")


def test_counts_are_comma_separated_non_negative_integers():
    assert boundary.counts("132,1376") == [132, 1376]
    for bad in ("", "1,,2", "a", "-1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            boundary.counts(bad)


def test_the_table_sets_each_mode_side_by_side_with_the_best_flag_chain_against_pdl():
    rows = [{"mode": m, "blocks": 132, "work_ns": 2000, "us_per_kernel": us + 0.1, "us_per_added_kernel": us,
             "boundary_us": us - 2, "errors": e, "replays": 8}
            for m, us, e in (("plain", 6.0, 0), ("pdl", 4.0, 0), ("flag", 10.0, 0), ("flag_pad", 9.0, 0),
                             ("flag_late", 3.2, 1), ("flag_late_pad", 3.5, 0))]
    md = boundary.table({"device": "GPU X", "command": "python -P bench/boundary.py", "kernels": 64, "reps": 3,
                         "rows": rows})
    assert "GPU X" in md
    assert "| blocks | busy us | plain | pdl | flag | flag_pad | flag_late | flag_late_pad | best flag vs pdl |" in md
    # flag_late added least but counted an error, so flag_late_pad is the best flag mode
    assert "| 132 | 2 | 4.00 | 2.00 | 8.00 | 7.00 | 1.20 | 1.50 | flag_late_pad 1.143x | flag_late 1 |" in md
    # a run without the flag modes (before sm_90: plain only) has no empty columns and no ratio
    md = boundary.table({"device": "GPU Y", "command": "c", "kernels": 64, "reps": 3, "rows": rows[:1]})
    assert "| blocks | busy us | plain | best flag vs pdl | errors |" in md and "| 132 | 2 | 4.00 |  | 0 |" in md


def test_the_table_names_the_modes_of_the_cuda_program_in_its_order():
    source = (ROOT / "bench" / "boundary.cu").read_text()
    names = source.split("kModeNames[] = {", 1)[1].split("}", 1)[0]
    assert tuple(n.strip().strip('"') for n in names.split(",")) == boundary.MODES


def test_bad_options_stop_before_any_build():
    for argv in (["--kernels", "3"], ["--blocks", "0"], ["--work-ns", "x"]):
        proc = subprocess.run([sys.executable, "-P", "bench/boundary.py", *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc (CUDA toolkit) to compile bench/boundary.cu")
def test_the_cuda_program_compiles_and_refuses_unknown_options(tmp_path):
    exe = tmp_path / "boundary"
    proc = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", str(ROOT / "bench" / "boundary.cu"), "-o",
                           str(exe)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for argv, message in ((["--bogus", "1"], "unknown option --bogus"), (["--blocks", "1,x"], "'1,x' is not"),
                          (["--kernels", "3"], "--kernels >= 4")):
        run = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, run.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or not shutil.which("nvcc"), reason="needs an NVIDIA GPU and nvcc")
def test_the_benchmark_runs_a_tiny_chain_on_the_gpu(tmp_path):
    out = tmp_path / "boundary"
    proc = subprocess.run([sys.executable, "-P", "bench/boundary.py", "--kernels", "4", "--reps", "3", "--blocks",
                           "2,300", "--work-ns", "0,1000", "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.with_name("boundary.json").read_text())
    modes = boundary.MODES if torch.cuda.get_device_capability(0) >= (9, 0) else ("plain",)
    assert sorted((r["blocks"], r["work_ns"], r["mode"]) for r in result["rows"]) == sorted(
        (b, w, m) for b in (2, 300) for w in (0, 1000) for m in modes)
    for r in result["rows"]:
        assert r["errors"] == 0 and r["replays"] == 3 + 5  # the timed replays and the warm-up, each advancing the epoch
        assert r["us_per_kernel"] > r["work_ns"] * 1e-3 and r["us_per_added_kernel"] > 0
    assert result["device"] == torch.cuda.get_device_name(0)
    assert out.with_name("boundary.md").read_text().startswith("# Kernel boundaries in a CUDA graph on ")
