"""WikiText-2 test perplexity of float, RTN, AWQ and GPTQ rows, and the per-layer error behind them.

Each row is `method:bits:group[:calibration:n_samples[:flags]]`, quantised in
memory from the float model (the quantiser's own code: quantize_model) and
evaluated on WikiText-2 test, which no calibration source contains. Every
quantised row with calibration also reports each linear's relative output
error on the held-out quarter of its calibration samples; the per-layer table
sums them, and each layer's error on WikiText-2 valid is measured on the float
model's inputs. Flags, joined by +: `noguard` keeps every AWQ choice (llm-awq's
behaviour) instead of only those that beat round-to-nearest on the held-out
samples; `duo`/`noduo` add or drop AutoAWQ's weight-aware scale candidates;
`seq`/`noseq` feed each layer the quantised model's activations or the float
model's; `sym` quantises without zero points (every zero point 8, `--no-zero-point`);
`dampX` sets GPTQ's dampening to X; `sinkX` counts each sequence's first token again
in GPTQ's Hessian, X x seqlen times; `tf32emu` rounds the inputs of GPTQ's matmuls (the Hessian, the block
updates) to TF32 as the GPU's layer loop does, to measure that on the CPU. `--grid-noise` moves the GGUF-derived
weights off their grid first.
Writes OUT.json and OUT.md (default bench/results/quality).
Usage: python -P bench/quality.py [--model smollm2-135m|FOLDER] [--device cuda] [--rows ...] [--eval-tokens N]
"""

import argparse
import copy
import json
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from awq_edge.arch import get_adapter
from awq_edge.quant import QConfig
from awq_edge.quantizer import calib, gptq, layerwise
from awq_edge.quantizer.eval import perplexity, text_tokens
from awq_edge.quantizer.layerwise import first_output, hidden_input, quantize_model
from awq_edge.quantizer.source import load_float_model, resolve_model_dir

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
DEFAULT_ROWS = ("rtn:4:64:mixed:128,awq:4:64:mixed:128,awq:4:64:mixed:128:noguard,gptq:4:64:mixed:128,"
                "awq:4:64:mixed:16,rtn:4:128:mixed:128,awq:4:128:mixed:128,awq:4:128:mixed:128:noguard,"
                "gptq:4:128:mixed:128,awq:4:128:mixed:16")


FLAGS = ("noguard", "duo", "noduo", "seq", "noseq", "tf32emu", "sym")


