"""Quantise a model's decoder linears layer by layer: AWQ, GPTQ, AWQ scales with GPTQ rounding, or round-to-nearest.

Memory is bounded by one decoder layer and one chunk of calibration samples:
the calibration activations (each layer's float input and output) are kept in
the layer's dtype on the GPU or, when the budget is short, in host memory;
every search runs chunk by chunk and accumulates its loss.
"""

import copy
import heapq
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from awq_edge.arch import Adapter, fold_scale
from awq_edge.quant import QConfig, QuantLinear, quantize, to_groups
from awq_edge.quantizer import gptq
from awq_edge.quantizer.awq import apply_clip, search_clip, search_scale
from awq_edge.quantizer.gptq import HessianAccumulator, gptq_quantize
from awq_edge.quantizer.layer_loader import LoadedModel, _StopForward

METHODS = ("awq", "rtn", "gptq", "awq-gptq")
SCALED = ("awq", "awq-gptq")  # methods that search and fold AWQ scales
GPTQ_ROUNDED = ("gptq", "awq-gptq")
SAMPLE_ROWS = 512  # tokens per part kept for the clip search and the sensitivity report, as llm-awq's auto_clip
N_GRID = 20  # alphas tried per scale search (llm-awq's grid)
CHUNK_TOKENS = 4096  # larger chunks buy little speed on a GPU and cost memory (8192: 12.2 GiB peak at 8B)


def default_method(group_size: int) -> str:
    """The method that measured best at this group size on both real models' unseen text (WikiText-2 test,
    bench/results/quality_defaults_*.md, 128 and 16 samples): at group 128 AWQ's scales followed by GPTQ's rounding
    (SmolLM2 31.10 against AWQ's 32.78, Gemma-3-270M 63.24 against 66.45), at 64 and below AWQ's scales and
    clipping (Gemma-3 62.09 against 65.91; SmolLM2 within 0.4% at 128 samples, 2.5% better at 16)."""
    return "awq-gptq" if group_size >= 128 else "awq"


@dataclass
class QuantResult:
    linears: dict  # full module name -> QuantLinear (empty when a sink took them)
    report: dict = field(default_factory=dict)
    head_moments: torch.Tensor | None = None  # E[y^2] per channel of the final norm's output y (the head's input)


@dataclass(frozen=True)
class MemoryPlan:
    chunk_samples: int
    store: str  # where the calibration activations live between layers

    def describe(self, n_tokens: int, hidden: int, bytes_per: int) -> str:
        gib = 2 * n_tokens * hidden * bytes_per / 2**30
        return f"activations {gib:.1f} GiB on {self.store}, {self.chunk_samples} samples a chunk"


