"""The Hugging Face folder's files, read and checked before any work: config.json, the safetensors weights (one
file, shards with an index, or loose files) and the tokenizer. Float models and quantised checkpoints are both such
folders; every stage reads them through here."""

import json
import struct
from pathlib import Path

from awq_edge.errors import AwqEdgeError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


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


def load_config(path: Path):
    """The model's transformers config without any quantization_config (we never hand one to transformers)."""
    from transformers import AutoConfig

    d = read_config_json(path)
    d.pop("quantization_config", None)
    d.pop("awq_edge", None)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise AwqEdgeError(f"{Path(path) / 'config.json'} has no model_type", "use a transformers model folder")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError) as e:
        raise AwqEdgeError(f"unknown model_type {model_type!r} ({e})",
                           "upgrade transformers or use a supported model") from None


def check_safetensors(path: Path) -> dict:
    """The header {name: {dtype, shape, data_offsets}} of a safetensors file; refuses an unreadable or truncated one."""
    path = Path(path)
    fix = f"re-download or re-create {path.name}"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for name, entry in header.items():
            if name != "__metadata__" and not (
                    isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                    and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                    and len(entry["data_offsets"]) == 2
                    and all(isinstance(n, int) and n >= 0 for n in entry["shape"] + entry["data_offsets"])):
                raise ValueError(f"tensor {name!r} has no valid dtype, shape and data_offsets")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise AwqEdgeError(f"{path} is not a readable safetensors file ({e})", fix) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + header_len + max(ends, default=0)
    if size < need:
        raise AwqEdgeError(f"{path} is truncated: {size} bytes, its header needs {need}", fix)
    return header


def _index_files(folder: Path, index: Path) -> dict:
    """Tensor name -> shard file from a shard index, each file a plain name inside the folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise AwqEdgeError(f"{index} is not a safetensors index ({e})", "re-save the model folder") from None
    files = {}
    for name, file in weight_map.items():
        if Path(file).name != file or file in ("", ".", ".."):
            raise AwqEdgeError(f"{index} places {name} in {file!r}, which is not a file in {folder}",
                               "re-save the model folder (an index names shards beside it)")
        if not (folder / file).is_file():
            raise AwqEdgeError(f"{index} places {name} in {file}, which is missing from {folder}",
                               "copy every shard the index names, or re-save the model folder")
        files[name] = folder / file
    return files


def tensor_headers(folder: Path) -> dict:
    """Tensor name -> (the safetensors file holding it, its header entry), every header checked: the shard index
    where there is one, else model.safetensors, else every .safetensors file there (a name in two is refused)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        files = _index_files(folder, index)
        headers = {f: check_safetensors(f) for f in sorted(set(files.values()))}
        out = {}
        for name, f in files.items():
            if name not in headers[f]:
                raise AwqEdgeError(f"{index} places {name} in {f.name}, which does not hold it",
                                   "re-save the model folder")
            out[name] = (f, headers[f][name])
        return out
    single = folder / SINGLE_FILE
    paths = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not paths:
        raise AwqEdgeError(f"{folder} has no .safetensors weights (pickled .bin weights are never loaded)",
                           "convert the weights to safetensors (save_pretrained(..., safe_serialization=True))")
    out = {}
    for f in paths:
        for name, entry in check_safetensors(f).items():
            if name == "__metadata__":
                continue
            if name in out:
                raise AwqEdgeError(f"{name} is in both {out[name][0].name} and {f.name} in {folder}",
                                   "keep one copy of the weights (or write a model.safetensors.index.json)")
            out[name] = (f, entry)
    return out


def tensor_files(folder: Path) -> dict:
    """Tensor name -> the safetensors file holding it (see tensor_headers)."""
    return {name: f for name, (f, _) in tensor_headers(folder).items()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_tokenizer_json(path: Path) -> None:
    """Refuse a tokenizer.json or tokenizer_config.json that is not a JSON object (a truncated copy) before any
    work."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise AwqEdgeError(f"{f} is not valid JSON ({e})", f"re-download or re-create {name}") from None
            if not isinstance(d, dict):
                raise AwqEdgeError(f"{f} holds a JSON {type(d).__name__}, not an object",
                                   f"re-download or re-create {name}")


def load_tokenizer(path: Path):
    """The folder's tokenizer, local files only, never remote code."""
    from transformers import AutoTokenizer

    check_tokenizer_json(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
