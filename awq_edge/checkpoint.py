"""The quantised checkpoint: AutoAWQ "GEMM" safetensors that vLLM, TGI and transformers load.

Quantised linears are stored as qweight/qzeros/scales (packing.to_awq_gemm);
linears kept at 8 bits are stored as their dequantised fp16 weights and
listed in modules_to_not_convert, since the AWQ format holds 4 bits only.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from awq_edge.errors import AwqEdgeError
from awq_edge.model import check_safetensors, load_config, load_tokenizer
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


def _atomic_dir(out_dir: Path):
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "config.json").is_file():
            raise AwqEdgeError(f"{out_dir} exists and is not a checkpoint folder", "choose an empty or new -o folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        out_dir.rename(old / "x")
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def save_quantized(model, tokenizer, result, out_dir: Path, meta: dict) -> Path:
    """Write the checkpoint to a temporary folder beside out_dir, then rename it into place."""
    out_dir = Path(out_dir)
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
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_quant_config(path: Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise AwqEdgeError(f"{path} has no config.json", "pass a folder written by `awq-edge quantize`")
    config = json.loads(cfg_path.read_text())
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
