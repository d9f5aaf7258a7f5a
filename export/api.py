"""Export a quantised checkpoint folder to an ONNX folder for onnxruntime(-genai) or TensorRT: the options
`awq-edge export` and `QuantizedModel.export` use, and `export` itself."""

import json
from pathlib import Path

from awq_edge.export.decoder import (AUTO_BITS, AUTO_OUTLIERS, FROM_CHECKPOINT, ExportOptions, build_decoder,
                                     casts_logits, resolve_head)
from awq_edge.export.folder import (DATA_FILE, EXPORT_FILES, GENAI_CONFIG, ExternalData, genai_config,
                                    is_export, staged, write_folder)

from awq_edge.checkpoint.reader import Checkpoint
from awq_edge.errors import AwqEdgeError
from awq_edge.outputs import check_output_dir, remove_stale
from awq_edge.quant import check_group_size

# --target ort's default: the configuration that beats onnxruntime-genai's own int4 build of the same model on
# the CPU (bench/results/onnx_defaults_outliers.json): int8 activations in MatMulNBits, and the float head (with
# the tied embeddings) at 4 bits with zero points in groups of 64, its 64 input channels of largest activation
# (128 where a tied table with zero points would keep an odd number of groups a row: export/decoder.py,
# odd_gather_groups) at 8 bits,
# channels and scales chosen on the final norm's statistics the quantiser stored in the checkpoint.
ORT_DEFAULTS = {"accuracy_level": 4, "head_bits": 4, "head_group": 64, "head_calib": FROM_CHECKPOINT,
                "head_symmetric": False, "head_outliers": AUTO_OUTLIERS}
# --dtype fp16, the GPU's export: a small head (export/decoder.py, GPU_HEAD8_MAX_WEIGHTS) is one 8-bit MatMulNBits,
# faster on the CUDA provider than the split's five more nodes; a large one is the CPU default's split head (one
# plain 4-bit node of SmolLM2's tied head read perplexity 380 on the CUDA provider: export/decoder.py,
# odd_gather_groups; bench/results/history/onnx_gpu_h100.json).
GPU_DEFAULTS = {"head_bits": AUTO_BITS, "head_outliers": AUTO_OUTLIERS}
HEAD_OPTIONS = ("head_bits", "head_group", "head_calib", "head_symmetric", "head_outliers")


def export_options(target: str = "ort", exact: bool = False, **overrides) -> ExportOptions:
    """The options `awq-edge export` uses: ORT_DEFAULTS for onnxruntime unless exact (bit-exact int4 of the
    checkpoint, float head), with GPU_DEFAULTS' head for fp16; overrides (None: not given) apply on top."""
    opts = dict(ORT_DEFAULTS) if target == "ort" and not exact else {}
    if opts and overrides.get("dtype") == "fp16":
        opts.update(GPU_DEFAULTS)
    if overrides.get("head_bits") == 0:  # a float head: the defaults for rounding one do not apply
        opts = {k: v for k, v in opts.items() if k not in HEAD_OPTIONS}
    opts.update({k: v for k, v in overrides.items() if v is not None})
    n8 = overrides.get("head_outliers")
    if n8 is not None and (type(n8) is not int or n8 < 0):
        raise AwqEdgeError(f"--head-outliers {n8!r} is not a whole number >= 0", "use --head-outliers 64, or 0 for none")
    if n8 and opts.get("head_bits") == AUTO_BITS:  # an outlier split belongs to a 4-bit head
        opts["head_bits"] = 4
    head = sorted(k for k in HEAD_OPTIONS if overrides.get(k))
    if target != "ort" and head:
        flags = ", ".join("--" + k.replace("_", "-") for k in head)
        raise AwqEdgeError(f"{flags}: the head is re-quantised for --target ort only", "drop them for --target trt")
    if opts.get("trt_native") and target != "trt":
        raise AwqEdgeError("--trt-native applies to --target trt only", "add --target trt or drop --trt-native")
    check_group_size(opts.get("head_group", 32), "--head-group", "use --head-group 64 or 32")
    return ExportOptions(target=target, **opts)


def check_source(quant_dir) -> Path:
    """Refuse a folder that is not a checkpoint at all, before the reader checks it."""
    folder = Path(quant_dir)
    if not folder.is_dir():
        raise AwqEdgeError(f"checkpoint folder {folder} not found", "pass the folder written by `awq-edge quantize`")
    if (folder / GENAI_CONFIG).is_file():
        raise AwqEdgeError(f"{folder} is already an exported ONNX folder", "pass the checkpoint it was exported from")
    return folder


def export(quant_dir, out_dir, opts: ExportOptions = ExportOptions(), allow_float: bool = False) -> Path:
    """Build the decoder graph from the checkpoint and write the folder; returns its path. The options default
    to the exact export; `awq-edge export` and awq_edge's API pass export_options()."""
    ck = Checkpoint(check_source(quant_dir), allow_float)
    folder = ck.folder
    d = ck.spec.dims
    opts = resolve_head(opts, d.vocab, d.hidden, d.tied)  # the head the defaults chose, recorded; checked
    out = check_output_dir(out_dir, inputs=[folder], is_ours=is_export, our_files=EXPORT_FILES, what="export")
    remove_stale(out)
    measures_here = opts.head_calib and (opts.head_calib != FROM_CHECKPOINT or ck.head_moments() is None)
    if measures_here and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise AwqEdgeError(f"--head-calib needs the checkpoint's tokenizer, and {folder} has none (the default "
                           f"export calibrates its 4-bit head on {opts.head_calib!r} text)",
                           "copy the model's tokenizer files into it, or pass --head-calib none or --exact")
    with staged(out) as tmp:
        with open(tmp / DATA_FILE, "wb") as data:
            model = build_decoder(ck, opts, ExternalData(data, out))
        gen_path = folder / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        genai = genai_config(ck.config, generation, model, ck.spec.dims, opts.dtype)
        extra = {
            "target": opts.target, "dtype": opts.dtype, "trt_native": opts.trt_native,
            "accuracy_level": opts.accuracy_level, "head_bits": opts.head_bits,
            "head_group": opts.head_group, "head_calib": opts.head_calib, "head_symmetric": opts.head_symmetric,
            "head_outliers": opts.head_outliers,
            "float_logits": casts_logits(opts),
            "group_size": ck.group_size, "model_type": ck.config["model_type"],
        }
        write_folder(tmp, out, model, genai, folder, extra)
    return out
