"""The quantised checkpoint: AutoAWQ "GEMM" safetensors that vLLM, TGI and transformers load.

Quantised linears are stored as qweight/qzeros/scales (packing.to_awq_gemm);
linears kept at 8 bits are stored as their dequantised fp16 weights and
listed in modules_to_not_convert, since the AWQ format holds 4 bits only.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from awq_edge.errors import AwqEdgeError
from awq_edge.outputs import check_output_dir, replace_dir, temp_dir, write_failed
from awq_edge.model import check_safetensors, load_config, load_tokenizer, read_config_json
from awq_edge.packing import from_awq_gemm, to_awq_gemm
from awq_edge.quant import dequantize, n_groups

WEIGHTS = "model.safetensors"


def check_awq_shapes(shapes: dict, group_size: int) -> None:
    """Refuse linears ({name: (out, in)}) the AutoAWQ format cannot hold, before any work is done."""
    for name, (out_f, in_f) in shapes.items():
        if in_f % group_size or out_f % 8:
            raise AwqEdgeError(
                f"{name} has in_features={in_f}, out_features={out_f}: the AutoAWQ format needs in_features "
                f"divisible by the group size {group_size} (no ragged last group) and out_features by 8",
                _group_hint(in_f),
            )


def _group_hint(in_f: int) -> str:
    fits = [g for g in (128, 64, 32, 16) if in_f % g == 0]
    return f"use --group-size {fits[0]}" if fits else f"use a group size that divides {in_f}"


# Files save_quantized writes; a checkpoint folder holding anything else is not replaced (it is someone's).
CHECKPOINT_FILES = frozenset({
    WEIGHTS, "config.json", "generation_config.json", "sensitivity.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "tokenizer.model",
})


def is_checkpoint(folder: Path) -> bool:
    """Whether folder holds a checkpoint written by awq-edge (its config.json has our `awq_edge` record)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "awq_edge" in config and "quantization_config" in config


def check_checkpoint_output(out_dir, inputs=(), need_bytes: int = 0) -> Path:
    """Refuse, before any work, an -o that is not new, empty, or an earlier awq-edge checkpoint with only its files."""
    return check_output_dir(out_dir, inputs=inputs, is_ours=is_checkpoint, our_files=CHECKPOINT_FILES,
                            what="checkpoint", need_bytes=need_bytes)


def _atomic_dir(out_dir: Path) -> Path:
    return temp_dir(check_checkpoint_output(out_dir))


def save_quantized(model, tokenizer, result, out_dir: Path, meta: dict) -> Path:
    """Write the checkpoint to a temporary folder beside out_dir, then rename it into place."""
    out_dir = Path(out_dir).absolute()
    group_size = meta["group_size"]
    tensors = {}
    int4 = {n: ql for n, ql in result.linears.items() if ql.bits == 4}
    check_awq_shapes({n: tuple(ql.q.shape) for n, ql in int4.items()}, group_size)
    int8 = sorted(n for n, ql in result.linears.items() if ql.bits != 4)
    skip = {f"{n}.weight" for n in int4}
    if model.config.tie_word_embeddings:
        skip.add("lm_head.weight")
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().to(torch.float16).contiguous()
    for name, ql in int4.items():
        for k, v in to_awq_gemm(ql.q, ql.scales, ql.zeros, group_size).items():
            tensors[f"{name}.{k}"] = v
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": int8 or None,
    }
    config["awq_edge"] = {**meta, "int8_modules": int8}
    tmp = _atomic_dir(out_dir)
    try:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(out_dir, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_quant_config(path: Path) -> dict:
    config = read_config_json(Path(path))
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "awq" or qc.get("bits") != 4 or qc.get("version", "gemm").lower() != "gemm":
        raise AwqEdgeError(
            f"{path} is not a 4-bit AWQ GEMM checkpoint (quantization_config={qc or None})",
            "quantise it first with `awq-edge quantize MODEL -o DIR`",
        )
    return config


def load_quantized_tensors(path: Path) -> dict:
    """name -> (q uint8 [out, in], scales [out, n_groups], zeros uint8 [out, n_groups]) for each 4-bit linear, and the other tensors."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AwqEdgeError(f"{path} has no .safetensors weights", "pass a folder written by `awq-edge quantize`")
    raw = {}
    for f in files:
        check_safetensors(f)
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                raw[key] = sf.get_tensor(key)
    quantised = {}
    for key in [k for k in raw if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        quantised[name] = from_awq_gemm(raw.pop(key), raw.pop(f"{name}.qzeros"), raw.pop(f"{name}.scales"))
    return {"quantized": quantised, "other": raw}


def load_quantized_model(path: Path, dtype=torch.float32):
    """The checkpoint as a float transformers model with dequantised linears, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = read_quant_config(path)
    group_size = config["quantization_config"]["group_size"]
    tensors = load_quantized_tensors(path)
    state = {k: v.to(dtype) for k, v in tensors["other"].items()}
    for name, (q, scales, zeros) in tensors["quantized"].items():
        if scales.shape[1] != n_groups(q.shape[1], group_size):
            raise AwqEdgeError(f"{name}: scales do not match group size {group_size}", "re-create the checkpoint")
        state[f"{name}.weight"] = dequantize(q, scales, zeros, group_size).to(dtype)
    hf_config = load_config(path)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if hf_config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise AwqEdgeError(f"{path} lacks tensors: {sorted(missing)[:5]}", "re-create the checkpoint")
    model.load_state_dict(state, strict=False)
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model, load_tokenizer(path)
