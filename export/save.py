"""Write an exported decoder folder atomically: model.onnx + external data, genai_config.json, tokenizer."""

import json
import shutil
from pathlib import Path

import onnx

from awq_edge.export.tokenizer import write_tokenizer
from awq_edge.outputs import replace_dir, temp_dir, write_failed

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def token_ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def genai_config(config: dict, generation: dict, model: onnx.ModelProto, d) -> dict:
    """onnxruntime-genai's description of the decoder: I/O names, shapes of the cache, stop tokens."""
    inputs = {i.name for i in model.graph.input}
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
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
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
            "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
            "top_k": 1, "top_p": 1.0,
        },
    }


def write_folder(out_dir: Path, model: onnx.ModelProto, genai: dict, source_dir: Path, extra: dict):
    """Write everything into a temporary folder beside out_dir, then swap it into place (export() checked out_dir)."""
    out_dir = Path(out_dir).absolute()
    tmp = temp_dir(out_dir)
    try:
        onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
        (tmp / "awq_edge_export.json").write_text(json.dumps(extra, indent=2) + "\n")
        write_tokenizer(source_dir, tmp, token_ids(genai["model"]["eos_token_id"]))
        replace_dir(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(out_dir, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
