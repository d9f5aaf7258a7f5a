"""Read an AutoAWQ GEMM checkpoint folder (ours or a hub one): the one reader of export, eval and the runtimes.

The quantisation config and the whole tensor set are checked from the safetensors headers when the folder is
opened, before any tensor is read: every quantised linear's qweight, qzeros and scales exist with the dtypes and
shapes its group size implies.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from awq_edge.arch.spec import Spec, describe
from awq_edge.checkpoint.hf_folder import HEAD_STATS_FILE, load_config, load_tokenizer, read_config_json, tensor_headers
from awq_edge.errors import AwqEdgeError
from awq_edge.packing import from_awq_gemm
from awq_edge.quant import FloatLinear, QuantLinear, check_group_size, n_groups

RECREATE = "re-create the checkpoint with `awq-edge quantize`"
# safetensors dtype of each AutoAWQ GEMM tensor
_GEMM_DTYPES = {"qweight": "I32", "qzeros": "I32", "scales": "F16"}


def read_config(folder: Path, allow_float: bool = False) -> dict:
    """config.json of a 4-bit AWQ GEMM checkpoint, or a clear error (`describe` then checks its architecture).
    allow_float also accepts a plain float Hugging Face folder."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise AwqEdgeError(
            f"{folder} is not a quantised checkpoint folder (no config.json)",
            "pass the folder written by `awq-edge quantize` or an AutoAWQ GEMM checkpoint",
        )
    config = read_config_json(folder)
    qc = config.get("quantization_config")
    if qc is None and allow_float:
        return config
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "awq":
        raise AwqEdgeError(
            f"{folder} is not an AWQ checkpoint (config.json has no quantization_config with quant_method 'awq')",
            "quantise it first with `awq-edge quantize MODEL -o DIR` and pass DIR",
        )
    version, bits = str(qc.get("version", "gemm")).lower(), qc.get("bits", qc.get("w_bit", 4))
    if version != "gemm" or bits != 4:
        raise AwqEdgeError(f"{folder} is AWQ version={version} bits={bits}; only 4-bit GEMM checkpoints are read",
                           "re-quantise with `awq-edge quantize` (4-bit, GEMM layout)")
    group = qc.get("group_size", qc.get("q_group_size"))
    try:
        check_group_size(group, "quantization_config.group_size", RECREATE)
    except AwqEdgeError as e:
        raise AwqEdgeError(f"{folder}: {e.problem}", e.fix) from None
    qc["group_size"] = group
    return config


