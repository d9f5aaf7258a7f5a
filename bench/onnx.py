"""ONNX export on SmolLM2: parity with PyTorch, WikiText-2 perplexity, CPU decode speed and size, vs onnxruntime-genai's builder.

Writes bench/results/onnx.json. Every model is evaluated by the
same perplexity code (awq_edge.quantizer.eval) and timed by the same decode loop
(awq_edge.runtime.ort.OrtDecoder; PyTorch by the equivalent KV-cache loop),
round-robin over the models within one run so that load on the machine hits
all of them alike.
Usage: python bench/onnx.py --quant-dir AWQ_W4G64_DIR [--work /tmp/onnx-bench] [--eval-tokens 16384]
`--models ours_default,peer_int4` compares `awq-edge export`'s default with the builder's default int4 and
writes the verdict into OUT.json's "defaults_vs_peer".
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# Run as a script, this file's folder comes first on sys.path and its name would shadow the onnx package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import onnxruntime as ort
import torch
from awq_edge.export.api import export, export_options
from awq_edge.export.decoder import ExportOptions

from awq_edge.checkpoint.reader import load_quantized_model
from awq_edge.quantizer.eval import perplexity, text_tokens
from awq_edge.quantizer.source import load_float_model, resolve_model_dir
from awq_edge.runtime.generate import generate
from awq_edge.runtime.ort import OrtDecoder, session_options

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for learning a new language.",
    "How do I boil an egg?",
)


def empty_feed(session, ids: np.ndarray, kv_shape: tuple) -> dict:
    """Inputs for one whole-sequence run of ids [B, S] from an empty KV cache (kv_shape: (kv heads, 0, head size))."""
    b, s = ids.shape
    feed = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = ids
        elif i.name == "attention_mask":
            feed[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feed[i.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        else:
            feed[i.name] = np.zeros((b, *kv_shape), np.float16 if i.type == "tensor(float16)" else np.float32)
    return feed


def kv_shape_of(folder: Path) -> tuple:
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    return dec["num_key_value_heads"], 0, dec["head_size"]


class OnnxLM:
    """A decoder ONNX (ours or the builder's) as `model(input_ids=...).logits`, for awq_edge.quantizer.eval."""

    def __init__(self, folder: Path, providers=("CPUExecutionProvider",)):
        self.session = ort.InferenceSession(str(folder / "model.onnx"), session_options(folder),
                                           providers=list(providers))
        self.kv_shape = kv_shape_of(folder)

    def __call__(self, input_ids, use_cache=False):
        feed = empty_feed(self.session, input_ids.numpy().astype(np.int64), self.kv_shape)
        logits = self.session.run(["logits"], feed)[0]
        return SimpleNamespace(logits=torch.from_numpy(logits.astype(np.float32)))


def onnx_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def ort_decode(folder: Path, prompt: list, n_new: int) -> dict:
    """Prefill seconds and decode tokens/s of the greedy loop, never stopping early."""
    d = OrtDecoder(folder)
    d.eos_ids = set()
    t0 = time.perf_counter()
    logits = d.extend(prompt)
    t1 = time.perf_counter()
    token = int(np.argmax(logits))
    for _ in range(n_new):
        token = int(np.argmax(d.forward([token])[-1]))
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": n_new / (t2 - t1)}


def interleaved_decode(folders: dict, prompt: list, n_new: int) -> dict:
    """Decode tokens/s of every model, stepping them in turn one token at a time (order reversed every step).

    The machine's load changes within a second; interleaving at the token
    (about 10 ms) rather than the model (about 1.5 s) gives every model the
    same load. Each model's time is the sum of its own steps (forward + argmax). The sessions here do not
    spin their idle worker threads (onnxruntime's default), which would otherwise take the cores from
    whichever model runs next.
    """
    decoders = {}
    for name, folder in folders.items():
        decoders[name] = OrtDecoder(folder, config_entries={"session.intra_op.allow_spinning": "0"})
        decoders[name].eos_ids = set()
    token = {name: int(np.argmax(d.extend(prompt))) for name, d in decoders.items()}
    spent = dict.fromkeys(decoders, 0.0)
    names = list(decoders)
    for step in range(n_new):
        for name in names if step % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            token[name] = int(np.argmax(decoders[name].forward([token[name]])[-1]))
            spent[name] += time.perf_counter() - t0
    return {name: n_new / s for name, s in spent.items()}


@torch.no_grad()
def torch_greedy(model, prompt: list, n_new: int, timed: bool = False):
    """The same loop in PyTorch with its KV cache: (new tokens, timings)."""
    t0 = time.perf_counter()
    out = model(torch.tensor([prompt]), use_cache=True)
    t1 = time.perf_counter()
    tokens, cache = [int(out.logits[0, -1].argmax())], out.past_key_values
    for _ in range(n_new - 1 if not timed else n_new):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    t2 = time.perf_counter()
    return tokens[:n_new], {"prefill_s": t1 - t0, "decode_tok_s": n_new / (t2 - t1)}


def parity(folder: Path, qmodel, ids: list) -> dict:
    """Max |logit difference| per position between the fp32 export and the PyTorch quantised model."""
    got = OnnxLM(folder)(torch.tensor([ids])).logits[0]
    with torch.no_grad():
        ref = qmodel(torch.tensor([ids])).logits[0].float()
    per_pos = (got - ref).abs().amax(dim=-1)
    return {"positions": len(ids), "max_abs_diff_per_position": [round(float(x), 6) for x in per_pos],
            "max_abs_diff": float(per_pos.max()), "max_abs_logit": float(ref.abs().max()),
            "relative": float(per_pos.max() / ref.abs().max())}


def greedy_agreement(folder: Path, qmodel, tokenizer, n_new: int) -> list:
    rows = []
    for text in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        d = OrtDecoder(folder)
        d.eos_ids = set()
        ours = list(generate(d, list(ids), n_new))
        ref, _ = torch_greedy(qmodel, list(ids), n_new)
        rows.append({"prompt": text, "identical": ours == ref, "first_difference": next(
            (i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None), "text": tokenizer.decode(ours)})
    return rows


def run_peer_builder(hf_dir: Path, out: Path, precision: str, extra: tuple = (), provider: str = "cpu"):
    """onnxruntime-genai's model builder for the provider: seconds it took, or None when its output is already there."""
    if (out / "model.onnx").is_file():
        return None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                    "-p", precision, "-e", provider, *extra], check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - t0, 1)


