"""bench/plot.py draws its three figures from the stored results."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (pip install .[plot])")
def test_plot_draws_decode_quality_and_quantiser_figures_from_the_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["decode_vs_limit.png", "ppl_vs_size.png", "quantiser_phases.png"]
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
