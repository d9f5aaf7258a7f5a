"""CUDA backend: a batch-1 decoder of any family in awq_edge.arch on awq-edge's int4 kernels, with a static KV cache
and CUDA graphs.

The checkpoint's 4-bit linears are repacked once into the kernels' layout, q/k/v and gate/up fused into one
GEMV each. A decode step is the fused QKV GEMV (the input RMSNorm folded in), attention (rotary embedding, cache
write, split attention over the cache and the merge of the splits in one kernel), the O GEMV (the residual add
rides on its bias; it also writes gamma * h for the next norm), the gate/up GEMV (norm folded, SiLU gate in its
epilogue), the down GEMV (+ residual, gamma * h): five launches per layer (layer 0's input norm is a kernel of
its own), each overlapping the previous one's tail on Hopper (programmatic dependent launch), positions read from
device memory, so one captured CUDA graph replays every step.
The families' additions run in the same kernels: q/k norms (Qwen3, Gemma 3) and score soft-capping (Gemma 2) in
the attention kernel, GELU gates (Gemma) in the gated GEMV's epilogue, and Gemma 2/3's norms around each block's
output as one kernel per block boundary on a float32 residual stream (the block's output normalised and added,
then the next product's input norm). PyTorch ops left in a step: the embedding lookup (and Gemma's scale), the
logits' cast, soft-capping (Gemma 2) and argmax.
Prefill runs the same layers on all prompt rows, with PyTorch's scaled_dot_product_attention over the cache.

`TorchOps` computes the same step with plain PyTorch: the reference the kernels are tested against, and what
runs the decoder structure on a CPU in the tests.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from awq_edge.arch import Dims, Spec, rope_tables
from awq_edge.checkpoint.reader import Checkpoint
from awq_edge.errors import AwqEdgeError
from awq_edge.packing import to_matmul_nbits
from awq_edge.quant import FloatLinear, QuantLinear, as_float, fuse_rows
from awq_edge.runtime.decoder import PrefixCachedDecoder
from awq_edge.runtime.sampling import Sampling

DEFAULT_MAX_LEN = 4096


@dataclass
class DeviceLinear:
    """y = x W^T (+ bias): `packed` int4 for the kernels, or a dense `weight` [n, k]."""

    n: int
    k: int
    packed: object = None  # awq_edge.runtime.kernels.PackedInt4
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes one product reads from the weights (what a decode step streams)."""
        t = self.packed.data if self.packed is not None else self.weight
        return t.numel() * t.element_size() + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


