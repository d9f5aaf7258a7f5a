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
from awq_edge.checkpoint.hf_folder import (
    FLOAT_DTYPES,
    HEAD_STATS_FILE,
    check_values,
    load_config,
    load_tokenizer,
    read_config_json,
    tensor_headers,
)
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
        packed = {k for k in self._headers if k.endswith((".qweight", ".qzeros"))}
        for key, (_, entry) in self._headers.items():
            if key not in packed and entry["dtype"] not in FLOAT_DTYPES:
                raise AwqEdgeError(f"{self.folder}: {key} is stored as {entry['dtype']}, not a float type", RECREATE)
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
        for name, (in_f, out_f) in self._linear_shapes().items():
            if f"{name}.qweight" in self:
                have, want = self._headers[f"{name}.qweight"][1]["shape"], [in_f, out_f // 8]
            elif f"{name}.weight" in self:
                have, want = self._headers[f"{name}.weight"][1]["shape"], [out_f, in_f]
            else:
                raise AwqEdgeError(f"{self.folder} has neither {name}.qweight nor {name}.weight", RECREATE)
            if have != want:
                raise AwqEdgeError(f"{self.folder}: {name} is stored as {have}, config.json implies {want}", RECREATE)
        for name, shape in self._other_shapes().items():
            if name not in self:
                raise AwqEdgeError(f"{self.folder} has no tensor {name}", RECREATE)
            if self._headers[name][1]["shape"] != shape:
                raise AwqEdgeError(f"{self.folder}: {name} has shape {self._headers[name][1]['shape']}, config.json "
                                   f"implies {shape}", RECREATE)

    def _linear_shapes(self) -> dict:
        """(in, out) of every decoder linear, fused ones (Phi-3's qkv_proj, gate_up_proj) as stored."""
        fam, d = self.spec.family, self.spec.dims
        q, kv, inter = d.heads * d.head_dim, d.kv_heads * d.head_dim, self.config["intermediate_size"]
        qkv = [q, kv, kv] if len(fam.qkv) == 3 else [q + 2 * kv]
        gate_up = [inter, inter] if len(fam.gate_up) == 2 else [2 * inter]
        shapes = {}
        for i in range(d.layers):
            p = self.spec.layer(i)
            shapes.update({f"{p}.{n}": (d.hidden, out) for n, out in zip(fam.qkv, qkv)})
            shapes.update({f"{p}.{n}": (d.hidden, out) for n, out in zip(fam.gate_up, gate_up)})
            shapes[f"{p}.{fam.o}"], shapes[f"{p}.{fam.down}"] = (q, d.hidden), (inter, d.hidden)
        return shapes

    def _other_shapes(self) -> dict:
        """The norms and the embedding table every layer and the model must hold, by their config shapes."""
        fam, d = self.spec.family, self.spec.dims
        shapes = {f"{fam.embed}.weight": [d.vocab, d.hidden], f"{fam.final_norm}.weight": [d.hidden]}
        for i in range(d.layers):
            p = self.spec.layer(i)
            for norm in (fam.attn_norm, fam.mlp_norm, fam.attn_out_norm, fam.mlp_out_norm):
                if norm:
                    shapes[f"{p}.{norm}.weight"] = [d.hidden]
            shapes.update({f"{p}.{norm}.weight": [d.head_dim] for norm in fam.qk_norms})
        if "lm_head.weight" in self:
            shapes["lm_head.weight"] = [d.vocab, d.hidden]
        return shapes

    def __contains__(self, name: str) -> bool:
        return name in self._headers

    def names(self) -> list:
        return list(self._headers)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._headers:
            raise AwqEdgeError(f"{self.folder} has no tensor {name}", RECREATE)
        with safe_open(self._headers[name][0], framework="pt") as f:
            return check_values(name, f.get_tensor(name), self.folder)

    def float_tensor(self, name: str) -> torch.Tensor:
        return self.tensor(name).float()

    def linear(self, name: str) -> QuantLinear | FloatLinear:
        bias = self.float_tensor(f"{name}.bias") if f"{name}.bias" in self else None
        if f"{name}.qweight" in self:
            q, scales, zeros = from_awq_gemm(
                self.tensor(f"{name}.qweight"), self.tensor(f"{name}.qzeros"), self.tensor(f"{name}.scales")
            )
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
