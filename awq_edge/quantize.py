"""Quantise a model's decoder linears layer by layer: AWQ (scale and clip search) or round-to-nearest."""

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from awq_edge.arch import Adapter, fold_scale
from awq_edge.awq import apply_clip, search_clip, search_scale
from awq_edge.quant import QConfig, dequantize, quantize

METHODS = ("awq", "rtn")


@dataclass
class QuantizedLinear:
    q: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 (fp16-exact) [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.group_size)


@dataclass
class QuantResult:
    linears: dict  # full module name -> QuantizedLinear
    report: dict = field(default_factory=dict)


class _StopForward(Exception):
    pass


@torch.no_grad()
def record_layer_calls(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor):
    """The first layer's input and every layer's keyword arguments (masks, rotary tables).

    Runs the model with each decoder layer swapped for a recorder that passes
    its input through, so per-layer arguments (e.g. Gemma 3's sliding-window
    masks) come from the model's own forward, not from our reimplementation.
    """
    calls = []

    class Recorder(nn.Module):
        def __init__(self, real):
            super().__init__()
            self.real = real
            self.attention_type = getattr(real, "attention_type", None)

        def forward(self, hidden_states, *args, **kwargs):
            calls.append((hidden_states, args, kwargs))
            if len(calls) == len(layers):
                raise _StopForward
            return hidden_states

    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = Recorder(layer)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(calls) != len(layers):
        raise RuntimeError(f"recorded {len(calls)} decoder layer calls, expected {len(layers)}")
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


def _to(obj, device):
    """Tensors inside nested tuples, lists and dicts, moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _capture(layer: nn.Module, x, args, kwargs, linear_names, inspect_names):
    """Run the layer once: its output, each linear's input, each inspected module's call arguments."""
    feats, calls, hooks = {}, {}, []
    for name in linear_names:
        hooks.append(layer.get_submodule(name).register_forward_hook(
            lambda m, inp, out, name=name: feats.__setitem__(name, inp[0])))
    for name in inspect_names:
        hooks.append(layer.get_submodule(name).register_forward_pre_hook(
            lambda m, a, kw, name=name: calls.__setitem__(name, (a, dict(kw))), with_kwargs=True))
    try:
        out = _first(layer(x, *args, **kwargs))
    finally:
        for h in hooks:
            h.remove()
    return out, feats, calls


def _caller(module: nn.Module, call):
    """module as a function of its hidden-state input, other arguments as recorded."""
    args, kwargs = call
    if args:
        return lambda x: _first(module(x, *args[1:], **kwargs))
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return lambda x: _first(module(hidden_states=x, **kwargs))


def relative_error(x: torch.Tensor, w_ref: torch.Tensor, w_q: torch.Tensor, n_tokens: int = 4096) -> float:
    """||x W_q^T - x W^T||^2 / ||x W^T||^2 on a token subsample."""
    x = x.reshape(-1, x.shape[-1]).float()
    x = x[:: max(1, x.shape[0] // n_tokens)]
    ref = x @ w_ref.float().t()
    return ((x @ w_q.float().t() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-20)).item()


@torch.no_grad()
def quantize_model(model: nn.Module, adapter: Adapter, cfg: QConfig, method: str, calib_ids: torch.Tensor,
                   keep_8bit: int = 0, device: str = "cpu", progress: bool = True) -> QuantResult:
    """Quantise every linear of every decoder layer in place (weights become their dequantised values).

    Each layer's input is the previous float layer's output, as in llm-awq.
    With keep_8bit = N, the N linears with the largest 4-bit output error are
    quantised at 8 bits instead.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    t0 = time.perf_counter()
    layers = adapter.layers(model)
    x, layer_calls = record_layer_calls(model, layers, calib_ids)
    x = x.to(device)
    result = QuantResult(linears={}, report={"alphas": {}, "sensitivity": {}})
    reference_weights = {}
    for i in tqdm(range(len(layers)), desc=f"{method} w{cfg.w_bit} g{cfg.group_size}", disable=not progress, unit="layer"):
        layer = layers[i].to(device)
        args, kwargs = _to(layer_calls[i], device)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        groups = adapter.groups(layer, model.config) if method == "awq" else []
        inspect = sorted({g.inspect for g in groups})
        out, feats, calls = _capture(layer, x, args, kwargs, list(linears), inspect)

        if method == "awq":
            found = []
            for g in groups:
                fn = _caller(layer.get_submodule(g.inspect), calls[g.inspect])
                s, alpha, _ = search_scale(fn, feats[g.linears[0]], [linears[n] for n in g.linears], cfg)
                found.append((g, s))
                result.report["alphas"][f"{i}.{g.prev}"] = alpha
            for g, s in found:
                fold_scale(layer, g, s, adapter.norm_offset)
                scaled = feats[g.linears[0]] / s.to(feats[g.linears[0]].dtype)
                for n in g.linears:
                    feats[n] = scaled
        ref = {n: lin.weight.detach().clone() for n, lin in linears.items()}
        if method == "awq":
            for n, lin in linears.items():
                if not n.endswith(adapter.no_clip):
                    apply_clip(lin, search_clip(lin.weight, feats[n], cfg), cfg.group_size)

        for n, lin in linears.items():
            full = f"{adapter.layers_path}.{i}.{n}"
            ql = QuantizedLinear(*quantize(lin.weight.data, cfg), bits=cfg.w_bit, group_size=cfg.group_size)
            w_hat = ql.dequantize().to(lin.weight.dtype)
            result.report["sensitivity"][full] = relative_error(feats[n], ref[n], w_hat)
            lin.weight.data = w_hat
            result.linears[full] = ql
            if keep_8bit:
                reference_weights[full] = ref[n].cpu()
        x = out
        layers[i] = layer.to("cpu")
        del feats, calls, ref

    if keep_8bit:
        cfg8 = QConfig(8, cfg.group_size, cfg.zero_point)
        worst = sorted(result.report["sensitivity"], key=result.report["sensitivity"].get, reverse=True)[:keep_8bit]
        for full in worst:
            ql = QuantizedLinear(*quantize(reference_weights[full], cfg8), bits=8, group_size=cfg.group_size)
            model.get_submodule(full).weight.data = ql.dequantize().to(model.get_submodule(full).weight.dtype)
            result.linears[full] = ql
        result.report["int8_modules"] = worst
    result.report["seconds"] = round(time.perf_counter() - t0, 1)
    return result
