"""bench/plot.py draws its three figures from the stored results, each from the files the README cites beside it."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["decode_vs_limit.png", "ppl_vs_size.png", "quantiser_phases.png"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (pip install .[plot])")
def test_plot_draws_decode_quality_and_quantiser_figures_from_the_files_the_readme_cites(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == FIGURES
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    # "wrote OUT/FIGURE from bench/results/A.json, bench/results/B.json", one line per figure
    sources = {Path(m[1]).name: m[2].split(", ") for m in re.finditer(r"^wrote (\S+) from (.+)$", proc.stdout, re.M)}
    assert sorted(sources) == FIGURES
    docs = [ROOT / "README.md", ROOT / "docs" / "results.md"]
    texts = [doc.read_text() for doc in docs if doc.is_file()]
    # A place that shows a figure: a markdown line (a table row, an image line) or an HTML table cell.
    places = [u for text in texts for u in text.splitlines() + re.findall(r"<td>.*?</td>", text, re.S)]
    for figure, files in sources.items():
        assert all(f.startswith("bench/results/") for f in files), files
        # The figure is shown beside the files it is drawn from: one place names the figure and all of them.
        assert any(f"bench/results/plots/{figure}" in u and all(f in u for f in files) for u in places), \
            f"README.md and docs/results.md show {figure} nowhere beside {', '.join(files)}"