def plan_memory(config, n_samples: int, seqlen: int, device: str, budget_bytes: int | None,
                bytes_per: int = 4, hessians: bool = False) -> MemoryPlan:
    """Chunk size and activation storage that fit `budget_bytes` of accelerator memory.

    Counted: the layer's weights twice (the searches keep the float
    originals), five copies of the largest group's weights (a candidate's
    fake-quantisation temporaries), GPTQ's Hessians and, apart (it never
    overlaps a chunk), its rounding's temporaries, one chunk's working set
    (the MLP's intermediates, the block's output and reference, a few
    hidden-size buffers per token), and, if they fit, the layer's input and
    output activations for all samples. Checked against the measured peak at
    Llama-3-8B shapes (bench/results/quantize_scale.json).
    """
    hidden, inter = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    mlp = 2 * hidden * inter
    layer = hidden * (heads * head_dim + 2 * kv) + heads * head_dim * hidden + 3 * hidden * inter
    fixed = (2 * layer + (3 * hidden ** 2 + inter ** 2 if hessians else 0)) * bytes_per
    search = 5 * mlp * bytes_per  # the scale search's candidates, beside one chunk's working set
    # GPTQ's rounding, which never overlaps a chunk: the widest Hessian's factors (three at once) and three copies
    # of the stacked gate/up weights.
    rounding = (3 * inter ** 2 + 3 * mlp) * bytes_per if hessians else 0
    per_sample = seqlen * (6 * inter + 12 * hidden) * bytes_per
    chunk = max(1, min(n_samples, CHUNK_TOKENS // seqlen))
    if not device.startswith("cuda") or budget_bytes is None:
        return MemoryPlan(chunk, device)
    chunk = max(1, min(chunk, (budget_bytes - fixed - search) // 2 // per_sample))
    activations = 2 * n_samples * seqlen * hidden * bytes_per
    store = device if fixed + activations + max(search + chunk * per_sample, rounding) <= budget_bytes else "cpu"
    return MemoryPlan(chunk, store)


def _to(obj, device):
    """Tensors inside nested tuples, lists and dicts, moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def first_output(out):
    """A module's main output (decoder layers return a tuple in some transformers versions)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def hidden_input(call):
    """The hidden-state input of a recorded (args, kwargs) call."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _caller(module: nn.Module, call):
    """module as a function of its hidden-state input, other arguments as recorded."""
    args, kwargs = call
    if args:
        return lambda x: first_output(module(x, *args[1:], **kwargs))
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return lambda x: first_output(module(hidden_states=x, **kwargs))


@torch.no_grad()
def _call_of(layer: nn.Module, module: nn.Module, x, args, kwargs):
    """The (args, kwargs) `module` is called with when `layer` runs on x; the layer stops there."""
    seen = []

    def stop(m, a, kw):
        seen.append((a, dict(kw)))
        raise _StopForward

    hook = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        layer(x, *args, **kwargs)
    except _StopForward:
        pass
    finally:
        hook.remove()
    return seen[0]


class _InputStats:
    """Per linear: mean |x| per input channel (search part), token samples of each part, GPTQ Hessians.

    Linears called on the same tensor (q/k/v, gate/up) share one Hessian: `hessian_of[name]` names its owner.
    """

    def __init__(self, linears: dict, rows_every: list, hessians: bool, sink_share: float = 0.0):
        self.linears, self.rows_every, self.sink_share = linears, rows_every, sink_share
        self.abs_sum = {}
        self.count = {}
        self.rows = {n: ([], []) for n in linears}
        self.hessians = hessians
        self.hessian = {}  # owner -> HessianAccumulator
        self.hessian_of = {}  # linear -> owner
        self.part = 0
        self._last = None  # (the last input seen, its Hessian's owner)

    @contextmanager
    def watching(self, part: int):
        self.part = part
        hooks = [m.register_forward_hook(lambda m, inp, out, n=n: self._see(n, inp[0]))
                 for n, m in self.linears.items()]
        try:
            yield
        finally:
            self._last = None
            for h in hooks:
                h.remove()

    def _see(self, name, x):
        if self.hessians:
            owner = self._last[1] if self._last is not None and x is self._last[0] else name
            self._last = (x, owner)
            self.hessian_of[name] = owner
            if owner == name:
                h = self.hessian.setdefault(name, HessianAccumulator())
                if self.sink_share and x.dim() == 3:  # each sequence's first token, again
                    h.add(x[:, 0], weight=self.sink_share * x.shape[1])
                h.add(x)
        x = x.reshape(-1, x.shape[-1])
        if self.part == 0:
            self.abs_sum[name] = self.abs_sum.get(name, 0) + x.abs().float().sum(0)
            self.count[name] = self.count.get(name, 0) + x.shape[0]
        # A copy: a strided view would keep the chunk's whole input alive (6 GiB a layer at Llama-3-8B shapes).
        self.rows[name][self.part].append(x[:: self.rows_every[self.part]].to(torch.float32, copy=True))

    def x_mean(self, name):
        return self.abs_sum[name] / self.count[name]

    def sample(self, name, part):
        rows = self.rows[name][part]
        return torch.cat(rows) if rows else None


def group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return to_groups(w.float(), group_size).abs().amax(-1)


def relative_error(x: torch.Tensor, w_ref: torch.Tensor, w_q: torch.Tensor) -> float:
    """||x W_q^T - x W^T||^2 / ||x W^T||^2."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ w_ref.float().t()
    return ((x @ w_q.float().t() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-20)).item()


@contextmanager
def _tf32(device: str):
    """TF32 matmuls on the GPU: fp32 range (Gemma's activations overflow fp16) at tensor-core speed."""
    if not device.startswith("cuda"):
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class _Timer:
    """Seconds of each step of the layer loop, summed over the layers (the GPU synchronised at each lap)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device) if device.startswith("cuda") else None
        self.seconds = {}
        self.peak, self.peak_step = 0, None  # the step in which the GPU's peak allocation was last raised
        self.t = time.perf_counter()

    def lap(self, step: str):
        if self.cuda:
            torch.cuda.synchronize(self.cuda)
            peak = torch.cuda.max_memory_allocated(self.cuda)
            if peak > self.peak:
                self.peak, self.peak_step = peak, step
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self.t
        self.t = now

    def summary(self) -> str:
        steps = " | ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return steps + (f"; peak GPU {self.peak / 2**30:.2f} GiB in {self.peak_step}" if self.peak_step else "")


class _Collect:
    """The default sink: results stay in memory (the Python API, the quality benchmark, tests)."""

    def __init__(self):
        self.linears, self.tensors = {}, {}

    def linear(self, name, ql):
        self.linears[name] = ql

    def tensor(self, name, t):
        self.tensors[name] = t


def _search_scales(layer, i, source, linears, stats, xs, calls, is_held, cfg, guard, duo, report, device) -> dict:
    """AWQ's scale search for each group of linears of layer i; folds the kept scales. Returns linear -> scales."""
    adapter = source.adapter
    scales = {}
    for g in adapter.groups(layer, source.config):
        module = layer.get_submodule(g.inspect)

        def chunk_calls(module=module):
            for x, (args, kwargs), held in zip(xs, calls, is_held):
                call = _call_of(layer, module, x.to(device), args, kwargs)
                yield _caller(module, call), hidden_input(call), held

        s, best, _ = search_scale(chunk_calls(), stats.x_mean(g.linears[0]), [linears[name] for name in g.linears],
                                  cfg, n_grid=N_GRID, guard=guard, duo=duo)
        # The exponent of mean|x|; a weight-aware (duo) candidate is reported as "duo ALPHA".
        alpha = (best % N_GRID) / N_GRID
        report["alphas"][f"{i}.{g.prev}"] = alpha if best < N_GRID else f"duo {alpha}"
        report["scale_groups"] += 1
        report["scales_kept"] += best > 0
        report["duo_chosen"] += best >= N_GRID
        if best > 0:
            fold_scale(layer, g, s, adapter.norm_offset)
            scales.update(dict.fromkeys(g.linears, s))
    return scales


def _gptq_round(linears: dict, stats: _InputStats, scales: dict, cfg: QConfig, damp: float) -> dict:
    """GPTQ for every linear, one call per shared Hessian (q/k/v stacked, gate/up stacked: rows are independent,
    so this equals one call per linear). Returns name -> (q, scales, zeros)."""
    by_owner = {}
    for name in linears:
        by_owner.setdefault(stats.hessian_of.get(name, name), []).append(name)  # a linear never called: its own
    out = {}
    for owner, names in by_owner.items():
        assert all(scales.get(n) is scales.get(owner) for n in names), "linears of one input share its scales"
        # The accumulator's memory (0.8 GB for Llama-3-8B's down_proj); an empty one says why in one line.
        H = stats.hessian.pop(owner, HessianAccumulator()).take()
        if owner in scales:  # the stacked linears share their input, so its folded scale
            H.div_(scales[owner][:, None]).div_(scales[owner][None, :])
        W = torch.cat([linears[n].weight.data.float() for n in names])
        q, sc, zp = gptq_quantize(W, H, cfg, damp=damp, overwrite=True)
        del H, W
        rows = [linears[n].weight.shape[0] for n in names]
        out.update({n: parts for n, parts in zip(names, zip(q.split(rows), sc.split(rows), zp.split(rows)))})
    return out


@torch.no_grad()
def head_moments(final_norm: nn.Module, xs: list, device: str) -> torch.Tensor:
    """E[y^2] per channel of y = final_norm(x) over every calibration token, x the last layer's output: the weights
    the exporter's 4-bit head search gives each input channel (export/head.py), measured here where the model
    runs (the exporter would otherwise run the whole model again, on a CPU, at 4 bytes a parameter)."""
    norm = copy.deepcopy(final_norm).to(device)
    total, count = 0, 0
    for x in xs:
        y = norm(x.to(device)).double()
        total = total + y.pow(2).sum(dim=tuple(range(y.dim() - 1)))
        count += y.numel() // y.shape[-1]
    return (total / count).float().cpu()


def split_samples(n_samples: int, held_out: float = 0.25) -> int:
    """How many of n calibration samples are held out to validate the search (none of a single sample)."""
    return int(n_samples * held_out) if n_samples >= 2 else 0


@torch.no_grad()
def quantize_layers(source, cfg: QConfig, method: str, calib_ids: torch.Tensor, *, keep_8bit: int = 0,
                    device: str = "cpu", budget_bytes: int | None = None, sink=None, progress: bool = True,
                    held_out: float = 0.25, guard: bool = True, duo: bool = False, sequential: bool = False,
                    gptq_damp: float = gptq.DAMP, gptq_sink: float = 0.0, log=print) -> QuantResult:
    """Quantise every decoder linear of `source` (layers.FileModel or LoadedModel), one layer at a time.

    Each layer's input is the previous float layer's output, as in llm-awq.
    The last `held_out` fraction of the calibration samples is held out: AWQ's
    scales and clipping bounds are kept only where they beat round-to-nearest
    there (guard=False measures on them but keeps every choice, as llm-awq would).
    With keep_8bit = N, the N linears with the largest 4-bit output error on
    the held-out tokens are quantised at 8 bits instead. `sink` receives
    every quantised linear and every other layer tensor (folded norms,
    biases) as soon as its layer is done. `duo` adds AutoAWQ's weight-aware
    scale candidates to the search; `sequential` feeds each layer the
    quantised previous layers' output instead of the float model's (with keep_8bit, the
    4-bit output of the linears later kept at 8 bits).
    `gptq_damp` is GPTQ's dampening, a fraction of the Hessian's mean diagonal; `gptq_sink` counts each
    sequence's first token (the attention sink) again in GPTQ's Hessian, `gptq_sink` x seqlen times, since
    least squares otherwise gives that one row up (bench/gptq_sink.py).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    t0 = time.perf_counter()
    sink = sink or _Collect()
    adapter: Adapter = source.adapter
    n, seqlen = calib_ids.shape
    n_held = split_samples(n, held_out)
    plan = plan_memory(source.config, n, seqlen, device, budget_bytes, hessians=method in GPTQ_ROUNDED)
    chunks = [c for part in (calib_ids[: n - n_held], calib_ids[n - n_held:]) for c in part.split(plan.chunk_samples)
              if len(c)]
    is_held = [j >= -(-(n - n_held) // plan.chunk_samples) for j in range(len(chunks))]
    rows_every = [max(1, (n - n_held) * seqlen // SAMPLE_ROWS), max(1, n_held * seqlen // SAMPLE_ROWS)]
    log(f"calibration: {n - n_held} samples to search, {n_held} held out; "
        f"{plan.describe(n * seqlen, source.config.hidden_size, 4)}")

    xs, calls = [], []
    for c in chunks:
        x, layer_calls = source.record(c)
        xs.append(x.to(plan.store))
        calls.append(_to(layer_calls, device))
    result = QuantResult(linears={}, report={"alphas": {}, "sensitivity": {}, "scales_kept": 0, "scale_groups": 0, "duo_chosen": 0,
                                             "clip_kept": [0, 0], "memory_plan": plan.__dict__, "n_held_out": n_held})
    worst = []  # heap of (error, name, QuantLinear, float weight): the keep_8bit candidates so far
    timer = _Timer(device)
    with _tf32(device):
        for i in tqdm(range(source.n_layers), desc=f"{method} w{cfg.w_bit} g{cfg.group_size}", disable=not progress,
                      unit="layer"):
            layer = source.layer(i, device, torch.float32)
            timer.lap("load")
            prefix = f"{adapter.layers_path}.{i}."
            linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
            stats = _InputStats(linears, rows_every, hessians=method in GPTQ_ROUNDED, sink_share=gptq_sink)
            outs = []
            for j, x in enumerate(xs):
                args, kwargs = calls[j][i]
                with stats.watching(int(is_held[j])):
                    out = first_output(layer(x.to(device), *args, **kwargs))
                if not sequential:  # else the quantised layer's output is computed below
                    outs.append(out.to(plan.store))
                del out
            timer.lap("forward")

            scales = {}
            if method in SCALED:
                scales = _search_scales(layer, i, source, linears, stats, xs, [c[i] for c in calls], is_held, cfg,
                                        guard, duo, result.report, device)
            timer.lap("scale search")
            samples = {name: [stats.sample(name, p) for p in (0, 1)] for name in linears}
            for name, s in scales.items():
                samples[name] = [r / s if r is not None else None for r in samples[name]]
            ref = {name: lin.weight.detach().clone() for name, lin in linears.items()}
            if method == "awq":
                for name, lin in linears.items():
                    if not name.endswith(adapter.no_clip):
                        bound = search_clip(lin.weight, samples[name][0], cfg, samples[name][1] if guard else None)
                        result.report["clip_kept"][0] += int((bound < group_absmax(lin.weight, cfg.group_size)).sum())
                        result.report["clip_kept"][1] += bound.numel()
                        apply_clip(lin, bound, cfg.group_size)

            timer.lap("clip")
            rounded = _gptq_round(linears, stats, scales, cfg, gptq_damp) if method in GPTQ_ROUNDED else {}
            for name, lin in linears.items():
                q, sc, zp = rounded[name] if name in rounded else quantize(lin.weight.data, cfg)
                ql = QuantLinear(q, sc, zp, bits=cfg.w_bit, group_size=cfg.group_size)
                w_hat = ql.dequantize().to(lin.weight.dtype)  # on the device: the host is the slow part at 8B
                if keep_8bit or isinstance(sink, _Collect):  # kept: off the device (a writer packs it there)
                    ql = ql.to("cpu")
                check = samples[name][1] if samples[name][1] is not None else samples[name][0]
                err = relative_error(check, ref[name], w_hat)
                result.report["sensitivity"][prefix + name] = err
                lin.weight.data = w_hat
                if keep_8bit:
                    heapq.heappush(worst, (err, prefix + name, ql, ref[name].cpu()))
                    if len(worst) > keep_8bit:
                        _, evicted, ql, _ = heapq.heappop(worst)
                        sink.linear(evicted, ql)
                else:
                    sink.linear(prefix + name, ql)
            timer.lap("rounding")
            quantised = {f"{name}.weight" for name in linears}
            for name, t in layer.state_dict().items():
                if name not in quantised:
                    sink.tensor(prefix + name, t.detach().cpu())
            if sequential:  # the next layer sees this layer's quantised output
                outs = [first_output(layer(x.to(device), *calls[j][i][0], **calls[j][i][1])).to(plan.store)
                        for j, x in enumerate(xs)]
            xs = outs
            source.release(i, layer)
            del stats, samples, ref
            timer.lap("store")

    result.head_moments = head_moments(source.module(adapter.final_norm), xs, device)
    cfg8 = QConfig(8, cfg.group_size, cfg.zero_point)
    for _, name, _, weight in sorted(worst, reverse=True):
        ql = QuantLinear(*quantize(weight, cfg8), bits=8, group_size=cfg.group_size)
        if isinstance(source, LoadedModel):
            lin = source.model.get_submodule(name)
            lin.weight.data = ql.dequantize().to(lin.weight.dtype)
        sink.linear(name, ql)
    if keep_8bit:
        result.report["int8_modules"] = [name for _, name, _, _ in sorted(worst, reverse=True)]
    if isinstance(sink, _Collect):
        result.linears = sink.linears
    result.report["seconds"] = round(time.perf_counter() - t0, 1)
    result.report["step_seconds"] = {k: round(v, 1) for k, v in timer.seconds.items()}
    result.report["peak_step"] = timer.peak_step
    log(f"layer loop: {timer.summary()}")
    return result


@torch.no_grad()
def quantize_model(model: nn.Module, adapter: Adapter, cfg: QConfig, method: str, calib_ids: torch.Tensor,
                   keep_8bit: int = 0, device: str = "cpu", progress: bool = True, **kwargs) -> QuantResult:
    """Quantise a model in memory in place (its linears become their dequantised values)."""
    return quantize_layers(LoadedModel(model, adapter), cfg, method, calib_ids, keep_8bit=keep_8bit, device=device,
                           progress=progress, log=lambda *a: None if not progress else print(*a), **kwargs)
