"""Read an AutoAWQ GEMM checkpoint folder (ours or a hub one) as integer weights for export."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from awq_edge.errors import AwqEdgeError
from awq_edge.packing import from_awq_gemm

# model_type values whose decoder is the Llama block: RMSNorm, RoPE, GQA, SiLU-gated MLP.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
_REQUIRED_CONFIG = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass
class QuantLinear:
    """One 4-bit linear W [out, in] = (q - zeros) * scales per group along `in`."""

    q: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]
    group_size: int
    bias: torch.Tensor | None = None

    @property
    def shape(self):
        return tuple(self.q.shape)


@dataclass
class FloatLinear:
    """A linear kept in floating point (8-bit fallbacks are stored dequantised)."""

    weight: torch.Tensor  # float32 [out, in]
    bias: torch.Tensor | None = None

    @property
    def shape(self):
        return tuple(self.weight.shape)


class Checkpoint:
    """Lazy view of a quantised checkpoint: its config and its tensors by name.

    allow_float also accepts a plain float Hugging Face folder (the float
    baseline an int4 export is compared with).
    """

    def __init__(self, folder, allow_float: bool = False):
        self.folder = Path(folder)
        self.config = read_config(self.folder, allow_float)
        qc = self.config.get("quantization_config", {})
        self.group_size = int(qc.get("group_size", 0))
        self._files = tensor_files(self.folder)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise AwqEdgeError(f"{self.folder} has no tensor {name}", "re-create the checkpoint with `awq-edge quantize`")
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def float_tensor(self, name: str) -> torch.Tensor:
        return self.tensor(name).float()

    def linear(self, name: str) -> QuantLinear | FloatLinear:
        bias = self.float_tensor(f"{name}.bias") if f"{name}.bias" in self else None
        if f"{name}.qweight" in self:
            q, scales, zeros = from_awq_gemm(
                self.tensor(f"{name}.qweight"), self.tensor(f"{name}.qzeros"), self.tensor(f"{name}.scales")
            )
            return QuantLinear(q, scales, zeros, self.group_size, bias)
        if f"{name}.weight" in self:
            return FloatLinear(self.float_tensor(f"{name}.weight"), bias)
        raise AwqEdgeError(f"{self.folder} has neither {name}.qweight nor {name}.weight", "re-create the checkpoint")


def read_config(folder: Path, allow_float: bool = False) -> dict:
    """config.json of a 4-bit AWQ GEMM checkpoint of a supported architecture, or a clear error."""
    path = folder / "config.json"
    if not folder.is_dir() or not path.is_file():
        raise AwqEdgeError(
            f"{folder} is not a quantised checkpoint folder (no config.json)",
            "pass the folder written by `awq-edge quantize` or an AutoAWQ GEMM checkpoint",
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AwqEdgeError(f"{path} is not valid JSON ({e})", "re-create the checkpoint with `awq-edge quantize`")
    qc = config.get("quantization_config")
    if qc is None and allow_float:
        qc = {}
    elif not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "awq":
        raise AwqEdgeError(
            f"{folder} is not an AWQ checkpoint (config.json has no quantization_config with quant_method 'awq')",
            "quantise it first with `awq-edge quantize MODEL -o DIR` and export DIR",
        )
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or int(qc.get("bits", qc.get("w_bit", 4))) != 4:
        raise AwqEdgeError(
            f"{folder} is AWQ version={version} bits={qc.get('bits')}; only 4-bit GEMM checkpoints export",
            "re-quantise with `awq-edge quantize` (4-bit, GEMM layout)",
        )
    if "group_size" not in qc and "q_group_size" in qc:
        qc["group_size"] = qc["q_group_size"]
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise AwqEdgeError(
            f"architecture {model_type!r} cannot be exported yet",
            f"use a model of a supported family ({', '.join(LLAMA_FAMILY)})",
        )
    missing = [k for k in _REQUIRED_CONFIG if k not in config]
    if missing:
        raise AwqEdgeError(f"{path} lacks {', '.join(missing)}", "re-create the checkpoint with `awq-edge quantize`")
    return config


def tensor_files(folder: Path) -> dict:
    """Tensor name -> the safetensors file holding it (one file or an index of shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise AwqEdgeError(
            f"{folder} has no model.safetensors (pickled .bin weights are never loaded)",
            "re-create the checkpoint with `awq-edge quantize`, or convert it to safetensors",
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}
