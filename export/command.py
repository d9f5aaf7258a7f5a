"""`awq-edge export`: quantised checkpoint folder -> ONNX folder for onnxruntime(-genai) or TensorRT."""

import json
from pathlib import Path

from awq_edge.calib import SOURCES_HELP
from awq_edge.arch.weights import Checkpoint
from awq_edge.export.decoder import ExportOptions, build_decoder
from awq_edge.export.save import genai_config, write_folder


def export(quant_dir, out_dir, opts: ExportOptions = ExportOptions(), allow_float: bool = False) -> Path:
    """Build the decoder graph from the checkpoint and write the folder; returns its path."""
    ck = Checkpoint(quant_dir, allow_float)
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
    out = Path(out_dir)
    write_folder(out, model, genai, ck.folder, extra)
    return out


def run(args) -> int:
    opts = ExportOptions(target=args.target, dtype=args.dtype, trt_native=args.trt_native,
                         accuracy_level=4 if args.int8_activations else 0, head_bits=args.head_bits,
                         head_group=args.head_group, head_calib=args.head_calib or "",
                         head_symmetric=args.head_symmetric)
    out = export(args.quant_dir, args.output, opts)
    print(f"wrote {out}")
    return 0


def register(subparsers):
    p = subparsers.add_parser("export", help="export a quantised checkpoint to ONNX (MatMulNBits, KV cache)",
                              description=__doc__)
    p.add_argument("quant_dir", help="folder written by `awq-edge quantize`, or an AutoAWQ GEMM checkpoint")
    p.add_argument("-o", "--output", required=True, help="ONNX folder to write (replaced atomically)")
    p.add_argument("--target", choices=("ort", "trt"), default="ort",
                   help="ort: onnxruntime fused ops + genai_config.json; trt: ops TensorRT 10.3 parses")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="activation dtype (fp32 is fastest on CPU)")
    p.add_argument("--trt-native", action="store_true",
                   help="with --target trt: int4 DequantizeLinear + MatMul (symmetric checkpoints only)")
    p.add_argument("--int8-activations", action="store_true",
                   help="MatMulNBits accuracy_level 4: int8 activations, faster on CPU, slightly less exact")
    p.add_argument("--head-bits", type=int, choices=(8, 4), default=0,
                   help="with --target ort: round the float lm_head (and tied embeddings) to 8 or 4 bits, "
                        "smaller and faster on CPU; the only option that changes the checkpoint's numbers")
    p.add_argument("--head-group", type=int, default=32, help="group size for --head-bits (default 32)")
    p.add_argument("--head-calib", metavar="SOURCE",
                   help="with --head-bits: choose the head's scales to minimise the logit error on the final norm's "
                        f"activations over this calibration text ({SOURCES_HELP}) instead of rounding to nearest")
    p.add_argument("--head-symmetric", action="store_true",
                   help="with --head-bits: symmetric head, no zero points stored (smaller)")
    p.set_defaults(func=run)
