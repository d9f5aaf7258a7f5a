"""Write the quantised checkpoint: AutoAWQ "GEMM" safetensors that vLLM, TGI and transformers load.

Quantised linears are stored as qweight/qzeros/scales (packing.to_awq_gemm);
linears kept at 8 bits are stored as their dequantised fp16 weights and
listed in modules_to_not_convert, since the AWQ format holds 4 bits only.
"""

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from awq_edge.checkpoint.hf_folder import HEAD_STATS_FILE, INDEX_FILE, SINGLE_FILE
from awq_edge.errors import AwqEdgeError
from awq_edge.outputs import check_output_dir, replace_dir, temp_dir, write_failed
from awq_edge.packing import to_awq_gemm


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


# Files a checkpoint holds; a checkpoint folder holding anything else is not replaced (it is someone's).
CHECKPOINT_FILES = frozenset({
    SINGLE_FILE, INDEX_FILE, HEAD_STATS_FILE, "config.json", "generation_config.json", "sensitivity.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class _CheckpointFiles:
    def __contains__(self, name: str) -> bool:
        return name in CHECKPOINT_FILES or _SHARD.fullmatch(name) is not None


def is_checkpoint(folder: Path) -> bool:
    """Whether folder holds a checkpoint written by awq-edge (its config.json has our `awq_edge` record)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "awq_edge" in config and "quantization_config" in config


def check_checkpoint_output(out_dir, inputs=(), need_bytes: int = 0) -> Path:
    """Refuse, before any work, an -o that is not new, empty, or an earlier awq-edge checkpoint with only its files."""
    return check_output_dir(out_dir, inputs=inputs, is_ours=is_checkpoint, our_files=_CheckpointFiles(),
                            what="checkpoint", need_bytes=need_bytes)


def _atomic_dir(out_dir: Path) -> Path:
    return temp_dir(check_checkpoint_output(out_dir))


def estimate_bytes(headers: dict, group_size: int) -> int:
    """About how large the checkpoint of a float model ({name: (file, header entry)}) will be: int4 + fp16
    scales and zeros for the decoder's matrices, fp16 for the rest."""
    total = 0
    for name, (_, entry) in headers.items():
        numel = math.prod(entry["shape"])
        int4 = len(entry["shape"]) == 2 and ".layers." in name
        total += numel // 2 + 4 * numel // group_size if int4 else 2 * numel
    return total


SHARD_BYTES = 2**30  # what the writer holds in host memory before a shard goes to disk


def awq_config(config: dict, group_size: int, int8: list, meta: dict) -> dict:
    """config.json of the checkpoint: the model's config with AutoAWQ's quantization_config."""
    config = dict(config)
    config.pop("_name_or_path", None)
    config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": sorted(int8) or None,
    }
    config["awq_edge"] = {**meta, "int8_modules": sorted(int8)}
    return config


class CheckpointWriter:
    """A checkpoint written tensor by tensor as it is produced, so memory never holds the whole model.

    Tensors go to safetensors shards of about 1 GiB in a temporary folder
    beside out_dir; `commit` names them (one `model.safetensors`, or shards and
    an index as save_pretrained writes them) and renames the folder into place.
    Leaving the `with` block without a commit removes everything written.
    """

    def __init__(self, out_dir: Path, group_size: int | None = None, shard_bytes: int = SHARD_BYTES):
        self.out_dir, self.group_size, self.shard_bytes = Path(out_dir).absolute(), group_size, shard_bytes
        self.tmp = _atomic_dir(self.out_dir)
        self.pending, self.pending_bytes, self.shards, self.int8 = {}, 0, [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def linear(self, name: str, ql) -> None:
        """A quantised linear: AutoAWQ GEMM tensors at 4 bits, its dequantised fp16 weight otherwise.
        Packed on the device `ql` is on (a GPU packs an 8B model's layer in milliseconds, the host in seconds)."""
        if ql.bits == 4:
            check_awq_shapes({name: tuple(ql.q.shape)}, self.group_size)
            for k, v in to_awq_gemm(ql.q, ql.scales, ql.zeros, self.group_size).items():
                self.tensor(f"{name}.{k}", v)
        else:
            self.int8.append(name)
            self.tensor(f"{name}.weight", ql.dequantize())

    def tensor(self, name: str, t: torch.Tensor) -> None:
        t = (t.to(torch.float16) if t.is_floating_point() and t.dtype != torch.float16 else t).contiguous().cpu()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            path = self.tmp / f".shard-{len(self.shards):05d}"
            try:
                save_file(self.pending, path, metadata={"format": "pt"})
            except OSError as e:
                raise write_failed(self.out_dir, e) from None
            self.shards.append((path, list(self.pending), self.pending_bytes))
            self.pending, self.pending_bytes = {}, 0

    def commit(self, config: dict, tokenizer, generation_config=None, head_moments=None) -> Path:
        """Name the shards, write config, tokenizer and (from a calibrated run) the head statistics, swap in."""
        try:
            return self._commit(config, tokenizer, generation_config, head_moments)
        except OSError as e:
            raise write_failed(self.out_dir, e) from None

    def _commit(self, config: dict, tokenizer, generation_config, head_moments) -> Path:
        self._flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map = {}
        for (path, keys, _), name in zip(self.shards, names):
            path.rename(self.tmp / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": sum(b for _, _, b in self.shards)}, "weight_map": weight_map}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if generation_config is not None:
            generation_config.save_pretrained(self.tmp)
        if head_moments is not None:
            (self.tmp / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": head_moments.tolist()}) + "\n")
        tokenizer.save_pretrained(self.tmp)
        replace_dir(self.tmp, self.out_dir)
        self.tmp = None
        return self.out_dir


def save_quantized(model, tokenizer, result, out_dir: Path, meta: dict) -> Path:
    """Write an in-memory quantised model (quantize_model's result) as a checkpoint folder."""
    group_size = meta["group_size"]
    int4 = {n: ql for n, ql in result.linears.items() if ql.bits == 4}
    check_awq_shapes({n: tuple(ql.q.shape) for n, ql in int4.items()}, group_size)
    skip = {f"{n}.weight" for n in result.linears}
    if model.config.tie_word_embeddings:
        skip.add("lm_head.weight")
    with CheckpointWriter(out_dir, group_size) as writer:
        for key, value in model.state_dict().items():
            if key not in skip:
                writer.tensor(key, value.detach())
        for name, ql in result.linears.items():
            writer.linear(name, ql)
        config = awq_config(model.config.to_dict(), group_size, writer.int8, meta)
        moments = result.head_moments if meta.get("n_samples") else None  # no calibration: nothing measured
        return writer.commit(config, tokenizer, getattr(model, "generation_config", None), moments)
