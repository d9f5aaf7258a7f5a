"""`awq-edge export`: quantised checkpoint folder -> ONNX folder for onnxruntime(-genai) or TensorRT."""

import argparse
import json
from pathlib import Path

from awq_edge.calib import SOURCES_HELP
from awq_edge.errors import AwqEdgeError
from awq_edge.arch.weights import Checkpoint
from awq_edge.export.decoder import ExportOptions, build_decoder
from awq_edge.export.save import DATA_FILE, MODEL_FILE, genai_config, write_folder
from awq_edge.export.tokenizer import TOKENIZER_FILES
from awq_edge.model import check_safetensors, read_config_json
from awq_edge.outputs import check_output_dir, remove_stale

# --target ort's default: the configuration that beats onnxruntime-genai's own int4 build of the same model on
# the CPU (bench/results/onnx_defaults.json): int8 activations in MatMulNBits, and the float head (with the
# tied embeddings) at 4 bits, symmetric, groups of 64, its scales chosen on builtin calibration text.
ORT_DEFAULTS = {"accuracy_level": 4, "head_bits": 4, "head_group": 64, "head_calib": "builtin", "head_symmetric": True}
EXPORT_FILES = frozenset({MODEL_FILE, DATA_FILE, "genai_config.json", "awq_edge_export.json", *TOKENIZER_FILES})


def export_options(target: str = "ort", exact: bool = False, **overrides) -> ExportOptions:
    """The options `awq-edge export` uses: ORT_DEFAULTS for onnxruntime unless exact (bit-exact int4 of the
    checkpoint, float head); overrides (None: not given) apply on top."""
    opts = dict(ORT_DEFAULTS) if target == "ort" and not exact else {}
    opts.update({k: v for k, v in overrides.items() if v is not None})
    head = sorted(k for k in ("head_bits", "head_group", "head_calib", "head_symmetric") if overrides.get(k))
    if target != "ort" and head:
        flags = ", ".join("--" + k.replace("_", "-") for k in head)
        raise AwqEdgeError(f"{flags}: the head is re-quantised for --target ort only", "drop them for --target trt")
    if opts.get("trt_native") and target != "trt":
        raise AwqEdgeError("--trt-native applies to --target trt only", "add --target trt or drop --trt-native")
    group = opts.get("head_group", 32)
    if group < 16 or group & (group - 1):
        raise AwqEdgeError(f"--head-group {group} is not a power of two of at least 16", "use --head-group 64 or 32")
    return ExportOptions(target=target, **opts)


def check_source(quant_dir) -> Path:
    """Refuse a checkpoint whose config or weights cannot be read, before any graph is built."""
    folder = Path(quant_dir)
    if not folder.is_dir():
        raise AwqEdgeError(f"checkpoint folder {folder} not found", "pass the folder written by `awq-edge quantize`")
    if (folder / "genai_config.json").is_file():
        raise AwqEdgeError(f"{folder} is already an exported ONNX folder", "pass the checkpoint it was exported from")
    if (folder / "config.json").is_file():
        read_config_json(folder)
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)
    return folder


def export(quant_dir, out_dir, opts: ExportOptions = ExportOptions(), allow_float: bool = False) -> Path:
    """Build the decoder graph from the checkpoint and write the folder; returns its path. The options default
    to the exact export; `awq-edge export` and awq_edge's API pass export_options()."""
    folder = check_source(quant_dir)
    out = check_output_dir(out_dir, inputs=[folder], is_ours=lambda d: (d / "awq_edge_export.json").is_file(),
                           our_files=EXPORT_FILES, what="export")
    remove_stale(out)
    ck = Checkpoint(folder, allow_float)
    if opts.head_calib and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise AwqEdgeError(f"--head-calib needs the checkpoint's tokenizer, and {folder} has none (the default "
                           f"export calibrates its 4-bit head on {opts.head_calib!r} text)",
                           "copy the model's tokenizer files into it, or pass --head-calib none or --exact")
    model = build_decoder(ck, opts)
    gen_path = ck.folder / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    genai = genai_config(ck.config, generation, model, ck.spec.dims)
    extra = {
        "target": opts.target, "dtype": opts.dtype, "trt_native": opts.trt_native,
        "accuracy_level": opts.accuracy_level, "head_bits": opts.head_bits,
        "head_group": opts.head_group, "head_calib": opts.head_calib, "head_symmetric": opts.head_symmetric,
        "group_size": ck.group_size, "model_type": ck.config["model_type"],
    }
    write_folder(out, model, genai, ck.folder, extra)
    return out


def run(args) -> int:
    level = None if args.int8_activations is None else (4 if args.int8_activations else 0)
    calib = None if args.head_calib is None else ("" if args.head_calib == "none" else args.head_calib)
    opts = export_options(args.target, args.exact, dtype=args.dtype, trt_native=args.trt_native or None,
                          accuracy_level=level, head_bits=args.head_bits, head_group=args.head_group,
                          head_calib=calib, head_symmetric=args.head_symmetric)
    out = export(args.quant_dir, args.output, opts)
    kind = "exact int4" if opts.accuracy_level == 0 and opts.head_bits == 0 else (
        f"int8 activations: {opts.accuracy_level == 4}, head: {opts.head_bits or 'float'}"
        f"{f' bits g{opts.head_group}' if opts.head_bits else ''}")
    print(f"wrote {out} ({opts.target}, {opts.dtype}, {kind})")
    return 0


def register(subparsers):
    p = subparsers.add_parser("export", help="export a quantised checkpoint to ONNX (MatMulNBits, KV cache)",
                              description=__doc__)
    p.add_argument("quant_dir", help="folder written by `awq-edge quantize`, or an AutoAWQ GEMM checkpoint")
    p.add_argument("-o", "--output", required=True, help="ONNX folder to write (replaced atomically)")
    p.add_argument("--target", choices=("ort", "trt"), default="ort",
                   help="ort: onnxruntime fused ops + genai_config.json; trt: ops TensorRT 10.3 parses")
    p.add_argument("--exact", action="store_true",
                   help="with --target ort: the checkpoint's int4 weights exactly, float activations and float head "
                        "(the default instead uses int8 activations and a calibrated 4-bit head: smaller, faster, "
                        "and lower perplexity than onnxruntime-genai's int4)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="activation dtype (fp32 is fastest on CPU)")
    p.add_argument("--trt-native", action="store_true",
                   help="with --target trt: int4 DequantizeLinear + MatMul (symmetric checkpoints only)")
    p.add_argument("--int8-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="MatMulNBits accuracy_level 4: int8 activations (default with --target ort unless --exact)")
    p.add_argument("--head-bits", type=int, choices=(0, 8, 4), default=None,
                   help="with --target ort: round the float lm_head (and tied embeddings) to 8 or 4 bits, 0 keeps it "
                        "float (default 4 unless --exact)")
    p.add_argument("--head-group", type=int, default=None, help="group size for --head-bits (default 64)")
    p.add_argument("--head-calib", metavar="SOURCE",
                   help="with --head-bits: choose the head's scales to minimise the logit error on the final norm's "
                        f"activations over this calibration text ({SOURCES_HELP}), or 'none' to round to nearest "
                        "(default builtin)")
    p.add_argument("--head-symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="with --head-bits: symmetric head, no zero points stored (default on)")
    p.set_defaults(func=run)
