"""The quantiser's subcommands: `awq-edge quantize` and `awq-edge eval`."""

import json
import time
from pathlib import Path


from awq_edge import calib
from awq_edge.api import pick_device
from awq_edge.checkpoint import load_quantized_model
from awq_edge.errors import AwqEdgeError
from awq_edge.eval import perplexity, text_tokens
from awq_edge.model import load_float_model, resolve_model_dir
from awq_edge.quantize import METHODS


def run_quantize(args) -> int:
    from awq_edge.api import quantize

    qm = quantize(args.model, method=args.method, w_bit=args.w_bit, group_size=args.group_size,
                  zero_point=not args.no_zero_point, calib_source=args.calib, n_samples=args.n_samples,
                  seqlen=args.seqlen, keep_8bit=args.keep_8bit, device=args.device,
                  max_gpu_memory=args.max_gpu_memory, output=args.output)
    out, report = qm.path, qm.report
    if args.sensitivity or args.keep_8bit:
        sens = {"sensitivity": report["sensitivity"], "alphas": report["alphas"],
                "int8_modules": report.get("int8_modules", [])}
        (out / "sensitivity.json").write_text(json.dumps(sens, indent=2) + "\n")
        worst = sorted(sens["sensitivity"].items(), key=lambda kv: kv[1], reverse=True)[:10]
        print("most sensitive linears (relative output error at 4 bits on held-out tokens):")
        for name, err in worst:
            print(f"  {err:.3e}  {name}{'  -> 8 bit' if name in sens['int8_modules'] else ''}")
    if args.method in ("awq", "awq-gptq") and report["scale_groups"]:
        print(f"AWQ kept {report['scales_kept']}/{report['scale_groups']} scale groups and "
              f"{report['clip_kept'][0]}/{report['clip_kept'][1]} clipped weight groups that beat "
              f"round-to-nearest on {report['n_held_out']} held-out samples")
    print(f"wrote {out}", flush=True)
    return 0


def run_eval(args) -> int:
    device = pick_device(args.device)
    path = Path(args.model)
    if (path / "config.json").is_file() and "quantization_config" in json.loads((path / "config.json").read_text()):
        model, tokenizer = load_quantized_model(path)
    else:
        path = resolve_model_dir(args.model)
        model, tokenizer = load_float_model(path)
    model.to(device)
    text = Path(args.text) if args.text else None
    if text is None:
        raise AwqEdgeError("no evaluation text given", "pass --text FILE (e.g. WikiText-2 test.txt)")
    ids = text_tokens(tokenizer, text, args.max_tokens)
    t0 = time.perf_counter()
    res = perplexity(model, tokenizer, ids, args.seqlen, device=device)
    res.update({"model": str(args.model), "text": str(text), "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(res) if args.json else f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens "
          f"(seqlen {res['seqlen']}, {res['windows']} windows) in {res['seconds']} s")
    return 0


def register(sub) -> None:
    q = sub.add_parser("quantize", help="quantise a model's linears to 4 bits (AWQ or RTN)")
    q.add_argument("model", help="builtin model name (smollm2-135m) or a local Hugging Face folder")
    q.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    q.add_argument("--method", choices=METHODS, default="awq")
    q.add_argument("--w-bit", type=int, default=4)
    q.add_argument("--group-size", type=int, default=None,
                   help="default: 128 if it divides every linear's input width, else 64, else 32")
    q.add_argument("--no-zero-point", action="store_true", help="symmetric weights (needed by TensorRT's native int4)")
    q.add_argument("--calib", help=f"calibration source: {calib.SOURCES_HELP}; default: {calib.MIXED}")
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--sensitivity", action="store_true", help="report each linear's output error")
    q.add_argument("--keep-8bit", type=int, default=0, metavar="N", help="keep the N most sensitive linears at 8 bits")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda")
    q.add_argument("--max-gpu-memory", type=float, metavar="GIB",
                   help="bound the layer loop's GPU memory (default: 90%% of what is free); activations move to "
                        "host memory and chunks shrink to fit")
    q.set_defaults(func=run_quantize)

    e = sub.add_parser("eval", help="perplexity of a float or quantised model on a text file")
    e.add_argument("model", help="builtin model name, Hugging Face folder, or quantised checkpoint")
    e.add_argument("--text", help="UTF-8 text file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=0, help="evaluate only the first N tokens (0: all)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=run_eval)
