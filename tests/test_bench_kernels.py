"""bench/kernels.py: its shape option on the CPU, and the whole script on one shape on a GPU."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awq_edge.runtime import kernels

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)


def test_shapes_are_n_by_k_with_k_a_multiple_of_the_group():
    assert bench_kernels.parse_shapes("37888x3584,640X1024") == [(37888, 3584), (640, 1024)]
    for bad in ("4096", "4096x4000", "4x4096", "ax128", "4096x4096,"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_kernels.parse_shapes(bad)


@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.library_path().is_file(),
                    reason="needs an NVIDIA GPU and the built kernel library")
def test_the_benchmark_checks_and_times_a_shape_end_to_end(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "kernels.py"), "--shapes", "1536x640",
                           "--label", "test", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["command"].endswith(f"--out {out}") and [(s["N"], s["K"]) for s in r["shapes"]] == [(1536, 640)]
    shape = r["shapes"][0]
    assert max(max(e.values()) for e in shape["rel_error"].values()) < 1e-3
    assert [row["M"] for row in shape["rows"]] == bench_kernels.MS and all(row["ours_s"] > 0 for row in shape["rows"])
