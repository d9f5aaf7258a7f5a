"""The Hugging Face folder's files, read and checked before any work: config.json, the safetensors weights (one
file, shards with an index, or loose files) and the tokenizer. Float models and quantised checkpoints are both such
folders; every stage reads them through here."""

import json
import math
import struct
from pathlib import Path

from awq_edge.errors import AwqEdgeError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# awq-edge's own file in a checkpoint: the final norm's output statistics the quantiser measured, for the exporter's
# head search (JSON, not safetensors: servers that glob *.safetensors would take it for weights)
HEAD_STATS_FILE = "awq_edge_head_stats.json"
# safetensors dtype -> bytes per element
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# config.json fields every family reads: (positive integers, positive finite numbers); None means "unset" for
# the ones transformers defaults. A value outside these reaches transformers as a crash, not a message.
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "sliding_window")
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar")
# Beyond these no trained model goes (eps 1e-6..1e-5, theta 1e4..5e5, long-context ones 1e7): a value past them
# is a corrupt file, which would quantise into a model that computes garbage.
UPPER_BOUNDS = {"rms_norm_eps": 0.1, "rope_theta": 1e10, "rope_local_base_freq": 1e10}
NON_NEGATIVE_NUMBERS = ("attn_logit_softcapping", "final_logit_softcapping")
LAYER_TYPES = ("full_attention", "sliding_attention")
BOOLEANS = ("tie_word_embeddings", "use_cache", "return_dict", "output_hidden_states", "output_attentions",
            "use_sliding_window", "attention_bias", "mlp_bias")
# the parameters each rope type needs (transformers' rope initialisers read them unchecked)
ROPE_NEEDS = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "longrope": ("short_factor", "long_factor")}
ROPE_LISTS = ("short_factor", "long_factor")  # per-frequency lists; every other parameter is one positive number


