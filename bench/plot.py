"""Figures from bench/results/*.json, for the README: decode speed against the bandwidth limit, perplexity against
size, the quantiser's time and memory by phase.

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


def decode_figure(runs: list, out: Path) -> Path:
    """Batch-1 decode tok/s per model and runtime, the bandwidth limit drawn over each model's bars."""
    models = [(label, name, m) for label, r in runs for name, m in r["models"].items()]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(DECODE_RUNTIMES)
    for j, (key, legend) in enumerate(DECODE_RUNTIMES.items()):
        xs = [i + (j - (len(DECODE_RUNTIMES) - 1) / 2) * width for i, (_, _, m) in enumerate(models) if key in m]
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
    fig.tight_layout()
    path = out / "decode_vs_limit.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_figure(runs: list, out: Path) -> Path:
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
    fig.tight_layout()
    path = out / "ppl_vs_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def phases(row: dict) -> dict:
    """Seconds by phase: the row's own "phases" where the quantiser recorded them, else wall minus the layer loop."""
    if "phases" in row:
        return row["phases"]
    return {"load + calibration text": row["wall_seconds"] - row["quantize_seconds"], "layer loop": row["quantize_seconds"]}


def quantiser_figure(r: dict, out: Path) -> Path:
    """Wall time stacked by phase, and peak memory, per quantiser run."""
    rows = r["rows"]
    labels = [f"{row['method']} g{row['group_size']}\n{row['n_samples']} samples" for row in rows]
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(8, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    bottoms = [0.0] * len(rows)
    names = list(dict.fromkeys(name for row in rows for name in phases(row)))
    for name in names:
        secs = [phases(row).get(name, 0.0) for row in rows]
        ax.barh(labels, secs, left=bottoms, label=name)
        bottoms = [b + s for b, s in zip(bottoms, secs)]
    ax.set_xlabel("seconds (wall)")
    ax.legend(fontsize=8)
    ax.set_title(f"SmolLM2-135M on {r['env']['cpus']} CPU cores", fontsize=10)
    mem.barh(labels, [row["peak_rss_mb"] / 1024 for row in rows], color="tab:gray")
    mem.set_xlabel("peak memory, GB")
    mem.set_yticks([])
    fig.tight_layout()
    path = out / "quantiser_phases.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plots"))
    args = ap.parse_args()
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    decode = [(label, r) for label, r in (("random weights", load(results / "decode.json")),
                                          ("real weights", load(results / "decode_smollm2.json"))) if r]
    if decode:
        written.append(decode_figure(decode, out))
    onnx = [(name, r) for name in ("onnx_g32.json", "onnx_defaults.json", "onnx_defaults_g64.json") if (r := load(results / name))]
    if onnx:
        written.append(quality_figure(onnx, out))
    quantiser = load(results / "quantize_cpu.json")
    if quantiser:
        written.append(quantiser_figure(quantiser, out))
    for path in written:
        print(f"wrote {path}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