def parse_row(spec: str) -> dict:
    parts = spec.split(":")
    flags = parts[5].split("+") if len(parts) > 5 and parts[5] else []
    damps = [f for f in flags if f.startswith("damp")]
    sinks = [f for f in flags if f.startswith("sink")]
    if set(flags) - set(FLAGS) - set(damps) - set(sinks):
        raise SystemExit(f"row {spec!r}: flags are {'+'.join(FLAGS)}, dampX (GPTQ's dampening) and sinkX (the "
                         "share of GPTQ's Hessian each sequence's first token gets again)")
    row = {"method": parts[0], "w_bit": int(parts[1]), "group_size": int(parts[2]),
           "calibration": parts[3] if len(parts) > 3 else None, "n_samples": int(parts[4]) if len(parts) > 4 else 0,
           "guard": "noguard" not in flags, "zero_point": "sym" not in flags, "flags": "+".join(flags)}
    if damps:
        try:
            row["gptq_damp"] = float(damps[-1][4:])
        except ValueError:
            raise SystemExit(f"row {spec!r}: write GPTQ's dampening as dampX, e.g. damp0.1") from None
    elif row["method"] in ("gptq", "awq-gptq"):
        row["gptq_damp"] = gptq.DAMP  # recorded, so a row stays readable when the default changes
    if sinks:
        try:
            row["gptq_sink"] = float(sinks[-1][4:])
        except ValueError:
            raise SystemExit(f"row {spec!r}: write the sink's share as sinkX, e.g. sink0.1") from None
    for name in ("duo", "seq"):  # unset: the quantiser's default
        if name in flags and "no" + name in flags:
            raise SystemExit(f"row {spec!r}: {name} and no{name} together")
        if name in flags or "no" + name in flags:
            row[name] = name in flags
    return row


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa, to nearest (ties away), as tensor cores read it."""
    i = t.detach().float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


@contextmanager
def tf32_emulated():
    """On the CPU, what TF32 matmuls (the GPU's layer loop) do to GPTQ: the Hessian's x^T x and the column loop's
    block updates read their inputs rounded to TF32, and sum in float32."""
    add, mm = gptq.HessianAccumulator.add, torch.Tensor.__matmul__
    inner = layerwise.gptq_quantize

    def rounded_add(self, x, weight=1.0):
        return add(self, _tf32(x.reshape(-1, x.shape[-1])), weight)

    def rounded_gptq(*a, **kw):
        torch.Tensor.__matmul__ = lambda u, v: mm(_tf32(u), _tf32(v))
        try:
            return inner(*a, **kw)
        finally:
            torch.Tensor.__matmul__ = mm

    gptq.HessianAccumulator.add, layerwise.gptq_quantize = rounded_add, rounded_gptq
    try:
        yield
    finally:
        gptq.HessianAccumulator.add, layerwise.gptq_quantize = add, inner


def break_grid(model, adapter, noise: float, seed: int = 0) -> None:
    """Move every decoder linear's weights off the grid of the GGUF they came from: add Gaussian noise of `noise`
    times the step of a 4-bit grid over each 32-weight block, (max - min) / 15. That is SmolLM2's Q4_1 step
    exactly; Gemma-3-270M's Q4_K_M file mixes Q4_K, Q5_0, Q6_K and Q8_0 tensors, whose steps are finer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (m for m in adapter.layers(model).modules() if isinstance(m, torch.nn.Linear)):
            w = lin.weight.data.float()
            blocks = w.reshape(w.shape[0], -1, 32)
            step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
            blocks = blocks + noise * step * torch.randn(blocks.shape, generator=gen)
            lin.weight.data = blocks.reshape(w.shape).to(lin.weight.dtype)


@torch.no_grad()
def layer_errors_on(base, model, adapter, ids, device) -> list:
    """Per decoder layer, on the float model's own inputs for `ids`: ||L_q(x) - L(x)||^2 / ||L(x) - x||^2, the
    quantised layer's error relative to the float layer's update (the residual stream itself excluded)."""
    inputs, outputs = {}, {}
    hooks = []
    for i, layer in enumerate(adapter.layers(base)):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, hidden_input((a, kw)).clone()), with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(i, first_output(out).clone())))
    base.to(device)
    base(ids.to(device))
    base.to("cpu")
    for h in hooks:
        h.remove()

    def swap(m, a, kw, i):  # feed layer i the float model's input
        if a:
            return (inputs[i],) + tuple(a[1:]), kw
        return a, {**kw, "hidden_states": inputs[i]}

    errors = {}
    hooks = []
    for i, layer in enumerate(adapter.layers(model)):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, kw, i=i: swap(m, a, kw, i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: errors.__setitem__(
            i, (first_output(out).float() - outputs[i].float()).pow(2).sum().item()
            / (outputs[i].float() - inputs[i].float()).pow(2).sum().clamp(min=1e-20).item())))
    model.to(device)
    model(ids.to(device))
    model.to("cpu")
    for h in hooks:
        h.remove()
    return [errors[i] for i in range(len(errors))]


