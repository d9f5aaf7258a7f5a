"""Read an AutoAWQ GEMM checkpoint folder (ours or a hub one) as integer weights, for the exporter and the runtimes."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from awq_edge.arch.spec import Spec, describe
from awq_edge.errors import AwqEdgeError
from awq_edge.packing import from_awq_gemm


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
        self.spec: Spec = describe(self.config)
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

    def linears(self, names) -> list:
        """The linears of a layer's `qkv` or `gate_up` (one when the checkpoint stores them fused)."""
        return [self.linear(n) for n in names]

    def norm(self, name: str) -> torch.Tensor:
        """The factor the RMSNorm `name` multiplies by (Gemma's 1 + w), float32."""
        return self.spec.norm(self.tensor(f"{name}.weight"))


def read_config(folder: Path, allow_float: bool = False) -> dict:
    """config.json of a 4-bit AWQ GEMM checkpoint, or a clear error (`describe` then checks its architecture)."""
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
    return config


def tensor_files(folder: Path) -> dict:
    """Tensor name -> the safetensors file holding it: an index of shards, model.safetensors, or else every
    .safetensors file there (a name in two files is refused)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AwqEdgeError(f"{index} is not a safetensors index ({e})", "re-save the model folder") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise AwqEdgeError(
            f"{folder} has no model.safetensors (pickled .bin weights are never loaded)",
            "re-create the checkpoint with `awq-edge quantize`, or convert it to safetensors",
        )
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in out:
                    raise AwqEdgeError(f"{name} is in both {out[name].name} and {file.name} in {folder}",
                                       "keep one copy of the weights (or write a model.safetensors.index.json)")
                out[name] = file
    return out


def fuse_rows(linears):
    """One linear computing several at once (outputs concatenated), or None when they cannot share a node."""
    if len(linears) == 1:
        return linears[0]
    if all(isinstance(x, QuantLinear) for x in linears) and len({x.group_size for x in linears}) == 1:
        merged = QuantLinear(
            torch.cat([x.q for x in linears]), torch.cat([x.scales for x in linears]),
            torch.cat([x.zeros for x in linears]), linears[0].group_size,
        )
    elif all(isinstance(x, FloatLinear) for x in linears):
        merged = FloatLinear(torch.cat([x.weight for x in linears]))
    else:
        return None
    biases = [x.bias for x in linears]
    if any(b is not None for b in biases):
        merged.bias = torch.cat([b if b is not None else torch.zeros(x.shape[0]) for b, x in zip(biases, linears)])
    return merged