class Checkpoint:
    """Lazy view of a quantised checkpoint: its config and its tensors by name, the tensor set checked up front.

    allow_float also accepts a plain float Hugging Face folder (the float
    baseline an int4 export is compared with).
    """

    def __init__(self, folder, allow_float: bool = False):
        self.folder = Path(folder)
        self.config = read_config(self.folder, allow_float)
        self.spec: Spec = describe(self.config)
        self.group_size = int(self.config.get("quantization_config", {}).get("group_size", 0))
        self._headers = tensor_headers(self.folder)
        self._check_linears()

    def _check_linears(self) -> None:
        for key in [k for k in self._headers if k.endswith(".qweight")]:
            name = key[: -len(".qweight")]
            entries = {}
            for part, dtype in _GEMM_DTYPES.items():
                entry = self._headers.get(f"{name}.{part}")
                if entry is None:
                    raise AwqEdgeError(f"{self.folder} has {name}.qweight but no {name}.{part}", RECREATE)
                if entry[1]["dtype"] != dtype or len(entry[1]["shape"]) != 2:
                    raise AwqEdgeError(f"{self.folder}: {name}.{part} is {entry[1]['dtype']} "
                                       f"{entry[1]['shape']}, the AutoAWQ GEMM format stores a 2-D {dtype}", RECREATE)
                entries[part] = entry[1]["shape"]
            in_f, out_f = entries["qweight"][0], 8 * entries["qweight"][1]
            groups = n_groups(in_f, self.group_size) if self.group_size else 0
            want = {"qzeros": [groups, out_f // 8], "scales": [groups, out_f]}
            for part, shape in want.items():
                if entries[part] != shape:
                    raise AwqEdgeError(f"{self.folder}: {name}.{part} has shape {entries[part]}, but qweight "
                                       f"{entries['qweight']} at group size {self.group_size} implies {shape}",
                                       RECREATE)
        fam, d = self.spec.family, self.spec.dims
        for i in range(d.layers):
            layer = self.spec.layer(i)
            for lin in (*fam.qkv, fam.o, *fam.gate_up, fam.down):
                if f"{layer}.{lin}.qweight" not in self and f"{layer}.{lin}.weight" not in self:
                    raise AwqEdgeError(f"{self.folder} has neither {layer}.{lin}.qweight nor .weight", RECREATE)
            for norm in (fam.attn_norm, fam.mlp_norm, fam.attn_out_norm, fam.mlp_out_norm, *fam.qk_norms):
                if norm and f"{layer}.{norm}.weight" not in self:
                    raise AwqEdgeError(f"{self.folder} has no tensor {layer}.{norm}.weight", RECREATE)
        for name in (fam.embed, fam.final_norm):
            if f"{name}.weight" not in self:
                raise AwqEdgeError(f"{self.folder} has no tensor {name}.weight", RECREATE)

    def __contains__(self, name: str) -> bool:
        return name in self._headers

    def names(self) -> list:
        return list(self._headers)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._headers:
            raise AwqEdgeError(f"{self.folder} has no tensor {name}", RECREATE)
        with safe_open(self._headers[name][0], framework="pt") as f:
            return f.get_tensor(name)

    def float_tensor(self, name: str) -> torch.Tensor:
        return self.tensor(name).float()

    def linear(self, name: str) -> QuantLinear | FloatLinear:
        bias = self.float_tensor(f"{name}.bias") if f"{name}.bias" in self else None
        if f"{name}.qweight" in self:
            q, scales, zeros = from_awq_gemm(
                self.tensor(f"{name}.qweight"), self.tensor(f"{name}.qzeros"), self.tensor(f"{name}.scales")
            )
            if not torch.isfinite(scales).all():
                raise AwqEdgeError(f"{self.folder}: {name}.scales holds values that are not finite", RECREATE)
            return QuantLinear(q, scales, zeros, self.group_size, bias=bias)
        if f"{name}.weight" in self:
            return FloatLinear(self.float_tensor(f"{name}.weight"), bias)
        raise AwqEdgeError(f"{self.folder} has neither {name}.qweight nor {name}.weight", RECREATE)

    def linears(self, names) -> list:
        """The linears of a layer's `qkv` or `gate_up` (one when the checkpoint stores them fused)."""
        return [self.linear(n) for n in names]

    def head_moments(self) -> torch.Tensor | None:
        """E[y^2] per channel of the final norm's output, as the quantiser measured it on its calibration text; None
        for a checkpoint without them (another tool's, an uncalibrated one, or one made before they were kept)."""
        path = self.folder / HEAD_STATS_FILE
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))["final_norm_sq_mean"]
            moments = torch.tensor(values, dtype=torch.float64)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, RuntimeError) as e:
            raise AwqEdgeError(f"{path} is not awq-edge's head statistics ({type(e).__name__}: {e})", RECREATE) \
                from None
        if moments.shape != (self.spec.dims.hidden,) or not bool((torch.isfinite(moments) & (moments >= 0)).all()):
            raise AwqEdgeError(f"{path} does not hold {self.spec.dims.hidden} finite non-negative numbers", RECREATE)
        return moments.float()

    def norm(self, name: str) -> torch.Tensor:
        """The factor the RMSNorm `name` multiplies by (Gemma's 1 + w), float32."""
        return self.spec.norm(self.tensor(f"{name}.weight"))


def load_quantized_model(folder, dtype=torch.float32):
    """The checkpoint as a float transformers model with dequantised linears, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    ck = Checkpoint(folder)
    tokenizer = load_tokenizer(ck.folder, ck.spec.dims.vocab)
    state = {}
    for key in ck.names():
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            state[f"{name}.weight"] = ck.linear(name).dequantize().to(dtype)
        elif not key.endswith((".qzeros", ".scales")) or f"{key.rpartition('.')[0]}.qweight" not in ck:
            state[key] = ck.tensor(key).to(dtype)
    config = load_config(ck.folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        expected.discard(f"{head}.weight")
    missing = expected - set(state)
    if missing:
        raise AwqEdgeError(f"{ck.folder} lacks tensors: {sorted(missing)[:5]}", RECREATE)
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), tokenizer