def markdown(r: dict) -> str:
    """The JSON's headline numbers as tables."""
    ppl, speed, size = r["wikitext2_test_ppl"], r["decode"]["median"], r["size_bytes"]
    first = next(iter(ppl.values()))
    lines = [
        f"# ONNX export on {r['model']} ({r['host']}, onnxruntime {r['versions']['onnxruntime']})", "",
        f"Quantised checkpoint: {r['quantization']}; quantiser: {r.get('quantiser', 'not recorded')}.",
        f"WikiText-2 test perplexity over {first['tokens']} tokens in windows of {first['seqlen']}; decode at batch 1, "
        f"{r['decode']['new_tokens']} new tokens after a {r['decode']['prompt_tokens']}-token prompt, median of "
        f"{r['decode']['repeats']}, all models round-robin in one run.", "",
        "| model | ppl | vs PyTorch AWQ | decode tok/s | vs PyTorch float | size MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ppl:
        s = speed.get(name, {})
        mb = size.get(name, size["float_fp16_safetensors"] if name == "pytorch_float" else None)
        lines.append(f"| {name} | {ppl[name]['ppl']:.3f} | {100 * ppl[name]['vs_pytorch_awq']:+.2f}% | "
                     f"{s.get('decode_tok_s', float('nan')):.1f} | {s.get('vs_pytorch_float', float('nan')):.2f}x | "
                     f"{'' if mb is None else f'{mb / 1e6:.1f}'} |")
    peer = "peer_int4"
    if peer in speed and peer in ppl:
        inter = r.get("decode_interleaved", {}).get("median", {})
        lines += ["", f"Against {peer} in the same run. Decode: the median over rounds of ours / peer within the "
                  "round; the ratio of the medians; and, where measured, the ratio of the medians when all models "
                  "are stepped in turn one token at a time (each model's tok/s there in brackets):", "",
                  "| model | ppl vs peer | decode vs peer, per round | decode vs peer, medians | "
                  "decode vs peer, token-interleaved | size vs peer |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name in ppl:
            if not name.startswith(("ours_int4_int8act", "ours_default")) or name not in speed:
                continue
            rounds = [a / b for a, b in zip(speed[name]["runs_decode_tok_s"], speed[peer]["runs_decode_tok_s"])]
            lines.append(f"| {name} | {100 * (ppl[name]['ppl'] / ppl[peer]['ppl'] - 1):+.1f}% | "
                         f"{statistics.median(rounds):.3f}x | "
                         f"{speed[name]['decode_tok_s'] / speed[peer]['decode_tok_s']:.3f}x | "
                         + (f"{inter[name]['decode_tok_s'] / inter[peer]['decode_tok_s']:.3f}x "
                            f"({inter[name]['decode_tok_s']:.1f} vs {inter[peer]['decode_tok_s']:.1f}) | "
                            if name in inter and peer in inter else "| ") +
                         f"{size[name] / size[peer]:.3f}x ({(size[name] - size[peer]) / 1e6:+.2f} MB) |")
    p = r["parity"]
    lines += ["", f"Parity with PyTorch on the same dequantised weights, {p['positions']} positions, max |logit "
              f"diff| (relative to the largest logit): ort fp32 {p['max_abs_diff']:.2e} ({p['relative']:.1e})"]
    for key, label in (("parity_trt_matmulnbits", "trt fp32"), ("parity_trt_fp16", "trt fp16"),
                       ("parity_trt_native_symmetric", "trt --trt-native fp32 (symmetric RTN checkpoint)")):
        if key in r:
            lines[-1] += f"; {label} {r[key]['max_abs_diff']:.2e} ({r[key]['relative']:.1e})"
    lines[-1] += "."
    lines.append(f"Greedy 64 tokens identical to PyTorch: {sum(g['identical'] for g in r['greedy_64'])} of "
                 f"{len(r['greedy_64'])} prompts.")
    return "\n".join(lines) + "\n"


def time_decode(results: dict, folders: dict, prompt: list, args, fmodel=None, save=lambda: None):
    """Round-robin decode timing (order alternating every round), then the token-interleaved one, into results."""
    runs = {k: [] for k in (["pytorch_float"] if fmodel is not None else []) + list(folders)}
    for i in range(args.repeats):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:  # alternate the order against drifting load
            if name == "pytorch_float":
                runs[name].append(torch_greedy(fmodel, prompt, args.new_tokens, timed=True)[1])
            else:
                runs[name].append(ort_decode(folders[name], prompt, args.new_tokens))
    speed = {k: {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in v),
                 "prefill_s": statistics.median(r["prefill_s"] for r in v),
                 "runs_decode_tok_s": [round(r["decode_tok_s"], 2) for r in v]} for k, v in runs.items()}
    base = speed.get("pytorch_float", {}).get("decode_tok_s", float("nan"))
    for v in speed.values():
        v["vs_pytorch_float"] = v["decode_tok_s"] / base
    results["decode"] = {"batch": 1, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                         "repeats": args.repeats, "median": speed}
    save()
    inter = [interleaved_decode(folders, prompt, args.new_tokens) for _ in range(args.repeats)]
    results["decode_interleaved"] = {
        "repeats": args.repeats,
        "median": {k: {"decode_tok_s": statistics.median(r[k] for r in inter),
                       "runs_decode_tok_s": [round(r[k], 2) for r in inter]} for k in folders},
    }
    save()


def defaults_verdict(r: dict, ours: str = "ours_default", peer: str = "peer_int4") -> dict:
    """The issue's bar for the default export against the builder's default int4: lower perplexity, no larger,
    at least 0.98x its token-interleaved decode speed."""
    ppl = {k: r["wikitext2_test_ppl"][k]["ppl"] for k in (ours, peer)}
    size = {k: r["size_bytes"][k] for k in (ours, peer)}
    inter = {k: r["decode_interleaved"]["median"][k]["decode_tok_s"] for k in (ours, peer)}
    rounds = r["decode"]["median"]
    per_round = [a / b for a, b in zip(rounds[ours]["runs_decode_tok_s"], rounds[peer]["runs_decode_tok_s"])]
    interleaved = [a / b for a, b in zip(r["decode_interleaved"]["median"][ours]["runs_decode_tok_s"],
                                         r["decode_interleaved"]["median"][peer]["runs_decode_tok_s"])]
    speed = inter[ours] / inter[peer]
    return {"ppl": ppl, "size_bytes": size, "decode_tok_s_interleaved": inter,
            "speed_vs_peer_interleaved": round(speed, 4),
            "speed_vs_peer_interleaved_per_round": [round(x, 3) for x in interleaved],
            "speed_vs_peer_round_robin_per_round_median": round(statistics.median(per_round), 4),
            "lower_ppl": ppl[ours] < ppl[peer], "no_larger": size[ours] <= size[peer], "speed_at_least_0.98x": speed >= 0.98}


def decode_only(args) -> int:
    """Re-time ONNX folders already in --work (no export, no perplexity): OUT.json / OUT.md."""
    from awq_edge.checkpoint.hf_folder import load_tokenizer

    folders = {name: Path(args.work) / name for name in args.models.split(",")}
    missing = [str(f) for f in folders.values() if not (f / "model.onnx").is_file()]
    if missing:
        print(f"no exported model in {', '.join(missing)}: run the full benchmark first")
        return 2
    tokenizer = load_tokenizer(resolve_model_dir(args.model))
    prompt = text_tokens(tokenizer, Path(args.wikitext) / "valid.txt", args.prompt_tokens).tolist()
    results = {"command": "python -P " + " ".join(sys.argv), "model": args.model, "host": platform.platform(),
               "versions": {"onnxruntime": ort.__version__}, "work": args.work, "size_bytes": {k: onnx_size(v) for k, v in folders.items()},
               "export_options": {k: json.loads((v / "awq_edge_export.json").read_text())
                                  for k, v in folders.items() if (v / "awq_edge_export.json").is_file()}}

    def save():
        Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")

    time_decode(results, folders, prompt, args, save=save)
    speed, inter = results["decode"]["median"], results["decode_interleaved"]["median"]
    peer = "peer_int4"
    lines = [f"# Decode-only re-timing on {args.model} ({results['host']}, onnxruntime {ort.__version__})", "",
             f"Batch 1, {args.new_tokens} new tokens after a {len(prompt)}-token prompt, {args.repeats} rounds, "
             "round-robin with the order alternating each round, then all models stepped in turn one token at a "
             "time. Folders from " + args.work + ".", "",
             "| model | decode tok/s (round-robin) | vs peer, per round | vs peer, medians | "
             "decode tok/s (token-interleaved) | vs peer, interleaved | size MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in folders:
        rounds = [a / b for a, b in zip(speed[name]["runs_decode_tok_s"], speed[peer]["runs_decode_tok_s"])] \
            if peer in speed else [float("nan")]
        ref, ref_i = speed.get(peer, {}).get("decode_tok_s", float("nan")), inter.get(peer, {}).get(
            "decode_tok_s", float("nan"))
        lines.append(f"| {name} | {speed[name]['decode_tok_s']:.1f} | {statistics.median(rounds):.3f}x | "
                     f"{speed[name]['decode_tok_s'] / ref:.3f}x | {inter[name]['decode_tok_s']:.1f} | "
                     f"{inter[name]['decode_tok_s'] / ref_i:.3f}x | {results['size_bytes'][name] / 1e6:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quant-dir", help="AWQ w4 g64 checkpoint of --model (awq-edge quantize)")
    ap.add_argument("--sym-quant-dir", help="a symmetric (--no-zero-point) checkpoint, to check --trt-native on it")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default="/tmp/awq-edge-onnx-bench", help="where the ONNX folders are written")
    ap.add_argument("--wikitext", default=str(SHARED))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx"))
    ap.add_argument("--models", help="comma-separated subset of the ONNX models and pytorch_float to evaluate "
                    "(default: all); ours_int4 and pytorch_awq always run, as the references")
    ap.add_argument("--markdown-only", action="store_true", help="only re-render OUT.md from OUT.json")
    ap.add_argument("--decode-only", action="store_true",
                    help="only re-time the ONNX folders named by --models that a full run left in --work")
    args = ap.parse_args()
    if args.markdown_only:
        Path(args.out + ".md").write_text(markdown(json.loads(Path(args.out + ".json").read_text())))
        return 0
    if args.decode_only:
        if not args.models:
            ap.error("--decode-only needs --models (folder names under --work, e.g. ours_...,peer_int4)")
        return decode_only(args)
    if not args.quant_dir:
        ap.error("--quant-dir is required (an AWQ checkpoint of --model, from `awq-edge quantize`)")
    wt = Path(args.wikitext)
    if not (wt / "test.txt").is_file():
        print(f"skip: WikiText-2 not found at {wt} (pass --wikitext DIR)")
        return 0
    work, quant_dir = Path(args.work), Path(args.quant_dir)
    hf_dir = resolve_model_dir(args.model)
    quant_config = json.loads((quant_dir / "config.json").read_text())
    results = {"command": "python -P " + " ".join(sys.argv), "model": args.model, "quant_dir": str(quant_dir),
               "quantization": quant_config["quantization_config"],
               "quantiser": quant_config.get("awq_edge"), "host": platform.platform(),
               "cpu_threads": torch.get_num_threads(),
               "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__}}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")

    def wanted(name):
        return not args.models or name in ("ours_int4", *args.models.split(","))

    folders, build_s = {}, {}
    for name, opts, src, allow_float in (
        ("ours_int4", ExportOptions(), quant_dir, False),
        ("ours_default", export_options(), quant_dir, False),  # what `awq-edge export` writes with no flag
        ("ours_default_no_outliers", export_options(head_outliers=0), quant_dir, False),  # the whole head at 4 bits
        ("ours_default_sym_head", export_options(head_symmetric=True), quant_dir, False),  # no head zero points
        ("ours_int4_int8act", ExportOptions(accuracy_level=4), quant_dir, False),
        ("ours_int4_int8act_head8", ExportOptions(accuracy_level=4, head_bits=8), quant_dir, False),
        ("ours_int4_int8act_head4", ExportOptions(accuracy_level=4, head_bits=4), quant_dir, False),
        # The head's scales searched on the final norm's activations over the builtin calibration text
        # (the same text the checkpoint was calibrated on; never WikiText-2), symmetric: no zero points.
        ("ours_int4_int8act_head4sym_calib", ExportOptions(accuracy_level=4, head_bits=4, head_calib="builtin",
                                                           head_symmetric=True), quant_dir, False),
        ("ours_int4_int8act_head4sym_g64_calib", ExportOptions(accuracy_level=4, head_bits=4, head_group=64,
                                                               head_calib="builtin", head_symmetric=True),
         quant_dir, False),
        ("ours_fp32", ExportOptions(), hf_dir, True),
    ):
        if not wanted(name):
            continue
        t0 = time.perf_counter()
        folders[name] = export(src, work / name, opts, allow_float=allow_float)
        build_s[name] = round(time.perf_counter() - t0, 1)
    # The builder's defaults (int4: symmetric RTN, blocks of 32, int8 activations, 4-bit head) and, for a
    # like-for-like group, blocks of 64 as in our checkpoint.
    for name, precision, extra in (("peer_int4", "int4", ()), ("peer_int4_g64", "int4", ("--extra_options", "block_size=64")),
                                   ("peer_fp32", "fp32", ())):
        if not wanted(name):
            continue
        folders[name] = work / name
        build_s[name] = run_peer_builder(hf_dir, folders[name], precision, extra)
    results["export_seconds"] = build_s
    float_bytes = (hf_dir / "model.safetensors").stat().st_size
    results["size_bytes"] = {"float_fp16_safetensors": float_bytes, **{k: onnx_size(v) for k, v in folders.items()}}
    save()

    qmodel, tokenizer = load_quantized_model(quant_dir)
    fmodel, _ = load_float_model(hf_dir)
    text_ids = text_tokens(tokenizer, wt / "test.txt", args.eval_tokens)
    results["parity"] = parity(folders["ours_int4"], qmodel, text_ids[: args.prompt_tokens].tolist())
    results["greedy_64"] = greedy_agreement(folders["ours_int4"], qmodel, tokenizer, 64)
    trt = export(quant_dir, work / "ours_trt", ExportOptions(target="trt"))
    results["parity_trt_matmulnbits"] = parity(trt, qmodel, text_ids[: args.prompt_tokens].tolist())
    trt16 = export(quant_dir, work / "ours_trt_fp16", ExportOptions(target="trt", dtype="fp16"))
    results["parity_trt_fp16"] = parity(trt16, qmodel, text_ids[: args.prompt_tokens].tolist())
    if args.sym_quant_dir:
        sym_model, _ = load_quantized_model(Path(args.sym_quant_dir))
        native = export(args.sym_quant_dir, work / "ours_trt_native", ExportOptions(target="trt", trt_native=True))
        results["parity_trt_native_symmetric"] = parity(native, sym_model, text_ids[: args.prompt_tokens].tolist())
        del sym_model
    save()

    ppl = {}
    torch_models = [("pytorch_float", fmodel)] if wanted("pytorch_float") else []
    for name, model in torch_models + [("pytorch_awq", qmodel)] + [(k, OnnxLM(v)) for k, v in folders.items()]:
        ppl[name] = perplexity(model, tokenizer, text_ids, args.seqlen, batch_size=1, progress=False)
        print(name, ppl[name], flush=True)
    ref = ppl["pytorch_awq"]["ppl"]
    results["wikitext2_test_ppl"] = {k: {**v, "vs_pytorch_awq": v["ppl"] / ref - 1} for k, v in ppl.items()}
    save()

    prompt = text_tokens(tokenizer, wt / "valid.txt", args.prompt_tokens).tolist()
    time_decode(results, folders, prompt, args, fmodel, save)
    if {"ours_default", "peer_int4"} <= set(folders):
        results["defaults_vs_peer"] = defaults_verdict(results)
        save()
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
