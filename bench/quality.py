"""WikiText-2 perplexity of float, RTN and AWQ SmolLM2 at several widths, groups and calibrations.

Writes bench/results/quality.json and quality.md. Every quantised row is
evaluated in memory from the dequantised weights that the checkpoint holds.
Usage: python bench/quality.py [--model smollm2-135m] [--device cuda] [--n-samples 128]
"""

import argparse
import copy
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from awq_edge import calib
from awq_edge.arch import get_adapter
from awq_edge.eval import perplexity, text_tokens
from awq_edge.model import load_float_model, resolve_model_dir
from awq_edge.quant import QConfig
from awq_edge.quantize import quantize_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--wikitext", default=str(SHARED))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--configs", default="4:64,3:64,4:128,3:128", help="w_bit:group pairs")
    ap.add_argument("--sources", default="sampled,builtin,wikitext2-valid", help="calibration sources to compare")
    ap.add_argument("--sample-sweep", default="8,32", help="extra AWQ w4g64 runs on the first source with these n_samples")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    args = ap.parse_args()
    wt = Path(args.wikitext)
    if not (wt / "test.txt").is_file():
        print(f"skip: WikiText-2 not found at {wt} (pass --wikitext DIR)")
        return 0

    path = resolve_model_dir(args.model)
    base, tok = load_float_model(path)
    adapter = get_adapter(base.config.model_type)
    test_ids = text_tokens(tok, wt / "test.txt", args.eval_tokens)
    sources = {"sampled": calib.SAMPLED, "builtin": calib.BUILTIN, "wikitext2-valid": str(wt / "valid.txt")}
    sources = {k: v for k, v in sources.items() if k in args.sources.split(",")}
    base.to(args.device)
    calib_ids = {k: calib.calibration_blocks(tok, v, args.n_samples, args.seqlen, base, args.device) for k, v in sources.items()}
    base.to("cpu")

    def evaluate(model):
        model.to(args.device)
        r = perplexity(model, tok, test_ids, args.seqlen, batch_size=8, device=args.device, progress=False)
        model.to("cpu")
        return r

    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".rows.jsonl").unlink(missing_ok=True)

    def record(method, cfg, source, n, model, report):
        t = time.perf_counter()
        r = evaluate(model)
        row = {"method": method, "w_bit": cfg.w_bit if cfg else 16, "group_size": cfg.group_size if cfg else None,
               "calibration": source, "n_samples": n, "ppl": round(r["ppl"], 4), "eval_tokens": r["tokens"],
               "quantize_seconds": report.get("seconds") if report else None,
               "eval_seconds": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(Path(args.out).with_suffix(".rows.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    record("float", None, None, 0, base, None)
    for spec in args.configs.split(","):
        w_bit, group = (int(v) for v in spec.split(":"))
        cfg = QConfig(w_bit, group, True)
        m = copy.deepcopy(base)
        record("rtn", cfg, None, 0, m, quantize_model(m, adapter, cfg, "rtn", test_ids[:2].view(1, 2), device=args.device, progress=False).report)
        for name, ids in calib_ids.items():
            m = copy.deepcopy(base)
            rep = quantize_model(m, adapter, cfg, "awq", ids, device=args.device, progress=False).report
            record("awq", cfg, name, int(ids.shape[0]), m, rep)
    for n in [int(v) for v in args.sample_sweep.split(",") if v]:
        cfg = QConfig(4, 64, True)
        m = copy.deepcopy(base)
        first = next(iter(calib_ids))
        ids = calib_ids[first][:n]
        rep = quantize_model(m, adapter, cfg, "awq", ids, device=args.device, progress=False).report
        record("awq", cfg, first, int(ids.shape[0]), m, rep)

    float_ppl = rows[0]["ppl"]
    for row in rows:
        if row["method"] != "awq":
            continue
        rtn = next(r for r in rows if r["method"] == "rtn" and r["w_bit"] == row["w_bit"] and r["group_size"] == row["group_size"])
        row["gap_closed_vs_rtn"] = round((rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - float_ppl), 4)
    env = {"model": args.model, "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "torch": torch.__version__, "python": platform.python_version(), "seqlen": args.seqlen,
           "eval_text": "wikitext-2 test.txt", "n_samples": args.n_samples,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "command": " ".join(["python"] + sys.argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = [f"WikiText-2 test perplexity, {rows[0]['eval_tokens']} tokens, seqlen {args.seqlen}; {args.model} on {args.device}",
             "", "| method | bits | group | calibration | samples | ppl | gap to float closed vs RTN | quantise s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['w_bit']} | {r['group_size'] or '-'} | {r['calibration'] or '-'} | {r['n_samples'] or '-'} "
                     f"| {r['ppl']:.3f} | {r.get('gap_closed_vs_rtn', '-')} | {r['quantize_seconds'] or '-'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
