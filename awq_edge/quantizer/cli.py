"""The quantiser's subcommands: `awq-edge quantize` and `awq-edge eval`."""

import json
import time
from pathlib import Path

from awq_edge.checkpoint.hf_folder import check_tokenizer_json, read_config_json, tensor_headers
from awq_edge.checkpoint.reader import load_quantized_model
from awq_edge.checkpoint.writer import check_checkpoint_output, estimate_bytes
from awq_edge.errors import AwqEdgeError
from awq_edge.quantizer import calib
from awq_edge.quantizer.api import check_device, check_options, pick_device
from awq_edge.quantizer.eval import perplexity, text_tokens
from awq_edge.quantizer.layerwise import METHODS
from awq_edge.quantizer.source import load_float_model, resolve_model_dir


def check_quantize_args(args) -> Path:
    """Every refusal that needs no model loaded, before the minutes of work: options, input, output. Returns
    the model folder."""
    check_options(method=args.method, w_bit=args.w_bit, group_size=args.group_size, zero_point=not args.no_zero_point,
                  calib_source=args.calib, n_samples=args.n_samples, seqlen=args.seqlen, keep_8bit=args.keep_8bit,
                  sensitivity=args.sensitivity, device=args.device, max_gpu_memory=args.max_gpu_memory)
    gs = args.group_size
    if args.calib not in (None, calib.MIXED, calib.BUILTIN, calib.SAMPLED):
        calib.read_texts(Path(args.calib))
    path = resolve_model_dir(args.model)
    qc = read_config_json(path).get("quantization_config")
    if qc is not None:
        raise AwqEdgeError(f"{path} is already quantised (quant_method {qc.get('quant_method')!r}), "
                           "and AWQ needs the float weights", "pass the float model the checkpoint was made from")
    check_checkpoint_output(args.output, inputs=[path], need_bytes=estimate_bytes(tensor_headers(path), gs or 32))
    return path


def check_eval_args(args) -> None:
    if args.seqlen < 2:
        raise AwqEdgeError(f"--seqlen {args.seqlen}: a perplexity window needs at least 2 tokens", "use --seqlen >= 2")
    if args.max_tokens < 0:
        raise AwqEdgeError(f"--max-tokens {args.max_tokens} is negative", "use --max-tokens 0 (the whole text) or more")
    check_device(args.device)
    if args.text is None:
        raise AwqEdgeError("no evaluation text given", "pass --text FILE (e.g. WikiText-2 test.txt)")
    text = Path(args.text)
    if not text.is_file():
        raise AwqEdgeError(f"text file {text} not found", "pass an existing UTF-8 text file to --text")
    try:
        text.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise AwqEdgeError(f"{text} is not UTF-8 text ({e.reason} at byte {e.start})",
                           "convert it, e.g. iconv -t utf-8, or pass another --text file") from None


def run_quantize(args) -> int:
    from awq_edge.quantizer.api import quantize

    check_quantize_args(args)
    qm = quantize(args.model, method=args.method, w_bit=args.w_bit, group_size=args.group_size,
                  zero_point=not args.no_zero_point, calib_source=args.calib, n_samples=args.n_samples,
                  seqlen=args.seqlen, keep_8bit=args.keep_8bit, sensitivity=args.sensitivity, device=args.device,
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
    if report["scale_groups"]:
        clipped = report["clip_kept"]
        print(f"AWQ kept {report['scales_kept']}/{report['scale_groups']} scale groups"
              + (f" and {clipped[0]}/{clipped[1]} clipped weight groups" if clipped[1] else "")
              + f" that beat round-to-nearest on {report['n_held_out']} held-out samples")
    print(f"wrote {out}", flush=True)
    return 0


def run_eval(args) -> int:
    check_eval_args(args)
    device = pick_device(args.device)
    path = Path(args.model)
    if path.is_dir() and "quantization_config" in read_config_json(path):
        check_tokenizer_json(path)
        model, tokenizer = load_quantized_model(path)
    else:
        path = resolve_model_dir(args.model)
        model, tokenizer = load_float_model(path)
    model.to(device)
    text = Path(args.text)
    ids = text_tokens(tokenizer, text, args.max_tokens)
    if ids.numel() < args.seqlen - 1:  # checked here: a --seqlen past int64 would overflow torch's view
        raise AwqEdgeError(f"text has {ids.numel()} tokens, fewer than one window of {args.seqlen}",
                           "use more text or a smaller --seqlen")
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
    q.add_argument("--method", choices=METHODS, default=None,
                   help="awq: AWQ's scales and clipping, rounded to nearest; awq-gptq: AWQ's scales, then GPTQ's "
                        "rounding; gptq; rtn: round to nearest. Default: awq-gptq at group size 128, awq below "
                        "(what measured best at each)")
    q.add_argument("--w-bit", type=int, default=4)
    q.add_argument("--group-size", type=int, default=None,
                   help="default: 128 if it divides every linear's input width, else 64, else 32")
    q.add_argument("--no-zero-point", action="store_true", help="symmetric weights (needed by TensorRT's native int4)")
    q.add_argument("--calib", help=f"calibration source: {calib.SOURCES_HELP}; default: {calib.MIXED}")
    q.add_argument("--n-samples", type=int, default=None,
                   help="calibration blocks of --seqlen tokens (default: 128 on a GPU, 16 on a CPU)")
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
