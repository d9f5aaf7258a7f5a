"""`awq-edge export`: quantised checkpoint folder -> ONNX folder for onnxruntime(-genai) or TensorRT."""

import argparse

from awq_edge.export.api import export, export_options
from awq_edge.export.folder import read_export_info

from awq_edge.quantizer.calib import SOURCES_HELP


def run(args) -> int:
    level = None if args.int8_activations is None else (4 if args.int8_activations else 0)
    calib = None if args.head_calib is None else ("" if args.head_calib == "none" else args.head_calib)
    opts = export_options(args.target, args.exact, dtype=args.dtype, trt_native=args.trt_native or None,
                          accuracy_level=level, head_bits=args.head_bits, head_group=args.head_group,
                          head_calib=calib, head_symmetric=args.head_symmetric,
                          head_outliers=args.head_outliers)
    out = export(args.quant_dir, args.output, opts)
    info = read_export_info(out)  # the head the defaults chose for this model
    bits, n8 = info["head_bits"], info["head_outliers"]
    kind = "exact int4" if opts.accuracy_level == 0 and bits == 0 else (
        f"int8 activations: {opts.accuracy_level == 4}, head: {bits or 'float'}"
        f"{f' bits g{opts.head_group}' if bits else ''}"
        f"{f', its {n8} largest input channels 8-bit' if n8 else ''}")
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
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="activation dtype (fp32 is fastest on CPU; fp16 for onnxruntime's CUDA provider)")
    p.add_argument("--trt-native", action="store_true",
                   help="with --target trt: int4 DequantizeLinear + MatMul (symmetric checkpoints only)")
    p.add_argument("--int8-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="MatMulNBits accuracy_level 4: int8 activations (default with --target ort unless --exact)")
    p.add_argument("--head-bits", type=int, choices=(0, 8, 4), default=None,
                   help="with --target ort: round the float lm_head (and tied embeddings) to 8 or 4 bits, 0 keeps it "
                        "float (default 4 unless --exact; with --dtype fp16, one node: 8 where vocab x hidden is at "
                        "most 64Mi, else 4)")
    p.add_argument("--head-group", type=int, default=None, help="group size for --head-bits (default 64)")
    p.add_argument("--head-calib", metavar="SOURCE",
                   help="with --head-bits: choose the head's scales to minimise the logit error on the final norm's "
                        "activations: 'checkpoint' (default: the statistics `awq-edge quantize` stored; a checkpoint "
                        "without them is measured on builtin text), a calibration text measured here with the "
                        f"model in PyTorch ({SOURCES_HELP}), or 'none' to round to nearest")
    p.add_argument("--head-symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="with --head-bits: symmetric head, no zero points stored (default off: zero points cost 0.2 MB "
                        "on SmolLM2 and read 0.7%% lower perplexity on one checkpoint, 0.4%% higher on another)")
    p.add_argument("--head-outliers", type=int, metavar="N", default=None,
                   help="with --head-bits 4 and --head-calib: round the head's N input channels of largest mean "
                        "square activation to 8 bits, N a multiple of --head-group (default: 64 or one head group, "
                        "where that is at most half the model's width, else 0; with --dtype fp16 0; 0 for none)")
    p.set_defaults(func=run)
