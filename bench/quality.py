"""WikiText-2 test perplexity of float, RTN, AWQ and GPTQ rows, and the per-layer error behind them.

Each row is `method:bits:group[:calibration:n_samples[:noguard]]`, quantised in
memory from the float model (the quantiser's own code: quantize_model) and
evaluated on WikiText-2 test, which no calibration source contains. Every
quantised row with calibration also reports each linear's relative output
error on the held-out quarter of its calibration samples; the per-layer table
sums them. `noguard` keeps every AWQ choice (llm-awq's behaviour) instead of
only those that beat round-to-nearest on the held-out samples.
Writes OUT.json and OUT.md (default bench/results/quality).
Usage: python -P bench/quality.py [--model smollm2-135m|FOLDER] [--device cuda] [--rows ...] [--eval-tokens N]
"""

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from awq_edge import calib
from awq_edge.arch import get_adapter
from awq_edge.eval import perplexity, text_tokens
from awq_edge.model import load_float_model, resolve_model_dir
from awq_edge.quant import QConfig
from awq_edge.layerwise import quantize_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
DEFAULT_ROWS = ("rtn:4:64:mixed:128,awq:4:64:mixed:128,awq:4:64:mixed:128:noguard,gptq:4:64:mixed:128,"
                "awq:4:64:mixed:16,rtn:4:128:mixed:128,awq:4:128:mixed:128,awq:4:128:mixed:128:noguard,"
                "gptq:4:128:mixed:128,awq:4:128:mixed:16")


def parse_row(spec: str) -> dict:
    parts = spec.split(":")
    row = {"method": parts[0], "w_bit": int(parts[1]), "group_size": int(parts[2]),
           "calibration": parts[3] if len(parts) > 3 else None, "n_samples": int(parts[4]) if len(parts) > 4 else 0,
           "guard": not (len(parts) > 5 and parts[5] == "noguard")}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--wikitext", default=str(SHARED))
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=65536)
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
    sources = {"mixed": calib.MIXED, "builtin": calib.BUILTIN, "sampled": calib.SAMPLED,
               "wikitext2-valid": str(wt / "valid.txt")}
    specs = [parse_row(s) for s in args.rows.split(",") if s]
    calib_ids = {}
    for spec in specs:
        key = (spec["calibration"], spec["n_samples"])
        if spec["calibration"] and key not in calib_ids:
            big = max(s["n_samples"] for s in specs if s["calibration"] == spec["calibration"])
            if (spec["calibration"], big) not in calib_ids:
                base.to(args.device)
                calib_ids[(spec["calibration"], big)] = calib.calibration_blocks(
                    tok, sources[spec["calibration"]], big, args.seqlen, base, args.device)
                base.to("cpu")
            # Fewer samples are the same text's first blocks, with their own held-out quarter.
            calib_ids[key] = calib_ids[(spec["calibration"], big)][: spec["n_samples"]]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, layer_errors = [], {}

    def evaluate(model):
        model.to(args.device)
        r = perplexity(model, tok, test_ids, args.seqlen, batch_size=8, device=args.device, progress=False)
        model.to("cpu")
        return r

    def write():
        float_ppl = rows[0]["ppl"]
        for row in rows[1:]:
            rtn = next((r for r in rows if r["method"] == "rtn" and r["w_bit"] == row["w_bit"]
                        and r["group_size"] == row["group_size"]), None)
            if rtn and row is not rtn and rtn["ppl"] != float_ppl:
                row["gap_closed_vs_rtn"] = round((rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - float_ppl), 4)
        env = {"model": args.model, "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "torch": torch.__version__, "python": platform.python_version(), "seqlen": args.seqlen,
               "eval_text": "wikitext-2 test.txt", "eval_tokens": rows[0]["eval_tokens"],
               "command": " ".join(["python"] + sys.argv)}
        out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "layer_errors": layer_errors},
                                                       indent=2) + "\n")
        lines = [f"WikiText-2 test perplexity, {rows[0]['eval_tokens']} tokens, seqlen {args.seqlen}; {args.model} on "
                 f"{args.device}. Calibration never includes WikiText-2 test.", "",
                 "| method | bits | group | calibration | samples | guard | ppl | RTN's gap closed | scales kept "
                 "| clip groups kept | quantise s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['w_bit']} | {r['group_size'] or '-'} | {r['calibration'] or '-'} "
                         f"| {r['n_samples'] or '-'} | {r.get('guard', '-')} | {r['ppl']:.3f} "
                         f"| {r.get('gap_closed_vs_rtn', '-')} | {r.get('scales_kept', '-')} "
                         f"| {r.get('clip_kept', '-')} | {r.get('quantize_seconds', '-')} |")
        if layer_errors:
            names = list(layer_errors)
            n_layers = len(next(iter(layer_errors.values())))
            lines += ["", "Per layer: sum over its linears of the relative output error "
                      "||x W_q - x W|| ^2 / ||x W||^2 on each row's held-out calibration samples.", "",
                      "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for i in range(n_layers):
                lines.append(f"| {i} | " + " | ".join(f"{layer_errors[n][i]:.4f}" for n in names) + " |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    t = time.perf_counter()
    r = evaluate(base)
    rows.append({"method": "float", "w_bit": 16, "group_size": None, "calibration": None, "n_samples": 0,
                 "ppl": round(r["ppl"], 4), "eval_tokens": r["tokens"], "eval_seconds": round(time.perf_counter() - t, 1)})
    print(json.dumps(rows[-1]), flush=True)
    for spec in specs:
        cfg = QConfig(spec["w_bit"], spec["group_size"], True)
        ids = calib_ids.get((spec["calibration"], spec["n_samples"]), torch.zeros(1, 2, dtype=torch.long))
        m = copy.deepcopy(base)
        res = quantize_model(m, adapter, cfg, spec["method"], ids, device=args.device, progress=False,
                             guard=spec["guard"])
        t = time.perf_counter()
        r = evaluate(m)
        rep = res.report
        row = {**spec, "ppl": round(r["ppl"], 4), "eval_tokens": r["tokens"], "quantize_seconds": rep["seconds"],
               "eval_seconds": round(time.perf_counter() - t, 1),
               "scales_kept": f"{rep['scales_kept']}/{rep['scale_groups']}" if rep["scale_groups"] else None,
               "clip_kept": "{}/{}".format(*rep["clip_kept"]) if rep["clip_kept"][1] else None}
        rows.append(row)
        if spec["calibration"]:
            n_layers = len(adapter.layers(m))
            per_layer = [0.0] * n_layers
            for name, err in rep["sensitivity"].items():
                per_layer[int(name[len(adapter.layers_path) + 1:].split(".")[0])] += err
            label = f"{spec['method']} g{spec['group_size']} n{spec['n_samples']}{'' if spec['guard'] else ' noguard'}"
            layer_errors[label] = [round(e, 5) for e in per_layer]
        print(json.dumps(row), flush=True)
        write()
    write()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
