"""The exported ONNX folder's format, both sides: model.onnx + its external data, genai_config.json (what
onnxruntime-genai reads), awq_edge_export.json (the export's options) and the tokenizer; written atomically, read
and checked by the runtimes and the engine build."""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from awq_edge.export.tokenizer import TOKENIZER_FILES, write_tokenizer

from awq_edge.errors import AwqEdgeError
from awq_edge.outputs import replace_dir, temp_dir, write_failed

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
EXPORT_INFO = "awq_edge_export.json"
EXPORT_FILES = frozenset({MODEL_FILE, DATA_FILE, GENAI_CONFIG, EXPORT_INFO, *TOKENIZER_FILES})
REEXPORT = "export it again with `awq-edge export CHECKPOINT -o ONNX_DIR`"


def token_ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def genai_config(config: dict, generation: dict, model, d, dtype: str = "fp32") -> dict:
    """onnxruntime-genai's description of the decoder: I/O names, shapes of the cache, stop tokens, and for the
    fp16 (GPU) export its provider."""
    inputs = {i.name for i in model.graph.input}
    # GroupQueryAttention reads and writes one KV buffer of max_length in place (onnxruntime-genai's own builds do
    # the same): no cache copy per step. The plain attention of --target trt needs past and present apart.
    share = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    # The fp16 export is the GPU's: it names the CUDA provider, as the builder's `-e cuda` folders do (so that
    # og.Model(folder) needs no provider from the caller), and turns on genai's CUDA-graph decode, which the builder
    # leaves off: 1.16x genai's eager steps at the Llama-3-8B shape (H100, bench/results/onnx_gpu_llama3-8b.md).
    providers = [{"cuda": {"enable_cuda_graph": "1"}}] if share and dtype == "fp16" else []
    eos = token_ids(generation.get("eos_token_id", config.get("eos_token_id")))
    bos = token_ids(generation.get("bos_token_id", config.get("bos_token_id")))
    pad = token_ids(generation.get("pad_token_id", config.get("pad_token_id"))) or eos[:1]
    io = {"input_ids": "input_ids", "attention_mask": "attention_mask",
          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in inputs:
        io["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": bos[0] if bos else None,
            "context_length": d.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": MODEL_FILE,
                "head_size": d.head_dim,
                "hidden_size": d.hidden,
                "inputs": io,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": d.heads,
                "num_hidden_layers": d.layers,
                "num_key_value_heads": d.kv_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad[0] if pad else 0,
            "type": config["model_type"],
            "vocab_size": d.vocab,
        },
        "search": {
            "do_sample": False, "early_stopping": True, "length_penalty": 1.0, "max_length": d.max_positions,
            "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": share, "repetition_penalty": 1.0, "temperature": 1.0,
            "top_k": 1, "top_p": 1.0,
        },
    }


@contextmanager
def staged(out_dir: Path):
    """A temporary folder beside out_dir to write the export into, swapped into place when the block ends and removed
    if it fails (export() checked out_dir)."""
    out_dir = Path(out_dir).absolute()
    tmp = temp_dir(out_dir)
    try:
        yield tmp
        try:
            replace_dir(tmp, out_dir)
        except OSError as e:
            raise write_failed(out_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ExternalData:
    """The external-data file, written as the graph is built: each large initializer goes to disk as soon as it is
    made, so the export holds one tensor at a time, not the model (8B: tens of GB otherwise)."""

    INLINE_BYTES = 1024  # smaller initializers stay in model.onnx, as onnx.save_model's size_threshold does
    ALIGN_BYTES, ALIGN_FROM = 65536, 2**20  # large tensors start on mmap-page boundaries, as onnx.save_model aligns

    def __init__(self, file, out_dir: Path):
        self.file, self.out_dir, self.offset = file, out_dir, 0

    def store(self, tensor, data):
        """tensor (an onnx TensorProto with name, type and dims set) pointing at `data` (bytes-like), written."""
        from onnx import TensorProto

        data = memoryview(data)
        try:
            if len(data) >= self.ALIGN_FROM and self.offset % self.ALIGN_BYTES:
                pad = self.ALIGN_BYTES - self.offset % self.ALIGN_BYTES
                self.file.write(bytes(pad))
                self.offset += pad
            self.file.write(data)
        except OSError as e:
            raise write_failed(self.out_dir, e) from None
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", self.offset), ("length", len(data))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += len(data)
        return tensor


def write_folder(tmp: Path, out_dir: Path, model, genai: dict, source_dir: Path, extra: dict):
    """model.onnx (its large tensors already in the data file), the two JSON files and the tokenizer, into tmp."""
    import onnx

    try:
        onnx.save_model(model, str(tmp / MODEL_FILE))
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
        (tmp / EXPORT_INFO).write_text(json.dumps(extra, indent=2) + "\n")
        write_tokenizer(source_dir, tmp, token_ids(genai["model"]["eos_token_id"]))
    except OSError as e:
        raise write_failed(out_dir, e) from None


def is_export(folder: Path) -> bool:
    """Whether folder holds an export written by awq-edge."""
    return (Path(folder) / EXPORT_INFO).is_file()


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AwqEdgeError(f"{path} is not valid JSON ({e})", REEXPORT) from None
    if not isinstance(d, dict):
        raise AwqEdgeError(f"{path} holds a JSON {type(d).__name__}, not an object", REEXPORT)
    return d


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_genai_config(folder: Path) -> dict:
    """genai_config.json with every field the runtimes and the engine build read checked."""
    folder = Path(folder)
    path = folder / GENAI_CONFIG
    if not path.is_file():
        hint = "it is a quantised checkpoint: " if (folder / "config.json").is_file() else ""
        raise AwqEdgeError(f"{folder} is not an exported ONNX folder ({hint}no {GENAI_CONFIG})",
                           f"run `awq-edge export {folder} -o ONNX_DIR` and pass ONNX_DIR")
    config = _read_json(path)
    model = config.get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise AwqEdgeError(f"{path} has no model.decoder object", REEXPORT)
    for where, d, key in [("model", model, "context_length"), ("model", model, "vocab_size")] + [
            ("model.decoder", decoder, k) for k in ("num_hidden_layers", "num_key_value_heads", "num_attention_heads",
                                                    "head_size", "hidden_size")]:
        if not _count(d.get(key)):
            raise AwqEdgeError(f"{path}: {where}.{key} is {d.get(key)!r}, not a positive integer", REEXPORT)
    eos = model.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise AwqEdgeError(f"{path}: model.eos_token_id is {eos!r}, not a token id or a list of them", REEXPORT)
    name = decoder.get("filename")
    if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
        raise AwqEdgeError(f"{path}: model.decoder.filename {name!r} is not a file in {folder}", REEXPORT)
    return config


def read_export_info(folder: Path) -> dict:
    """awq_edge_export.json ({} for a folder another tool wrote), its accuracy level checked."""
    path = Path(folder) / EXPORT_INFO
    if not path.is_file():
        return {}
    info = _read_json(path)
    level = info.get("accuracy_level", 0)
    # A bool or a float equals an int here, and onnxruntime's session option takes only the integer's digits.
    if type(level) is not int or level not in (0, 1, 2, 3, 4):
        raise AwqEdgeError(f"{path}: accuracy_level {level!r} is not an integer 0-4", REEXPORT)
    return info


def context_length(folder: Path):
    """The model's context length from genai_config.json, or None where the folder has none."""
    return read_genai_config(folder)["model"]["context_length"] if (Path(folder) / GENAI_CONFIG).is_file() else None
