"""One model's decoder as every stage after the quantiser builds it: its family's block plus what its config sets."""

import math
from dataclasses import dataclass

import torch

from awq_edge.arch.base import Adapter
from awq_edge.errors import AwqEdgeError

# Rope types whose frequencies do not depend on the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
REQUIRED_CONFIG = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int
    window: int  # the sliding layers' window length, 0 when every layer attends to the whole context
    tied: bool


@dataclass(frozen=True)
class Spec:
    """What a graph or a runtime needs beyond the weights. Per layer: `windows` (0 = full attention) and
    `rope_kinds`, a key of `ropes` (inverse frequencies float64 [head_dim / 2], attention scaling)."""

    family: Adapter
    dims: Dims
    activation: str  # "silu", "gelu_tanh" or "gelu"
    query_scale: float  # multiplies q.k (head_dim^-0.5, or Gemma's query_pre_attn_scalar^-0.5)
    attn_softcap: float  # scores -> cap * tanh(scores / cap) when > 0 (Gemma 2)
    logit_softcap: float  # the same on the logits (Gemma 2)
    embed_scale: float  # multiplies the embeddings (sqrt(hidden) for Gemma), 1.0 otherwise
    windows: tuple
    rope_kinds: tuple
    ropes: dict

    def layer(self, i: int) -> str:
        return f"{self.family.layers_path}.{i}"

    def norm(self, weight: torch.Tensor) -> torch.Tensor:
        """The factor an RMSNorm multiplies by, in float32 (Gemma's 1 + w)."""
        return weight.float() + self.family.norm_offset


def describe(config: dict) -> Spec:
    """The decoder of a config.json (a dict), or one AwqEdgeError line naming what is not supported."""
    from awq_edge.arch import get_adapter

    family = get_adapter(config.get("model_type"))
    missing = [k for k in REQUIRED_CONFIG if k not in config]  # before transformers fills in its defaults
    if missing:
        raise AwqEdgeError(f"config.json lacks {', '.join(missing)}",
                           "re-create the checkpoint with `awq-edge quantize`")
    config = normalised(config)
    d = dims_of(config)
    if d.heads % d.kv_heads:
        raise AwqEdgeError(f"{d.heads} heads do not divide into {d.kv_heads} KV heads", "check config.json")
    act = config.get(family.act_key) or config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise AwqEdgeError(f"activation {act!r} of {config['model_type']} is not supported",
                           f"use a model whose MLP uses one of: {', '.join(ACTIVATIONS)}")
    kinds = layer_types(config, d.layers)
    windows = tuple(d.window if k == "sliding_attention" else 0 for k in kinds)
    per_kind = isinstance((config.get("rope_parameters") or {}).get("full_attention"), dict)
    rope_kinds = kinds if per_kind else ("all",) * d.layers
    ropes = {k: rope_frequencies(config, d, k if per_kind else None) for k in dict.fromkeys(rope_kinds)}
    scalar = config.get("query_pre_attn_scalar")
    return Spec(
        family=family, dims=d, activation=ACTIVATIONS[act],
        query_scale=float(scalar if scalar else d.head_dim) ** -0.5,
        attn_softcap=float(config.get("attn_logit_softcapping") or 0.0),
        logit_softcap=float(config.get("final_logit_softcapping") or 0.0),
        embed_scale=math.sqrt(d.hidden) if family.embed_scaled else 1.0,
        windows=windows, rope_kinds=rope_kinds, ropes=ropes,
    )


def normalised(config: dict) -> dict:
    """config.json as the installed transformers reads it: older checkpoints' keys (rope_scaling,
    rope_local_base_freq, sliding_window_pattern) become rope_parameters and layer_types."""
    from transformers import AutoConfig

    keep = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        return AutoConfig.for_model(**keep).to_dict()
    except Exception as e:  # transformers' config validators raise several types; each means the same here
        raise AwqEdgeError(f"transformers cannot read this {config.get('model_type')} config.json ({e})",
                           "re-create the checkpoint with `awq-edge quantize`") from None


def dims_of(config: dict) -> Dims:
    heads = config["num_attention_heads"]
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return Dims(
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab=config["vocab_size"],
        eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
        window=int(window or 0),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def layer_types(config: dict, n_layers: int) -> tuple:
    """'sliding_attention' or 'full_attention' per layer, as transformers masks them."""
    types = config.get("layer_types")
    if types:
        return tuple(types)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return ("sliding_attention" if window else "full_attention",) * n_layers


def rope_frequencies(config: dict, d: Dims, layer_type: str | None = None):
    """RoPE inverse frequencies [head_dim / 2] (float64) and the attention scaling, of one layer type when the
    config keys its rope parameters by layer type (Gemma 3's local and global layers)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = dict(params[layer_type] if layer_type else params)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE:
        raise AwqEdgeError(
            f"rope type {rope_type!r} changes with sequence length and is not exported or run",
            f"use a model with rope type {', '.join(STATIC_ROPE)}",
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise AwqEdgeError(f"partial rotary embedding (factor {params['partial_rotary_factor']}) is not supported",
                           "use a model that rotates the whole head")
    theta = float(params["rope_theta"])
    inv_freq = 1.0 / theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float64) / d.head_dim)
    scaling = 1.0
    if rope_type != "default":
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", layer_type=layer_type)
        inv_freq = inv_freq.double()
    return inv_freq, float(scaling)


def rope_tables(rope, max_positions: int):
    """cos, sin [max_positions, head_dim / 2] in float32 of one `Spec.ropes` entry, with its scaling folded in."""
    inv_freq, scaling = rope
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return (angles.cos() * scaling).float(), (angles.sin() * scaling).float()
