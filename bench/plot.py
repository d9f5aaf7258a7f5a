"""Figures from bench/results/*.json, for the README: decode speed against the bandwidth limit, perplexity against
size, the quantiser's time and memory by phase.

Each figure is drawn from the files named in SOURCES, the files the README and docs/results.md cite beside it;
every figure says so in a footnote, and the script prints "wrote FIGURE from FILE, ..." for each.

Usage: python bench/plot.py [--results bench/results] [--out bench/results/plots]   (needs matplotlib: .[plot])
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Figure -> the results files (in --results) it is drawn from, in the order read. tests/test_plot.py checks that
# the README or docs/results.md cites each of them.
SOURCES = {"decode_vs_limit.png": ("decode_families.json",),
           "ppl_vs_size.png": ("onnx_g32.json", "onnx_defaults.json", "onnx_defaults_g64.json"),
           "quantiser_phases.png": ("quantize_cpu.json",)}
# Runtime keys of bench/decode.py's results -> legend names, in the order drawn.
DECODE_RUNTIMES = {"ours": "awq-edge CUDA (int4)", "ours_unfolded": "awq-edge CUDA, norms unfolded",
                   "torch_int4": "torch int4 kernel in our runtime", "hf_fp16_static_eager": "transformers fp16"}
# bench/onnx.py's folder names -> legend names; the peer is onnxruntime-genai's model builder.
ONNX_MODELS = {"ours_int4": "ours, --exact", "ours_default": "ours, default", "ours_int4_int8act_head8": "ours, 8-bit head",
               "ours_int4_int8act_head4": "ours, 4-bit head (nearest)",
               "ours_int4_int8act_head4sym_calib": "ours, 4-bit head g32 (calibrated)",
               "ours_int4_int8act_head4sym_g64_calib": "ours, the default's flags",
               "peer_int4": "onnxruntime-genai int4", "peer_int4_g64": "onnxruntime-genai int4 g64"}


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def shown(path: Path) -> str:
    """A results file as the README cites it (bench/results/NAME) when it is in this repository, else its path."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def save(fig, out: Path, name: str, sources: list) -> Path:
    """Write the figure with a footnote naming the files it was drawn from."""
    fig.text(0.005, 0.005, "from " + ", ".join(shown(p) for p in sources), fontsize=6, color="dimgray",
             ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def decode_figure(runs: list, out: Path, sources: list) -> Path:
    """Batch-1 decode tok/s per model and runtime, the bandwidth limit drawn over each model's bars."""
    models = [("real" if "checkpoint_dir" in m else label, name, m) for label, r in runs for name, m in r["models"].items()]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(models)), 4.6))
    shown_runtimes = {k: v for k, v in DECODE_RUNTIMES.items() if any(k in m for _, _, m in models)}
    width = 0.8 / len(shown_runtimes)
    for j, (key, legend) in enumerate(shown_runtimes.items()):
        xs = [i + (j - (len(shown_runtimes) - 1) / 2) * width for i, (_, _, m) in enumerate(models) if key in m]
        ys = [m[key]["tok_s"] for _, _, m in models if key in m]
        ax.bar(xs, ys, width, label=legend)
    for i, (_, _, m) in enumerate(models):
        limit = m["bandwidth_limit_tok_s"]
        ax.hlines(limit, i - 0.45, i + 0.45, colors="black", linestyles="dashed")
        ax.annotate(f"limit {limit:.0f}", (i, limit), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(range(len(models)), [f"{name}\n({label})" for label, name, _ in models])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s, batch 1 (log)")
    ax.set_title(f"Decode on {runs[0][1]['device']}: against the memory-bandwidth limit (dashed)")
    ax.set_ylim(top=ax.get_ylim()[1] * 8)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    return save(fig, out, "decode_vs_limit.png", sources)


def quality_figure(runs: list, out: Path, sources: list) -> Path:
    """WikiText-2 perplexity against ONNX size, our exports and the peer's, one marker per results file."""
    fig, ax = plt.subplots(figsize=(8, 4.6))
    drawn = set()  # the peer is built from the same float model in every run: one point, one label
    for marker, (label, r) in zip("osD^v", runs):
        for key, legend in ONNX_MODELS.items():
            if key not in r.get("wikitext2_test_ppl", {}) or key not in r.get("size_bytes", {}):
                continue
            x, y = r["size_bytes"][key] / 1e6, r["wikitext2_test_ppl"][key]["ppl"]
            if (key, round(x, 2), round(y, 3)) in drawn:
                continue
            drawn.add((key, round(x, 2), round(y, 3)))
            peer = key.startswith("peer")
            ax.scatter(x, y, marker=marker, s=50, color="tab:red" if peer else "tab:blue")
            ax.annotate(f"{legend} [{label}]", (x, y), textcoords="offset points", xytext=(5, -10 if peer else 3),
                        fontsize=7)
    ax.set_xlabel("ONNX size, MB (model.onnx + data)")
    ax.set_ylabel("WikiText-2 test perplexity (lower is better)")
    ax.set_title("SmolLM2-135M int4 on onnxruntime: ours (blue) and onnxruntime-genai's (red)")
    return save(fig, out, "ppl_vs_size.png", sources)


def phases(row: dict) -> dict:
    """Seconds by phase: the row's own "phases" where the quantiser recorded them, else wall minus the layer loop."""
    if "phases" in row:
        return row["phases"]
    return {"load + calibration text": row["wall_seconds"] - row["quantize_seconds"], "layer loop": row["quantize_seconds"]}


def quantiser_figure(r: dict, out: Path, sources: list) -> Path:
    """Wall time stacked by phase, and peak memory, per quantiser run, each bar labelled with the file's figure.

    bench/quantize_cpu.py stores peak_rss_mb as ru_maxrss / 1024, i.e. MiB, drawn as such."""
    rows = r["rows"]
    labels = [f"{row['method']} g{row['group_size']}\n{row['n_samples']} samples" for row in rows]
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(8, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    bottoms = [0.0] * len(rows)
    names = list(dict.fromkeys(name for row in rows for name in phases(row)))
    for name in names:
        secs = [phases(row).get(name, 0.0) for row in rows]
        ax.barh(labels, secs, left=bottoms, label=name)
        bottoms = [b + s for b, s in zip(bottoms, secs)]
    for label, row in zip(labels, rows):
        ax.annotate(f"{row['wall_seconds']:.1f} s", (row["wall_seconds"], label), textcoords="offset points",
                    xytext=(3, 0), va="center", fontsize=8)
    ax.set_xlim(right=max(row["wall_seconds"] for row in rows) * 1.2)
    ax.set_xlabel("seconds (wall)")
    ax.legend(fontsize=8)
    ax.set_title(f"SmolLM2-135M on {r['env']['cpus']} CPU cores", fontsize=10)
    mem.barh(labels, [row["peak_rss_mb"] for row in rows], color="tab:gray")
    for label, row in zip(labels, rows):
        mem.annotate(f"{row['peak_rss_mb']}", (row["peak_rss_mb"], label), textcoords="offset points",
                     xytext=(3, 0), va="center", fontsize=8)
    mem.set_xlim(right=max(row["peak_rss_mb"] for row in rows) * 1.35)
    mem.set_xlabel("peak RSS, MiB")
    mem.set_yticks([])
    return save(fig, out, "quantiser_phases.png", sources)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plots"))
    args = ap.parse_args()
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []  # (figure, the files it was drawn from)

    def read(figure: str) -> list:
        """(path, results) for each of the figure's source files that exists."""
        return [(results / name, r) for name in SOURCES[figure] if (r := load(results / name))]

    decode = read("decode_vs_limit.png")
    if decode:
        runs = [("random", r) for p, r in decode]  # a model with a checkpoint is labelled real
        written.append((decode_figure(runs, out, [p for p, _ in decode]), [p for p, _ in decode]))
    onnx = read("ppl_vs_size.png")
    if onnx:
        runs = [(p.name, r) for p, r in onnx]
        written.append((quality_figure(runs, out, [p for p, _ in onnx]), [p for p, _ in onnx]))
    quantiser = read("quantiser_phases.png")
    if quantiser:
        (p, r), = quantiser
        written.append((quantiser_figure(r, out, [p]), [p]))
    for path, sources in written:
        print(f"wrote {path} from {', '.join(shown(p) for p in sources)}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