@dataclass
class Layer:
    """One decoder layer; norms hold the factor they multiply by (Gemma's 1 + w already added). The optional
    fields default to the Llama block: no q/k or output norms, the model's window and RoPE tables."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor  # the MLP's input norm
    qkv: DeviceLinear
    o: DeviceLinear
    gate_up: DeviceLinear
    down: DeviceLinear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None
    window: int | None = None  # None: Weights.dims.window
    cos: torch.Tensor | None = None  # None: Weights.cos / sin
    sin: torch.Tensor | None = None


@dataclass(frozen=True)
class Features:
    """What a family adds to the Llama block outside the layers' weights (see awq_edge.arch.Spec); defaults to none,
    so Weights built from bare shapes (bench/decode.py's random models) need no Spec."""

    activation: str = "silu"
    query_scale: float | None = None  # None: head_dim^-0.5
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0
    embed_scale: float = 1.0


@dataclass
class Weights:
    dims: Dims
    embed: torch.Tensor  # [vocab, hidden]
    layers: list
    norm: torch.Tensor
    lm_head: DeviceLinear
    cos: torch.Tensor  # fp32 [max_len, head_dim / 2]
    sin: torch.Tensor
    features: Features = Features()

    @property
    def max_len(self) -> int:
        return self.cos.shape[0]


def _fused(ck: Checkpoint, names) -> QuantLinear | FloatLinear:
    parts = [ck.linear(n) for n in names]
    if len(parts) == 1:
        return parts[0]
    merged = fuse_rows(parts)
    return merged if merged is not None else fuse_rows([as_float(p) for p in parts])


def interleave_gate_up(lin):
    """Rows [gate; up] reordered as 8 gate rows, the 8 up rows of the same outputs, and so on: the layout in which
    the gated GEMM finds both halves of an output in one 16-row tile."""
    n = lin.shape[0] // 2
    if n % 8:
        raise AwqEdgeError(f"intermediate size {n} is not a multiple of 8", "use the ONNX backend for this model")
    order = torch.arange(2 * n).view(2, n // 8, 8).transpose(0, 1).reshape(-1)
    pick = lambda t: None if t is None else t[order].contiguous()  # noqa: E731
    if isinstance(lin, QuantLinear):
        return QuantLinear(pick(lin.q), pick(lin.scales), pick(lin.zeros), lin.group_size, lin.bits, pick(lin.bias))
    return FloatLinear(pick(lin.weight), pick(lin.bias))


def _place(lin, device, dtype, packed: bool) -> DeviceLinear:
    n, k = lin.shape
    bias = None if lin.bias is None else lin.bias.to(device=device, dtype=dtype)
    if packed and isinstance(lin, QuantLinear):
        from awq_edge.runtime import kernels

        if lin.group_size not in kernels.BLOCK_SIZES or k % 8:
            raise AwqEdgeError(
                f"a {n}x{k} linear with group size {lin.group_size} does not fit the CUDA kernels "
                f"(group size 32, 64 or 128, in_features a multiple of 8)",
                "re-quantise with `awq-edge quantize --group-size 128`, or use the ONNX backend",
            )
        nb = to_matmul_nbits(lin.q, lin.scales.half(), lin.zeros, lin.group_size, 4)
        w = kernels.repack_matmul_nbits(nb["B"].to(device), nb["scales"].to(device), nb["zero_points"].to(device), k,
                                        lin.group_size)
        return DeviceLinear(n, k, packed=w, bias=bias)
    return DeviceLinear(n, k, weight=as_float(lin).weight.to(device=device, dtype=dtype), bias=bias)


def load_weights(folder, device="cuda", dtype=torch.float16, packed: bool = True, max_len: int | None = None) -> Weights:
    """A quantised checkpoint (ours or AutoAWQ GEMM) on `device`, read as its family's Spec says; packed=False keeps
    dense weights."""
    ck = Checkpoint(Path(folder))
    spec, f = ck.spec, ck.spec.family
    d = spec.dims
    max_len = min(max_len or DEFAULT_MAX_LEN, d.max_positions)
    tables = {}
    for kind, rope in spec.ropes.items():
        tables[kind] = [t[:max_len].to(device).contiguous() for t in rope_tables(rope, max_len)]
    vec = lambda name: ck.float_tensor(name).to(device=device, dtype=dtype).contiguous()  # noqa: E731
    norm = lambda name: ck.norm(name).to(device=device, dtype=dtype).contiguous() if name else None  # noqa: E731
    place = lambda lin: _place(lin, device, dtype, packed)  # noqa: E731
    layers = []
    for i in range(d.layers):
        p = spec.layer(i)
        q_norm, k_norm = (norm(f"{p}.{n}") for n in f.qk_norms) if f.qk_norms else (None, None)
        cos, sin = tables[spec.rope_kinds[i]]
        layers.append(Layer(
            norm(f"{p}.{f.attn_norm}"), norm(f"{p}.{f.mlp_norm}"),
            place(_fused(ck, [f"{p}.{n}" for n in f.qkv])),
            place(ck.linear(f"{p}.{f.o}")),
            place(interleave_gate_up(_fused(ck, [f"{p}.{n}" for n in f.gate_up]))),
            place(ck.linear(f"{p}.{f.down}")),
            q_norm, k_norm, norm(f.attn_out_norm and f"{p}.{f.attn_out_norm}"),
            norm(f.mlp_out_norm and f"{p}.{f.mlp_out_norm}"), spec.windows[i], cos, sin,
        ))
    embed = vec(f"{f.embed}.weight")
    if "lm_head.qweight" in ck or ("lm_head.weight" in ck and not d.tied):
        head = place(ck.linear("lm_head"))
    else:
        head = DeviceLinear(d.vocab, d.hidden, weight=embed)
    cos, sin = layers[-1].cos, layers[-1].sin
    return Weights(d, embed, layers, norm(f.final_norm), head, cos, sin, features_of(spec))


MIN_SPAN = 128  # the shortest attention span of a decode step's graph: 4 blocks a head


def attention_span(length: int, max_len: int) -> int:
    """The cache positions a single-token step's attention launch covers when it brings the context to `length`
    tokens: the next power of two, at least MIN_SPAN, at most the cache. The kernel launches a block a head for each
    32 of them and every block is scheduled, even those past the position, which return at once; so a step early in
    a 4096-position cache launched 128 blocks a head where it needs a few. One CUDA graph per span: six for a
    4096-position cache, each captured when a context first reaches it."""
    return min(max_len, max(MIN_SPAN, 1 << (length - 1).bit_length()))


def features_of(spec: Spec) -> Features:
    return Features(spec.activation, spec.query_scale, spec.attn_softcap, spec.logit_softcap, spec.embed_scale)


class TorchOps:
    """The decoder step's operations in plain PyTorch (any device, any float dtype).

    fold_norms: single-token steps fold each RMSNorm into the products beside it: the product before a norm also
    returns gamma * h (`residual_linear`), and the product after it computes rsqrt(mean(h^2) + eps) * (W (gamma * h))
    (`norm_linear` with `prescaled`), the same function up to fp16 rounding (gamma is applied before 1/rms instead
    of after). CudaOps folds the same way where its int4 GEMV can (packed weights, no bias on the product before
    the norm) and here every linear folds. Off: transformers' order exactly.
    """

    def __init__(self, fold_norms: bool = False):
        self.fold_norms = fold_norms

    @staticmethod
    def _rstd(x, eps):
        """rsqrt(mean(x^2) + eps) per row, in fp32."""
        return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)

    def rmsnorm(self, x, w, eps):
        return w * (x.float() * self._rstd(x, eps)).to(x.dtype)

    def linear(self, x, lin: DeviceLinear, residual=None):
        if lin.weight is None:
            raise AwqEdgeError("TorchOps needs dense weights", "load the weights with packed=False")
        y = F.linear(x, lin.weight, lin.bias)
        return y if residual is None else y + residual

    def rope_kv(self, qkv, positions, cos, sin, k_cache, v_cache, n_heads):
        n_kv, _, d = k_cache.shape
        t = qkv.view(qkv.shape[0], n_heads + 2 * n_kv, d)
        pos = positions.long()
        c, s = cos[pos][:, None], sin[pos][:, None]

        def rotate(x):
            x1, x2 = x.float().split(d // 2, dim=-1)
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

        k_cache[:, pos] = rotate(t[:, n_heads:n_heads + n_kv]).transpose(0, 1)
        v_cache[:, pos] = t[:, n_heads + n_kv:].transpose(0, 1)
        return rotate(t[:, :n_heads])

    def attention_decode(self, q, k_cache, v_cache, position, scale, window, softcap=0.0):
        """q [1, H * D] over the live cache rows, masked on the device (no host read: a CUDA graph can hold it);
        rows outside the window or past the position, whatever they hold, weigh nothing."""
        n_kv, max_len, d = k_cache.shape
        j = torch.arange(max_len, device=q.device)
        pos = position[0].long()
        live = (j <= pos) & (j > pos - window) if window else j <= pos
        qg = q.reshape(n_kv, -1, d).float()
        scores = torch.einsum("kgd,ktd->kgt", qg, k_cache.float()) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        p = scores.masked_fill(~live, float("-inf")).softmax(-1)
        v = v_cache.float().masked_fill(~live[None, :, None], 0.0)
        return torch.einsum("kgt,ktd->kgd", p, v).reshape(1, -1).to(q.dtype)

    def decode_attention(self, qkv, position, cos, sin, k_cache, v_cache, n_heads, scale, window, softcap=0.0,
                         q_norm=None, k_norm=None, eps=0.0, span=None):
        """One token: q/k norms (when given), rotary embedding, cache write, attention over positions 0 ..
        position[0]; [1, H * D]. span (the kernel's launch bound, see attention_span) changes nothing here."""
        if q_norm is not None:
            qkv = TorchOps.qk_norm(self, qkv, q_norm, k_norm, n_heads, k_cache.shape[0], eps)
        q = self.rope_kv(qkv, position, cos, sin, k_cache, v_cache, n_heads)
        return TorchOps.attention_decode(self, q, k_cache, v_cache, position, scale, window, softcap)

    def qk_norm(self, qkv, q_norm, k_norm, n_heads, n_kv, eps):
        """RMSNorm over each head of q and k in qkv [M, (H + 2 KV) * D], before the rotary embedding."""
        d = q_norm.shape[0]
        t = qkv.view(qkv.shape[0], n_heads + 2 * n_kv, d)
        q = TorchOps.rmsnorm(self, t[:, :n_heads], q_norm, eps)
        k = TorchOps.rmsnorm(self, t[:, n_heads:n_heads + n_kv], k_norm, eps)
        return torch.cat([q, k, t[:, n_heads + n_kv:]], dim=1).view(qkv.shape)

    def silu_mul(self, gate_up):
        """gate_up's columns alternate between 8 gate and 8 up columns (interleave_gate_up)."""
        m, n = gate_up.shape
        pairs = gate_up.view(m, n // 16, 2, 8)
        return (F.silu(pairs[:, :, 0]) * pairs[:, :, 1]).reshape(m, n // 2)

    def gate_act(self, gate_up, activation: str):
        """act(gate) * up of interleaved gate_up columns, for an activation of awq_edge.arch.spec.ACTIVATIONS."""
        if activation == "silu":
            return self.silu_mul(gate_up)
        m, n = gate_up.shape
        pairs = gate_up.view(m, n // 16, 2, 8)
        gelu = F.gelu(pairs[:, :, 0], approximate="tanh" if activation == "gelu_tanh" else "none")
        return (gelu * pairs[:, :, 1]).reshape(m, n // 2)

    def gate_up_act(self, x, lin: DeviceLinear, activation: str = "silu"):
        return self.gate_act(self.linear(x, lin), activation)

    def residual_norm(self, y, out_norm, h, next_norm, eps):
        """Gemma 2/3's block boundary on the float32 residual stream h (updated in place): h += out_norm *
        rmsnorm(y) (out_norm None: + y; y None: nothing added); returns next_norm * rmsnorm(h) in next_norm's dtype,
        the next product's input. As transformers' Gemma RMSNorm, all in float32."""
        if y is not None:
            h.add_(y.float() if out_norm is None else out_norm.float() * (y.float() * self._rstd(y, eps)))
        return (next_norm.float() * (h * self._rstd(h, eps))).to(next_norm.dtype)

    def linear_residual_norm(self, x, lin: DeviceLinear, out_norm, h, next_norm, eps):
        """residual_norm(linear(x, lin), out_norm, h, next_norm, eps): a Gemma 2/3 block's output product and the
        boundary after it."""
        return self.residual_norm(self.linear(x, lin), out_norm, h, next_norm, eps)

    def residual_linear(self, x, lin: DeviceLinear, residual, next_norm=None):
        """(linear(x) + residual, and next_norm * that as the next norm_linear's `prescaled`, or None)."""
        h = self.linear(x, lin, residual=residual)
        fold = self.fold_norms and next_norm is not None and h.shape[0] == 1
        return h, (next_norm * h if fold else None)

    def norm_linear(self, x, norm_weight, eps, lin: DeviceLinear, gated: bool = False, prescaled=None,
                    activation: str = "silu"):
        """linear(rmsnorm(x)), or its gated activation; from `prescaled` = norm_weight * x when given."""
        if prescaled is None or lin.weight is None:
            y = self.rmsnorm(x, norm_weight, eps)
            return self.gate_up_act(y, lin, activation) if gated else self.linear(y, lin)
        y = F.linear(prescaled.float(), lin.weight.float()) * self._rstd(x, eps)
        if lin.bias is not None:
            y = y + lin.bias.float()
        y = y.to(x.dtype)
        return self.gate_act(y, activation) if gated else y


class Prescaled(NamedTuple):
    """CudaOps' `prescaled`: gamma * h, and the per-16-column sums of h^2 its GEMV wrote (kernels.gemm_norm's
    sumsq_out), from which the next GEMV takes h's mean square without reading h's rows."""
    x: torch.Tensor
    sumsq: torch.Tensor


class CudaOps(TorchOps):
    """The same operations on awq-edge's CUDA kernels; dense (fp16 fallback) linears go through cuBLAS.

    norm_sums (with fold_norms): the GEMV before a folded norm also writes its output's per-tile sums of squares, so
    each block of the GEMV after it reads hidden / 16 floats for the row's mean instead of the whole row of h (the
    blocks of Llama-2-7B's gate/up read 11 MB of L2 for it). Off by default: on the H100 the step with the sums ran
    0.2-1.4% slower than with the rows read (bench/NOTES.md, r18); on for A/B timing.
    """

    def __init__(self, weights: Weights, dense_rows: int = 64, fold_norms: bool = True, norm_sums: bool = False,
                 fold_boundaries: bool = False):
        from awq_edge.runtime import kernels

        super().__init__(fold_norms)
        self.norm_sums = norm_sums
        # Gemma 2/3: each block's output GEMV also runs the block boundary after it (gemm_residual_norm), two
        # launches a layer fewer. Off until timed (bench/decode.py's ours_fold_boundaries, bench/NOTES.md r27).
        self.fold_boundaries = fold_boundaries
        self.k = kernels
        d = weights.dims
        self.workspace = kernels.attention_workspace(d.heads, d.head_dim, weights.max_len, weights.embed.device)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=weights.embed.device) if fold_boundaries else None
        self.dense_rows = dense_rows  # prefill: from this many rows on, dequantise to fp16 and use cuBLAS
        self._scratch = None

    def rmsnorm(self, x, w, eps):
        return self.k.rmsnorm(x, w, eps, torch.empty_like(x))

    def linear(self, x, lin: DeviceLinear, residual=None):
        if lin.packed is None:
            return super().linear(x, lin, residual)
        rows = x.shape[0]
        if rows >= self.dense_rows:
            need = lin.n * lin.k
            if self._scratch is None or self._scratch.numel() < need:
                self._scratch = torch.empty(need, dtype=torch.float16, device=x.device)
            w = self.k.dequantize(lin.packed, self._scratch[:need]).view(lin.n, lin.k)
            y = F.linear(x, w, lin.bias)
        elif rows == 1 and residual is not None and lin.bias is None:
            return self.k.gemm(x, lin.packed, bias=residual.view(-1))  # the residual add as the GEMV's bias
        else:
            y = self.k.gemm(x, lin.packed, bias=lin.bias)
        return y if residual is None else y + residual

    def residual_linear(self, x, lin: DeviceLinear, residual, next_norm=None):
        if (self.fold_norms and next_norm is not None and x.shape[0] == 1 and lin.packed is not None
                and lin.bias is None):  # residual as the GEMV's bias, gamma * h from its epilogue
            if not self.norm_sums:
                return self.k.gemm_norm(x, lin.packed, bias=residual.view(-1), norm_weight=next_norm)
            sumsq = torch.empty(1, self.k.sumsq_parts(lin.n), dtype=torch.float32, device=x.device)
            h, g = self.k.gemm_norm(x, lin.packed, bias=residual.view(-1), norm_weight=next_norm, sumsq_out=sumsq)
            return h, Prescaled(g, sumsq)
        return self.linear(x, lin, residual=residual), None

    def norm_linear(self, x, norm_weight, eps, lin: DeviceLinear, gated: bool = False, prescaled=None,
                    activation: str = "silu"):
        if (prescaled is None or lin.packed is None or x.shape[0] >= self.dense_rows
                or (gated and activation not in self.k.GATES)):
            return super().norm_linear(x, norm_weight, eps, lin, gated, activation=activation)
        prescaled, sumsq = prescaled if isinstance(prescaled, Prescaled) else (prescaled, None)
        return self.k.gemm_norm(prescaled, lin.packed, lin.bias, gated=gated, rms_input=x, eps=eps,
                                activation=activation, rms_sumsq=sumsq)

    def rope_kv(self, qkv, positions, cos, sin, k_cache, v_cache, n_heads):
        q = torch.empty(qkv.shape[0], n_heads, k_cache.shape[2], dtype=qkv.dtype, device=qkv.device)
        return self.k.rope_kv(qkv, positions, cos, sin, q, k_cache, v_cache)

    def decode_attention(self, qkv, position, cos, sin, k_cache, v_cache, n_heads, scale, window, softcap=0.0,
                         q_norm=None, k_norm=None, eps=0.0, span=None):
        out = torch.empty(1, n_heads * k_cache.shape[2], dtype=qkv.dtype, device=qkv.device)
        return self.k.decode_attention(qkv, position, cos, sin, k_cache, v_cache, out, self.workspace, scale, window,
                                       q_norm, k_norm, eps, softcap, span)

    def gate_up_act(self, x, lin: DeviceLinear, activation: str = "silu"):
        if activation in self.k.GATES and lin.packed is not None and x.shape[0] < self.dense_rows:
            return self.k.gemm_gated(x, lin.packed, lin.bias, activation)  # the gate in the GEMM's epilogue
        return self.gate_act(self.linear(x, lin), activation)

    def residual_norm(self, y, out_norm, h, next_norm, eps):
        return self.k.residual_norm(y, out_norm, h, next_norm, eps)

    def linear_residual_norm(self, x, lin: DeviceLinear, out_norm, h, next_norm, eps):
        if self.fold_boundaries and lin.packed is not None and x.shape[0] == 1:
            return self.k.gemm_residual_norm(x, lin.packed, lin.bias, out_norm, h, next_norm, eps, self.ticket)
        return super().linear_residual_norm(x, lin, out_norm, h, next_norm, eps)

    def silu_mul(self, gate_up):
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
        return self.k.silu_mul(gate_up, out)


def sample_on_device(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """awq_edge.runtime.sampling.next_token's choice on the logits' own device: temperature, then the top_k most
    likely (exactly k: ties at the k-th are cut in no set order, where the host keeps them all), then the smallest
    prefix of those whose probability reaches top_p; the chosen id as a 1-element tensor there (nothing of the
    vocabulary travels)."""
    z = logits.reshape(-1).float()
    if s.temperature == 0:
        return z.argmax().view(1)
    z = z / s.temperature
    if not s.top_k and s.top_p >= 1:
        return torch.multinomial(torch.softmax(z, -1), 1, generator=generator)
    vals, idx = (torch.topk(z, min(s.top_k, z.numel())) if s.top_k else torch.sort(z, descending=True))
    probs = torch.softmax(vals, -1)
    if s.top_p < 1:
        probs = probs * ((probs.cumsum(-1) - probs) < s.top_p * probs.sum())  # the prefix that first reaches top_p
    return idx[torch.multinomial(probs, 1, generator=generator)]


def _prefill_attention(q, k_cache, v_cache, past: int, scale: float, window: int, softcap: float = 0.0):
    """q [M, H, D] of positions past .. past + M - 1 against the cache rows 0 .. past + M - 1, causal."""
    m, n_heads, d = q.shape
    n_kv, total = k_cache.shape[0], past + m
    qq = q.transpose(0, 1).unsqueeze(0)
    k, v = k_cache[:, :total].unsqueeze(0), v_cache[:, :total].unsqueeze(0)
    if softcap:  # scaled_dot_product_attention cannot soft-cap the scores
        i = torch.arange(past, total, device=q.device)[:, None]
        j = torch.arange(total, device=q.device)[None]
        visible = (j <= i) & (j > i - window) if window else j <= i
        qg = q.float().view(m, n_kv, n_heads // n_kv, d)
        scores = torch.einsum("mkgd,ktd->kgmt", qg, k_cache[:, :total].float()) * scale
        scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~visible, float("-inf"))
        out = torch.einsum("kgmt,ktd->mkgd", scores.softmax(-1), v_cache[:, :total].float())
        return out.reshape(m, n_heads * d).to(q.dtype)
    if past == 0 and not window:
        mask, causal = None, True
    else:
        i = torch.arange(past, total, device=q.device)[:, None]
        j = torch.arange(total, device=q.device)[None]
        mask, causal = (j <= i) & ((j > i - window) if window else True), False
    out = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=n_kv != n_heads)
    return out[0].transpose(0, 1).reshape(m, n_heads * d)


class CudaDecoder(PrefixCachedDecoder):
    """Batch-1 decoder with a static KV cache; `tokens` are the ids its cache holds.

    forward(ids) returns float32 logits [len(ids), vocab]; greedy_step(token) feeds one token and returns the
    argmax id without copying the logits to the host, greedy_tokens(token, n) runs n such steps queued ahead of
    the host. With use_graphs, single-token steps replay a CUDA graph, one per attention span (attention_span;
    spans=False: one graph whose attention covers the whole cache, for A/B timing).
    """

    def __init__(self, weights: Weights, ops=None, eos_ids=(), use_graphs: bool | None = None, spans: bool = True):
        self.w = weights
        self.spans = spans  # False: every step's attention launch covers the whole cache (one graph)
        device = weights.embed.device
        self.ops = ops if ops is not None else CudaOps(weights)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        d, feats = weights.dims, weights.features
        self.context_length = weights.max_len
        self.scale = feats.query_scale or d.head_dim ** -0.5
        # transformers multiplies by sqrt(hidden) rounded to the activations' dtype
        self.embed_scale = torch.tensor(feats.embed_scale, dtype=weights.embed.dtype, device=device)
        # Gemma 2/3's residual stream outgrows fp16 (Gemma-3-270M's reaches 1.0e5 by layer 14): it is kept in
        # float32 there, the products still read fp16. The Llama block keeps its folded fp16 stream.
        self.sandwich = any(L.attn_out_norm is not None for L in weights.layers)
        self.stream_dtype = torch.float32 if self.sandwich else weights.embed.dtype
        shape = (d.kv_heads, weights.max_len, d.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=weights.embed.dtype, device=device) for _ in weights.layers]
        self.v_cache = [torch.zeros(shape, dtype=weights.embed.dtype, device=device) for _ in weights.layers]
        self.ids = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.int32, device=device)
        self.eos_ids = set(eos_ids)
        self.graphs = {}  # attention span -> (CUDA graph of one step, its (logits, argmax))
        self.span = None  # the attention span of the single-token step being run or captured
        self._host = self._done = None
        self.reset()

    @classmethod
    def from_checkpoint(cls, folder, max_len: int | None = None, use_graphs: bool = True):
        if not torch.cuda.is_available():
            raise AwqEdgeError("no CUDA GPU is visible: the cuda backend runs on an NVIDIA GPU",
                               "run on a machine with a GPU, or export with `awq-edge export` and use the default "
                               "onnxruntime backend")
        weights = load_weights(folder, "cuda", torch.float16, packed=True, max_len=max_len)  # checks config.json
        eos = json.loads((Path(folder) / "config.json").read_text()).get("eos_token_id")
        return cls(weights, eos_ids=[] if eos is None else np.atleast_1d(eos).tolist(), use_graphs=use_graphs)

    def reset(self):
        self.tokens = []  # cache rows past len(tokens) are never read

    def _hidden(self, ids, positions, past):
        """The final norm's output [M, hidden] (the head's input) for ids [M] at positions (int32 [M]); past: host
        count, or None in a single-token step (attention then reads the position from the device)."""
        w, ops, d, feats = self.w, self.ops, self.w.dims, self.w.features
        h = F.embedding(ids, w.embed)
        if feats.embed_scale != 1.0:
            h = h * self.embed_scale
        h = h.to(self.stream_dtype)
        if self.sandwich:  # Gemma 2/3: each block's output is normalised into the float32 stream (residual_norm)
            x = ops.residual_norm(None, None, h, w.layers[0].input_norm, d.eps)
            for i, L in enumerate(w.layers):
                a = self._attend(i, L, ops.linear(x, L.qkv), positions, past)
                x = ops.linear_residual_norm(a, L.o, L.attn_out_norm, h, L.post_norm, d.eps)
                act = ops.gate_up_act(x, L.gate_up, feats.activation)
                nxt = w.layers[i + 1].input_norm if i + 1 < len(w.layers) else w.norm
                x = ops.linear_residual_norm(act, L.down, L.mlp_out_norm, h, nxt, d.eps)
            return x
        g = None  # norm weight * h for the next norm_linear when the ops fold norms (see TorchOps)
        for i, L in enumerate(w.layers):
            qkv = ops.norm_linear(h, L.input_norm, d.eps, L.qkv, prescaled=g)
            a = self._attend(i, L, qkv, positions, past)
            h, g = ops.residual_linear(a, L.o, h, next_norm=L.post_norm)
            act = ops.norm_linear(h, L.post_norm, d.eps, L.gate_up, gated=True, prescaled=g,
                                  activation=feats.activation)
            nxt = w.layers[i + 1].input_norm if i + 1 < len(w.layers) else None
            h, g = ops.residual_linear(act, L.down, h, next_norm=nxt)
        return self._norm(h, w.norm)

    def _attend(self, i, L: Layer, qkv, positions, past):
        """Attention of layer i from its qkv product: q/k norms, rotary embedding, cache write, attention."""
        w, ops, d, feats = self.w, self.ops, self.w.dims, self.w.features
        kc, vc = self.k_cache[i], self.v_cache[i]
        cos, sin = (w.cos, w.sin) if L.cos is None else (L.cos, L.sin)
        window = d.window if L.window is None else L.window
        if past is None:  # one kernel: q/k norms, rotation, cache write, attention
            return ops.decode_attention(qkv, positions, cos, sin, kc, vc, d.heads, self.scale, window,
                                        feats.attn_softcap, L.q_norm, L.k_norm, d.eps, self.span)
        if L.q_norm is not None:
            qkv = ops.qk_norm(qkv, L.q_norm, L.k_norm, d.heads, d.kv_heads, d.eps)
        q = ops.rope_kv(qkv, positions, cos, sin, kc, vc, d.heads)
        return _prefill_attention(q, kc, vc, past, self.scale, window, feats.attn_softcap)

    def _norm(self, h, weight):
        """RMSNorm of the Llama block's residual stream h (the weights' dtype) as the input of a product."""
        return self.ops.rmsnorm(h, weight, self.w.dims.eps)

    def _logits(self, x):
        """fp32 logits of the final norm's output x."""
        logits = self.ops.linear(x, self.w.lm_head).float()
        cap = self.w.features.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def _step(self, advance: bool = False):
        """One token from the static buffers: logits fp32 [1, vocab] and their argmax; with advance, the argmax
        becomes the next input and the position moves on, on the device (greedy steps need no host in between)."""
        logits = self._logits(self._hidden(self.ids, self.pos, None))
        best = logits.argmax(-1)
        if advance:
            self.ids.copy_(best)
            self.pos.add_(1)
        return logits, best

    def _capture(self, span: int):
        """The graph of one step whose attention covers `span` positions, from the buffers as the queued steps
        leave them (it may be captured between two replays of another span's graph)."""
        ids, pos = self.ids.clone(), self.pos.clone()
        self.span = span
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuBLAS handles, workspaces; writes what the replay writes
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step(advance=True)
        finally:
            self.span = None
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.graphs[span] = graph, out
        if self._host is None:
            self._host = torch.zeros(2, dtype=torch.long, pin_memory=True)  # the last two steps' argmax, for the host
            self._done = [torch.cuda.Event(), torch.cuda.Event()]

    def _graph(self, length: int):
        """The graph and outputs of a step that brings the context to `length` tokens (captured on first use)."""
        span = attention_span(length, self.context_length) if self.spans else self.context_length
        if span not in self.graphs:
            self._capture(span)
        return self.graphs[span]

    def _check_room(self, n: int):
        total = len(self.tokens) + n
        if total > self.context_length:
            raise AwqEdgeError(f"{total} tokens exceed the decoder's context of {self.context_length}",
                               "shorten the prompt or lower --max-new-tokens")

    def _arm(self, token: int):
        """Set the step's input buffers to `token` after the cached ones."""
        self.ids.fill_(int(token))
        self.pos.fill_(len(self.tokens))

    def _one(self, token: int):
        self._check_room(1)
        self._arm(token)
        if self.use_graphs:
            graph, out = self._graph(len(self.tokens) + 1)
            graph.replay()
        else:
            self.span = attention_span(len(self.tokens) + 1, self.context_length) if self.spans else None
            try:
                out = self._step()
            finally:
                self.span = None
        self.tokens.append(int(token))
        return out

    @torch.inference_mode()
    def forward(self, ids, last_only: bool = False) -> np.ndarray:
        ids = [int(t) for t in ids]
        if len(ids) == 1:
            return self._one(ids[0])[0].cpu().numpy()
        self._check_room(len(ids))
        past, device = len(self.tokens), self.w.embed.device
        idt = torch.tensor(ids, dtype=torch.long, device=device)
        positions = torch.arange(past, past + len(ids), dtype=torch.int32, device=device)
        h = self._hidden(idt, positions, past)
        logits = self._logits(h[-1:] if last_only else h)
        self.tokens.extend(ids)
        return logits.cpu().numpy()

    @torch.inference_mode()
    def greedy_step(self, token: int) -> int:
        """Feed one token; the most likely next id (only 4 bytes come back to the host)."""
        return int(self._one(token)[1].item())

    def device_generator(self, seed: int) -> torch.Generator:
        """The random source of sample_step, on the decoder's device."""
        return torch.Generator(device=self.w.embed.device).manual_seed(seed)

    @torch.inference_mode()
    def sample_step(self, token: int, sampling: Sampling, generator: torch.Generator) -> int:
        """Feed one token; the next id chosen by `sampling` on the GPU (sample_on_device): only the id comes back to
        the host, not the vocabulary's logits."""
        return int(sample_on_device(self._one(token)[0], sampling, generator).item())

    @torch.inference_mode()
    def greedy_tokens(self, token: int, n: int):
        """Feed `token`, then each argmax in turn: yields the n ids that follow. With graphs, step i + 1 is queued
        before step i's id is read, so the GPU never waits for the host; a step run past the consumer's stop only
        writes a cache row beyond `tokens`, which nothing reads."""
        room = self.context_length - len(self.tokens)
        if not self.use_graphs or n <= 0 or room <= 0:
            for _ in range(n):
                token = self.greedy_step(token)
                yield token
            return
        self._arm(token)
        steps, past = min(n, room), len(self.tokens)

        def launch(i):  # step i brings the context to past + i + 1 tokens
            graph, out = self._graph(past + i + 1)
            graph.replay()
            self._host[i % 2].copy_(out[1][0], non_blocking=True)
            self._done[i % 2].record()

        launch(0)
        fed = int(token)
        for i in range(steps):
            if i + 1 < steps:
                launch(i + 1)  # reads the ids and position step i leaves on the device
            self._done[i % 2].synchronize()
            out = int(self._host[i % 2])
            self.tokens.append(fed)
            fed = out
            yield out
        for _ in range(n - steps):  # past the context: the same error as a single step there
            fed = self.greedy_step(fed)
            yield fed