def read_config_json(path: Path) -> dict:
    """config.json as a dict, its values checked (check_config), or one error naming what is wrong with it."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise AwqEdgeError(f"{path} has no config.json", "point at a Hugging Face model folder")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AwqEdgeError(f"{f} is not valid JSON ({e})", "re-download or repair config.json") from None
    if not isinstance(d, dict):
        raise AwqEdgeError(f"{f} holds a JSON {type(d).__name__}, not an object", "re-download or repair config.json")
    check_config(d, f)
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_config(d: dict, where) -> None:
    """Refuse the config values no family takes (types, ranges, rope parameters, per-layer lists), naming the key:
    transformers would otherwise fail on them with its own exception types, or build a model that divides by 0."""
    def bad(key, value, want):
        raise AwqEdgeError(f"{where}: {key} is {value!r}, {want}", "use the config.json that belongs to the model")

    if not isinstance(d.get("model_type"), str) or not d["model_type"]:
        bad("model_type", d.get("model_type"), "not a model type name")
    for key in POSITIVE_INTS:
        if d.get(key) is not None and not (_is_int(d[key]) and d[key] > 0):
            bad(key, d[key], "not a positive integer")
    for key in POSITIVE_NUMBERS:
        if d.get(key) is not None and not (_is_number(d[key]) and 0 < d[key] <= UPPER_BOUNDS.get(key, math.inf)):
            bad(key, d[key], f"not a number in (0, {UPPER_BOUNDS.get(key, math.inf):g}]")
    for key in NON_NEGATIVE_NUMBERS:
        if d.get(key) is not None and not (_is_number(d[key]) and d[key] >= 0):
            bad(key, d[key], "not a number of at least 0")
    for key in BOOLEANS:
        if key in d and not isinstance(d[key], bool):
            bad(key, d[key], "not true or false")
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if heads and kv and heads % kv:
        bad("num_key_value_heads", kv, f"which does not divide num_attention_heads {heads}")
    vocab = d.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = d.get(key) if isinstance(d.get(key), list) else [d.get(key)]
        if not all(i is None or (_is_int(i) and 0 <= i and (not vocab or i < vocab)) for i in ids):
            bad(key, d[key], f"not a token id below vocab_size {vocab}")
    types, layers = d.get("layer_types"), d.get("num_hidden_layers")
    if types is not None and not (isinstance(types, list) and all(t in LAYER_TYPES for t in types)
                                  and (not layers or len(types) == layers)):
        bad("layer_types", types, f"not a list of {layers} of {', '.join(LAYER_TYPES)}")
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            bad(key, rope, "not an object")
        # Gemma 3 keys its rope parameters by layer type
        per_type = rope if rope and all(isinstance(v, dict) for v in rope.values()) else {"": rope}
        for sub, params in per_type.items():
            name = f"{key}.{sub}" if sub else key
            rope_type = params.get("rope_type", params.get("type", "default"))
            if not isinstance(rope_type, str) or rope_type not in ROPE_NEEDS:
                bad(f"{name}.rope_type", rope_type, f"not one of {', '.join(ROPE_NEEDS)}")
            for need in ROPE_NEEDS[rope_type]:
                value = params.get(need)
                ok = (isinstance(value, list) and value and all(map(_is_number, value))) if need in ROPE_LISTS \
                    else _is_number(value) and value > 0
                if not ok:
                    bad(f"{name}.{need}", value, f"not what rope type {rope_type!r} needs")
            theta = params.get("rope_theta", 1.0)
            if not (_is_number(theta) and 0 < theta <= UPPER_BOUNDS["rope_theta"]):
                bad(f"{name}.rope_theta", theta, f"not a number in (0, {UPPER_BOUNDS['rope_theta']:g}]")


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
    except Exception as e:  # transformers' validators raise several types; each means the same here
        raise AwqEdgeError(f"transformers cannot read the {model_type!r} config.json in {path} "
                           f"({type(e).__name__}: {str(e)[:200]})",
                           "use the config.json that belongs to the model, or upgrade transformers") from None


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
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                if entry["dtype"] not in DTYPE_BYTES or end - start != math.prod(entry["shape"]) * DTYPE_BYTES[
                        entry["dtype"]]:
                    raise ValueError(f"tensor {name!r}: dtype {entry['dtype']} and shape {entry['shape']} do not "
                                     f"fill its {end - start} bytes")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise AwqEdgeError(f"{path} is not a readable safetensors file ({e})", fix) from None
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AwqEdgeError(f"{path} is not a readable safetensors file (its __metadata__ is not strings)", fix)
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    if any(start != end for (_, end), (start, _) in zip([(0, 0)] + spans, spans)):
        raise AwqEdgeError(f"{path} is not a readable safetensors file (its tensors' byte ranges overlap or leave "
                           "gaps)", fix)
    ends = [end for _, end in spans]
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


# No trained model's matrix weight is this large (a flipped exponent bit makes one 1e30); norm weights grow larger
# (Gemma's post-norms), so vectors get a looser bound.
WEIGHT_LIMIT, VECTOR_LIMIT = 1e4, 1e8


def check_values(name: str, t, where):
    """t, once it is known to hold finite weights of a sane size (a corrupt file quantises or exports silently to
    garbage). Checked in slices by their largest magnitude (NaN propagates through it), so an 8B model's 1 GB
    embedding costs a few MB of temporaries and 0.14 s on two cores (element-wise masks took 3.6 s)."""
    import torch

    if t.is_floating_point() and t.numel():
        limit = WEIGHT_LIMIT if t.dim() >= 2 else VECTOR_LIMIT
        if not all(part.abs().amax() <= limit for part in t.reshape(-1).split(2**22)):
            bad = int((~torch.isfinite(t) | (t.abs() > limit)).sum())
            largest = t.float().abs().nan_to_num(nan=float("inf"), posinf=float("inf")).max()
            raise AwqEdgeError(f"{where}: {name} holds {bad} weight(s) that are not finite or exceed "
                               f"{limit:g} in magnitude (largest {largest:g})",
                               "re-download or re-create the model's safetensors (the file is corrupt)")
    return t


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


def load_tokenizer(path: Path, vocab_size: int | None = None):
    """The folder's tokenizer, local files only, never remote code, checked: it loads, its special ids fit the
    model's vocab_size, and words its vocabulary holds whole come out whole (check_tokenizer)."""
    from transformers import AutoTokenizer

    check_tokenizer_json(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        tokenizer("The capital of France is Paris.")  # settings that load but cannot encode (a dict as max length)
    except Exception as e:  # transformers and tokenizers raise many types for files they cannot use
        raise AwqEdgeError(f"the tokenizer files in {path} cannot be loaded ({type(e).__name__}: {str(e)[:200]})",
                           "copy the model's own tokenizer.json and tokenizer_config.json into the folder") from None
    check_tokenizer(tokenizer, f"the tokenizer in {path}", vocab_size)
    return tokenizer


def check_tokenizer(tokenizer, what: str, vocab_size: int | None = None,
                    fix: str = "copy the model's own tokenizer.json and tokenizer_config.json into the folder") -> None:
    """Refuse a tokenizer that loads but is broken: special ids past the model's vocabulary, or words its vocabulary
    holds whole split into pieces (merges lost, or a GGUF tokenizer rebuilt wrongly: 31 tokens for 7 words)."""
    specials = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
    if vocab_size and any(i >= vocab_size for i in specials):
        raise AwqEdgeError(f"{what} has special token ids {specials}, past the model's vocab_size {vocab_size}", fix)
    vocab = tokenizer.get_vocab()
    if len(set(vocab.values())) != len(vocab):
        raise AwqEdgeError(f"{what} gives one id to several tokens, which it cannot save and load again", fix)
    words = [w for w in ("the", "of", "and", "is", "capital") if f"\u2581{w}" in vocab or f"\u0120{w}" in vocab]
    ids = tokenizer(" " + " ".join(words), add_special_tokens=False).input_ids
    if words and len(ids) > len(words) + 1:
        raise AwqEdgeError(f"{what} splits words its vocabulary holds whole ({len(ids)} tokens for {len(words)} "
                           "words): its merges or pre-tokenizer are broken", fix)
    if vocab_size and any(i >= vocab_size for i in ids):
        raise AwqEdgeError(f"{what} gives token ids past the model's vocab_size {vocab_size}", fix)