def render(out: Path, env: dict, rows: list, layer_errors: dict, valid_errors: dict) -> None:
    """OUT.json and OUT.md from the rows (the first is the float model's) and the per-layer errors."""
    float_ppl = rows[0]["ppl"]
    for row in rows[1:]:
        row.pop("gap_closed_vs_rtn", None)  # a merged run's, computed against its own rows
        rtn = next((r for r in rows if r["method"] == "rtn" and r["w_bit"] == row["w_bit"]
                    and r["group_size"] == row["group_size"]
                    and r.get("zero_point", True) == row.get("zero_point", True)), None)  # (older files: True)
        if rtn and row is not rtn and rtn["ppl"] != float_ppl:
            row["gap_closed_vs_rtn"] = round((rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - float_ppl), 4)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "layer_errors": layer_errors,
                                                    "valid_layer_errors": valid_errors},
                                                   indent=2) + "\n")
    noise = env.get("grid_noise") and f", weights moved off their grid by noise of {env['grid_noise']} 4-bit steps"
    where = f"{env['device']} ({env['gpu']})" if env.get("gpu") else env["device"]  # the GPU named in every file
    lines = [f"WikiText-2 test perplexity, {rows[0]['eval_tokens']} tokens, seqlen {env['seqlen']}; {env['model']} on "
             f"{where}{noise or ''}. Calibration never includes WikiText-2 test.", "",
             "| method | bits | group | calibration | samples | flags | ppl | RTN's gap closed | scales kept "
             "| duo scales | clip groups kept | layer error, WikiText-2 valid | quantise s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['w_bit']} | {r['group_size'] or '-'} | {r['calibration'] or '-'} "
                     f"| {r['n_samples'] or '-'} | {r.get('flags') or '-'} | {r['ppl']:.3f} "
                     f"| {r.get('gap_closed_vs_rtn', '-')} | {r.get('scales_kept', '-')} | {r.get('duo_chosen', '-')} "
                     f"| {r.get('clip_kept', '-')} | {r.get('valid_layer_error_sum', '-')} "
                     f"| {r.get('quantize_seconds', '-')} |")
    if layer_errors:
        names = list(layer_errors)
        n_layers = len(next(iter(layer_errors.values())))
        lines += ["", "Per layer: sum over its linears of the relative output error "
                  "||x W_q - x W|| ^2 / ||x W||^2 on each row's held-out calibration samples.", "",
                  "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i in range(n_layers):
            lines.append(f"| {i} | " + " | ".join(f"{layer_errors[n][i]:.4f}" for n in names) + " |")
    if valid_errors:
        names = list(valid_errors)
        lines += ["", f"Per layer on {env['valid_tokens']} tokens of WikiText-2 valid (no row calibrates on it unless its calibration is wikitext2-valid), each "
                  "layer fed the float model's input: ||L_q(x) - L(x)||^2 / ||L(x) - x||^2.", "",
                  "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i in range(len(next(iter(valid_errors.values())))):
            lines.append(f"| {i} | " + " | ".join(f"{valid_errors[n][i]:.4f}" for n in names) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def merge(files: list, out: Path) -> None:
    """One table from runs made side by side (e.g. one process per variant on one GPU): their float rows must agree."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    floats = {r["rows"][0]["ppl"] for r in runs}
    if len(floats) != 1:
        raise SystemExit(f"runs disagree on the float model's perplexity: {sorted(floats)}")
    rows = runs[0]["rows"][:1] + [row for r in runs for row in r["rows"][1:]]
    env = {**runs[0]["env"], "merged_from": [str(f) for f in files], "commands": [r["env"]["command"] for r in runs]}
    render(out, env, rows, {k: v for r in runs for k, v in r["layer_errors"].items()},
           {k: v for r in runs for k, v in r.get("valid_layer_errors", {}).items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--wikitext", default=str(SHARED))
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--grid-noise", type=float, default=0.0,
                    help="break the GGUF's grid first: noise of this many 4-bit steps of each 32-weight block (the float row "
                         "changes too)")
    ap.add_argument("--valid-tokens", type=int, default=4096,
                    help="WikiText-2 valid tokens for a per-layer error on text other than the calibration (0: skip)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these runs' results into OUT")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    wt = Path(args.wikitext)
    if not (wt / "test.txt").is_file():
        print(f"skip: WikiText-2 not found at {wt} (pass --wikitext DIR)")
        return 0

    path = resolve_model_dir(args.model)
    base, tok = load_float_model(path)
    adapter = get_adapter(base.config.model_type)
    if args.grid_noise:
        break_grid(base, adapter, args.grid_noise)
    test_ids = text_tokens(tok, wt / "test.txt", args.eval_tokens)
    valid_ids = None
    if args.valid_tokens:
        valid_ids = calib.calibration_blocks(tok, str(wt / "valid.txt"), args.valid_tokens // args.seqlen,
                                             args.seqlen)
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
    rows, layer_errors, valid_errors = [], {}, {}

    def evaluate(model):
        model.to(args.device)
        r = perplexity(model, tok, test_ids, args.seqlen, batch_size=8, device=args.device, progress=False)
        model.to("cpu")
        return r

    def write():
        env = {"model": args.model, "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "torch": torch.__version__, "python": platform.python_version(), "seqlen": args.seqlen,
               "eval_text": "wikitext-2 test.txt", "grid_noise": args.grid_noise, "eval_tokens": rows[0]["eval_tokens"],
               "valid_tokens": valid_ids.numel() if valid_ids is not None else 0,
               "command": " ".join(["python"] + sys.argv)}
        render(out, env, rows, layer_errors, valid_errors)

    t = time.perf_counter()
    r = evaluate(base)
    rows.append({"method": "float", "w_bit": 16, "group_size": None, "calibration": None, "n_samples": 0,
                 "ppl": round(r["ppl"], 4), "eval_tokens": r["tokens"], "eval_seconds": round(time.perf_counter() - t, 1)})
    print(json.dumps(rows[-1]), flush=True)
    for spec in specs:
        cfg = QConfig(spec["w_bit"], spec["group_size"], spec["zero_point"])
        ids = calib_ids.get((spec["calibration"], spec["n_samples"]), torch.zeros(1, 2, dtype=torch.long))
        m = copy.deepcopy(base)
        options = {{"seq": "sequential"}.get(k, k): spec[k] for k in ("duo", "seq", "gptq_damp", "gptq_sink")
                   if k in spec}
        with tf32_emulated() if "tf32emu" in spec["flags"] else nullcontext():
            res = quantize_model(m, adapter, cfg, spec["method"], ids, device=args.device, progress=False,
                                 guard=spec["guard"], **options)
        t = time.perf_counter()
        r = evaluate(m)
        rep = res.report
        row = {**spec, "ppl": round(r["ppl"], 4), "eval_tokens": r["tokens"], "quantize_seconds": rep["seconds"],
               "eval_seconds": round(time.perf_counter() - t, 1),
               "scales_kept": f"{rep['scales_kept']}/{rep['scale_groups']}" if rep["scale_groups"] else None,
               "clip_kept": "{}/{}".format(*rep["clip_kept"]) if rep["clip_kept"][1] else None,
               "duo_chosen": rep["duo_chosen"] if rep["scale_groups"] else None}
        rows.append(row)
        label = (f"{spec['method']} w{spec['w_bit']} g{spec['group_size']} {spec['calibration'] or ''} "
                 f"n{spec['n_samples']} {spec['flags']}").replace("  ", " ").strip()
        if spec["calibration"]:
            n_layers = len(adapter.layers(m))
            per_layer = [0.0] * n_layers
            for name, err in rep["sensitivity"].items():
                per_layer[int(name[len(adapter.layers_path) + 1:].split(".")[0])] += err
            layer_errors[label] = [round(e, 5) for e in per_layer]
        if valid_ids is not None:
            valid_errors[label] = [round(e, 5) for e in layer_errors_on(base, m, adapter, valid_ids, args.device)]
            row["valid_layer_error_sum"] = round(sum(valid_errors[label]), 4)
        print(json.dumps(row), flush=True)
        write()
    write()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
