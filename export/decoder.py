"""Assemble a decoder with KV cache as one ONNX graph from a quantised checkpoint, as its family's Spec describes."""

from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from awq_edge.export import head as head_quant
from awq_edge.export import ops
from onnx import TensorProto, helper

from awq_edge.arch import Dims, Spec, rope_tables
from awq_edge.checkpoint.reader import Checkpoint
from awq_edge.errors import AwqEdgeError
from awq_edge.quant import FloatLinear, QConfig, fuse_rows, quantize

# IR 10 / opset 21: the oldest pair with blockwise int4 DequantizeLinear; onnxruntime
# 1.20+ and TensorRT 10.x's parser load it.
IR_VERSION = 10
OPSET = 21
TARGETS = ("ort", "trt")
FROM_CHECKPOINT = "checkpoint"  # --head-calib: the statistics the quantiser stored in the checkpoint
AUTO_OUTLIERS = -1  # head_outliers: the default's choice, made once the model's width is known
AUTO_BITS = -1  # head_bits: the GPU default's choice (8 or 4), made once the head's size is known
# The fp16 (GPU) default's head is one MatMulNBits: at batch 1 onnxruntime's CUDA provider spends about as long
# launching a node as reading 20 MB, so the outlier split's four nodes (two Gathers, a second MatMulNBits, an Add;
# three more in a tied embedding) cost more than its bytes save. 8 bits (near-exact) while the 8-bit head's extra
# bytes over a 4-bit one (vocab x hidden / 2) stay within 32 MiB, about what those launches cost; 4 bits above
# (a Llama-3-8B head would read 260 MB more at 8 bits).
GPU_HEAD8_MAX_WEIGHTS = 64 << 20  # vocab x hidden: SmolLM2-135M 28M; Qwen2.5-0.5B 136M, Llama-3.2-1B 263M


@dataclass(frozen=True)
class ExportOptions:
    target: str = "ort"  # "ort": onnxruntime fused ops; "trt": ops TensorRT 10.3 parses
    dtype: str = "fp32"
    trt_native: bool = False  # trt only: int4 DequantizeLinear + MatMul instead of MatMulNBits
    accuracy_level: int = 0  # MatMulNBits: 0 = float compute, 4 = int8 activations (faster on CPU)
    head_bits: int = 0  # ort only: re-quantise the float lm_head (and tied embeddings) to 8 or 4 bits (AUTO_BITS:
    # 8 up to GPU_HEAD8_MAX_WEIGHTS, else 4 with AUTO_OUTLIERS' split)
    head_group: int = 32  # group size for head_bits: one matrix, so finer scales cost little
    head_calib: str = ""  # head_bits: "" rounds to nearest; scales searched on the final norm's statistics: "checkpoint"
    # (measured by the quantiser), or "builtin"/"mixed"/a text file (measured here, the model run in PyTorch)
    head_symmetric: bool = False  # head_bits: no zero points (stored implicitly, smaller)
    head_outliers: int = 0  # head_bits 4 with head_calib: this many input channels (largest E[x^2]) kept at 8 bits;
    # AUTO_OUTLIERS: 64 (or one head group) where the head is calibrated at 4 bits and that leaves half its channels
    rope_in_graph: bool = True  # ort only: RoPE tables computed at session load instead of stored (2 MB for 8k)
    float_logits: bool = False  # ort only: fp16 graphs cast their logits to float32 in the graph (on the GPU)
    # instead of leaving the host to convert them (bench/onnx_gpu.py's ours_float_logits row)


def rope_tables_in_graph(g: ops.Graph, rope, max_positions: int, base: str):
    """The same tables as `rope_tables`, computed by the graph from the frequencies (in float64).

    Every input is a constant, so onnxruntime folds them once when the session
    loads: the tables cost no time per step and no bytes in the file.
    """
    inv_freq, scaling = rope
    limits = [g.scalar(f"{base}.{n}", v, np.float64) for n, v in (("start", 0), ("limit", max_positions),
                                                                   ("delta", 1))]
    positions = g.node("Range", limits, f"{base}/Positions")
    angles = g.node("Mul", [g.node("Unsqueeze", [positions, ops.int64(g, [1])], f"{base}/Column"),
                            g.const(f"{base}.inv_freq", inv_freq.numpy().reshape(1, -1))], f"{base}/Angles")
    tables = []
    for fn in ("Cos", "Sin"):
        t = g.node(fn, [angles], f"{base}/{fn}")
        if scaling != 1.0:
            t = g.node("Mul", [t, g.scalar(f"{base}.scaling", scaling, np.float64)], f"{base}/{fn}Scaled")
        tables.append(g.node("Cast", [t], f"{base}/{fn}Cast", to=g.elem))
    return tables


def project(g: ops.Graph, x: str, name: str, lin, opts: ExportOptions) -> str:
    """x @ W^T + b for one checkpoint linear, in the form the target runs."""
    if isinstance(lin, FloatLinear):
        y = ops.matmul(g, x, name, lin.weight)
    elif opts.trt_native:
        if not bool((lin.zeros == 8).all()):
            raise AwqEdgeError(
                f"{name} has asymmetric zero points; TensorRT's int4 DequantizeLinear takes only symmetric weights",
                "re-quantise with `awq-edge quantize --no-zero-point`, or export without --trt-native",
            )
        y = ops.dequantize_matmul(g, x, name, lin.q, lin.scales, lin.group_size)
    else:  # a symmetric linear (every zero point 8, the op's default) stores none: the kernels' no-zero-point path
        weights = ops.nbits_weights(g, name, lin.q, lin.scales, lin.zeros, lin.group_size,
                                    implicit_zeros=bool((lin.zeros == 8).all()))
        y = ops.matmul_nbits(g, x, name, weights, lin.shape[1], lin.shape[0], lin.group_size, opts.accuracy_level)
    return ops.add_bias(g, y, name, lin.bias)


def qkv(g, ck, spec: Spec, x, i, opts, pack: bool):
    """(packed q|k|v,) in one product when asked and the linears can share a node, else (q, k, v); a
    checkpoint that stores them fused (Phi-3) gives one product either way."""
    p, f = spec.layer(i), spec.family
    lins = ck.linears([f"{p}.{n}" for n in f.qkv])
    fused = fuse_rows(lins) if pack or len(lins) == 1 else None
    if fused is not None:
        return (project(g, x, f"{p}.{f.o.rsplit('.', 1)[0]}.qkv_proj" if len(lins) > 1 else f"{p}.{f.qkv[0]}",
                        fused, opts),)
    return tuple(project(g, x, f"{p}.{n}", lin, opts) for n, lin in zip(f.qkv, lins))


def split_qkv(g, out, spec: Spec, base):
    """q, k, v from the packed product (one name), or as they are."""
    if len(out) == 3:
        return out
    d = spec.dims
    return ops.split(g, out[0], [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], base)


def qk_normed(g, ck, spec: Spec, q, k, i, norm, base):
    """Qwen3/Gemma 3: RMSNorm over each head of q and k (x [B, S, heads * D] -> same shape), before RoPE."""
    d, p = spec.dims, spec.layer(i)
    out = []
    q_norm, k_norm = spec.family.qk_norms
    for x, n, heads, name in ((q, q_norm, d.heads, "q"), (k, k_norm, d.kv_heads, "k")):
        per_head = ops.reshape(g, x, [0, 0, heads, d.head_dim], f"{base}/{name}_norm")
        out.append(ops.reshape(g, norm(per_head, f"{p}.{n}"), [0, 0, heads * d.head_dim], f"{base}/{name}_normed"))
    return out


def attention_ort(g, ck, spec: Spec, x, i, tables, mask_info, norm, opts):
    """Q/K/V (packed into one MatMulNBits when possible) -> GroupQueryAttention -> o_proj."""
    d, base = spec.dims, f"/model/layers.{i}/attn"
    out = qkv(g, ck, spec, x, i, opts, pack=True)
    if spec.family.qk_norms:
        q, k, v = split_qkv(g, out, spec, base)
        out = (*qk_normed(g, ck, spec, q, k, i, norm, base), v)
    cos, sin = tables[spec.rope_kinds[i]]
    att, present_k, present_v = ops.group_query_attention(
        g, out, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *mask_info, cos, sin,
        base, d.heads, d.kv_heads, spec.windows[i] or -1, spec.query_scale, spec.attn_softcap,
    )
    rename_output(g, present_k, f"present.{i}.key")
    rename_output(g, present_v, f"present.{i}.value")
    o = f"{spec.layer(i)}.{spec.family.o}"
    return project(g, att, o, ck.linear(o), opts)


def attention_plain(g, ck, spec: Spec, x, i, tables, masks, norm, opts):
    """Q/K/V -> RoPE -> MatMul/Softmax attention over the concatenated cache -> o_proj."""
    d, base = spec.dims, f"/model/layers.{i}/attn"
    q, k, v = split_qkv(g, qkv(g, ck, spec, x, i, opts, pack=False), spec, base)
    if spec.family.qk_norms:
        q, k = qk_normed(g, ck, spec, q, k, i, norm, base)
    cos, sin = tables[spec.rope_kinds[i]]
    q = ops.rotary(g, ops.reshape(g, q, [0, 0, d.heads, d.head_dim], f"{base}/q"), cos, sin, f"{base}/q", d.head_dim)
    k = ops.rotary(g, ops.reshape(g, k, [0, 0, d.kv_heads, d.head_dim], f"{base}/k"), cos, sin, f"{base}/k", d.head_dim)
    v = ops.reshape(g, v, [0, 0, d.kv_heads, d.head_dim], f"{base}/v")
    att, present_k, present_v = ops.plain_attention(
        g, q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", masks(spec.windows[i]), base,
        d.heads, d.kv_heads, d.head_dim, spec.query_scale, spec.attn_softcap,
    )
    rename_output(g, present_k, f"present.{i}.key")
    rename_output(g, present_v, f"present.{i}.value")
    o = f"{spec.layer(i)}.{spec.family.o}"
    return project(g, att, o, ck.linear(o), opts)


def mlp(g, ck, spec: Spec, x, i, opts):
    """down(act(gate(x)) * up(x)); a fused gate_up (Phi-3) holds the gate rows first."""
    p, f, base = spec.layer(i), spec.family, f"/model/layers.{i}/mlp"
    lins = ck.linears([f"{p}.{n}" for n in f.gate_up])
    outs = [project(g, x, f"{p}.{n}", lin, opts) for n, lin in zip(f.gate_up, lins)]
    if len(outs) == 1:
        half = lins[0].shape[0] // 2
        outs = ops.split(g, outs[0], [half, half], base)
    act = ops.activation(g, outs[0], spec.activation, base, fused=opts.target == "ort")
    gated = g.node("Mul", [act, outs[1]], f"{base}/Gate")
    down = f"{p}.{f.down}"
    return project(g, gated, down, ck.linear(down), opts)


def rename_output(g: ops.Graph, old: str, new: str):
    """Give a node output a graph-output name (for the KV cache and logits)."""
    for node in g.nodes:
        for j, name in enumerate(node.output):
            if name == old:
                node.output[j] = new
        for j, name in enumerate(node.input):
            if name == old:
                node.input[j] = new


@dataclass(frozen=True)
class HeadPart:
    """One MatMulNBits of the rounded head: the input channels it reads (None: all of them, in order)."""

    base: str
    weights: tuple
    group: int
    bits: int
    channels: np.ndarray | None = None


def casts_logits(opts: ExportOptions) -> bool:
    """Whether the graph casts its logits to float32 (float_logits, for an onnxruntime graph that is not fp32)."""
    return opts.float_logits and opts.target == "ort" and opts.dtype != "fp32"


def resolve_head(opts: ExportOptions, vocab: int, hidden: int, tied: bool = False) -> ExportOptions:
    """The options with the defaults' automatic head choices made for this model: AUTO_BITS -> 8 while
    vocab x hidden <= GPU_HEAD8_MAX_WEIGHTS, else 4; AUTO_OUTLIERS -> 64 input channels (at least one head group;
    one group more where a tied 4-bit table with zero points would keep an odd number of groups a row, see
    odd_gather_groups) where the head is calibrated at 4 bits and that is at most half its width, else none."""
    bits, group = opts.head_bits, opts.head_group
    if bits == AUTO_BITS:
        bits = 8 if vocab * hidden <= GPU_HEAD8_MAX_WEIGHTS else 4
    n8 = opts.head_outliers
    if n8 == AUTO_OUTLIERS:
        n8 = max(64, group)
        if odd_gather_groups(replace(opts, head_bits=bits, head_outliers=n8), hidden, tied):
            n8 += group
        n8 = n8 if bits == 4 and opts.head_calib and 2 * n8 <= hidden else 0
    opts = replace(opts, head_bits=bits, head_outliers=n8)
    groups = odd_gather_groups(opts, hidden, tied)
    if groups and opts.dtype == "fp16":
        raise AwqEdgeError(f"a tied 4-bit head with zero points in {groups} groups a row (hidden size {hidden} less "
                           f"{n8} outlier channels, in groups of {group}): onnxruntime's CUDA GatherBlockQuantized "
                           "reads the zero points of an odd number of groups a row wrongly",
                           f"use --head-outliers {n8 + group}, --head-symmetric or --head-bits 8")
    return opts


def odd_gather_groups(opts: ExportOptions, hidden: int, tied: bool) -> int:
    """The number of groups a row of the tied embeddings' 4-bit table (GatherBlockQuantized) holds where it is odd
    and the table has zero points, else 0. The op packs two zero points a byte with each row padded to whole bytes
    (onnxruntime's CPU kernel checks that shape); its CUDA kernel, as its source reads, indexes them as if unpadded,
    so every row after the first takes its neighbours' zero points: SmolLM2's plain 4-bit head (9 groups) read
    perplexity 380 on the CUDA provider, 30.96 on the CPU; in groups of 32 (18) it reads as on the CPU (an H200:
    bench/results/gpu_tests_ort_cuda_h200.txt, tests/test_runtime_ort_cuda.py)."""
    group, n8 = opts.head_group, opts.head_outliers
    if not tied or opts.head_bits != 4 or opts.head_symmetric or not group or hidden % group or n8 % group:
        return 0
    groups = (hidden - n8) // group
    return groups if groups % 2 else 0


def quantized_head(g: ops.Graph, ck: Checkpoint, spec: Spec, opts: ExportOptions) -> list[HeadPart] | None:
    """MatMulNBits weights of the lm_head rounded to opts.head_bits in groups of opts.head_group.

    The float head is the largest tensor a small model reads per token. With
    head_outliers = N, the N input channels of largest E[x^2] (a few carry most
    of the final norm's output) are rounded to 8 bits apart from the others:
    on SmolLM2 that cuts the 4-bit head's perplexity cost by three quarters for 2% more bytes.
    """
    if not opts.head_bits:
        if opts.head_calib or opts.head_symmetric or opts.head_outliers > 0:
            raise AwqEdgeError("--head-calib, --head-symmetric and --head-outliers apply to a rounded head only",
                               "add --head-bits 4 (or 8), or drop them")
        return None
    if opts.target != "ort" or opts.head_bits not in (4, 8):
        raise AwqEdgeError(f"--head-bits {opts.head_bits} with --target {opts.target}",
                           "use --head-bits 8 or 4 with --target ort, or drop it")
    if "lm_head.qweight" in ck:
        raise AwqEdgeError("the checkpoint's lm_head is already 4-bit", "export without --head-bits")
    d = spec.dims
    group, n8 = opts.head_group, opts.head_outliers
    if group not in (16, 32, 64, 128, 256) or d.hidden % group:
        raise AwqEdgeError(f"--head-group {group} is not a power of two in 16..256 dividing hidden size {d.hidden}",
                           "pick --head-group 32 or 64, or export without --head-bits")
    if n8 and (opts.head_bits != 4 or not opts.head_calib):
        raise AwqEdgeError("--head-outliers needs --head-bits 4 and --head-calib (the statistics pick the channels)",
                           "add them, or pass --head-outliers 0")
    if n8 and (n8 % group or not 0 < n8 < d.hidden):
        raise AwqEdgeError(f"--head-outliers {n8} is not a multiple of --head-group {group} below hidden size "
                           f"{d.hidden}", f"use --head-outliers {group} (or a multiple of it), or 0")
    name = "lm_head.weight" if "lm_head.weight" in ck and not d.tied else f"{spec.family.embed}.weight"
    w = ck.float_tensor(name)
    if not opts.head_calib:
        q, scales, zeros = quantize(w, QConfig(opts.head_bits, group, zero_point=not opts.head_symmetric))
        return [HeadPart("lm_head", ops.nbits_weights(g, "lm_head", q, scales, zeros, group, opts.head_bits,
                                                      implicit_zeros=opts.head_symmetric), group, opts.head_bits)]
    moments = ck.head_moments() if opts.head_calib == FROM_CHECKPOINT else None
    if moments is None:
        source = "builtin" if opts.head_calib == FROM_CHECKPOINT else opts.head_calib
        if opts.head_calib == FROM_CHECKPOINT:
            print(f"{ck.folder} holds no head statistics (quantised without calibration, or by another tool): "
                  f"measuring them on {source} text, with the whole model in memory", flush=True)
        moments = head_quant.final_norm_moments(ck.folder, source)
    splits = [("lm_head", None, opts.head_bits)]
    if n8:
        order = torch.argsort(moments, descending=True, stable=True)
        splits = [("lm_head", order[n8:].sort().values, 4), ("lm_head_outliers", order[:n8].sort().values, 8)]
    parts = []
    for base, channels, bits in splits:
        q, scales, zeros = head_quant.quantize_weighted(w, moments, bits, group, opts.head_symmetric,
                                                        channels=channels)
        weights = ops.nbits_weights(g, base, q, scales, zeros, group, bits, implicit_zeros=opts.head_symmetric)
        parts.append(HeadPart(base, weights, group, bits, None if channels is None else channels.numpy()))
    return parts


def embeddings(g: ops.Graph, ck: Checkpoint, spec: Spec, head, opts: ExportOptions) -> str:
    """Token embeddings [B, S, H] (times Gemma's sqrt(hidden), rounded to the activation dtype as transformers
    does); tied to a quantised head, they are gathered from its integer tables (the head's parts concatenated,
    then put back in channel order)."""
    d, table = spec.dims, f"{spec.family.embed}.weight"
    if head is not None and d.tied:
        pieces = [ops.gather_block_quantized(g, "input_ids", f"/model/embed_tokens/{p.base}", p.weights, d.vocab,
                                             p.group, p.bits) for p in head]
        h = pieces[0]
        if len(pieces) > 1:
            joined = g.node("Concat", pieces, "/model/embed_tokens/Concat", axis=-1)
            order = np.argsort(np.concatenate([p.channels for p in head])).astype(np.int64)
            h = g.node("Gather", [joined, g.const("embed_tokens.channel_order", order)],
                       "/model/embed_tokens/ChannelOrder", axis=-1)
    else:
        g.weight(table, ck.float_tensor(table))
        h = g.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")
    if spec.embed_scale != 1.0:
        h = g.node("Mul", [h, ops.scalar(g, spec.embed_scale)], "/model/embed_tokens/Scale")
    return h


def lm_head(g, ck, spec: Spec, x, head, opts):
    """Logits [B, S, V]; a tied float head reuses the embedding table through Gemm(transB); Gemma 2 soft-caps."""
    d = spec.dims
    if head is not None:
        logits = None
        for p in head:
            xp = x if p.channels is None else g.node(
                "Gather", [x, g.const(f"{p.base}.channels", p.channels.astype(np.int64))], f"/{p.base}/Channels",
                axis=-1)
            k = d.hidden if p.channels is None else len(p.channels)
            out = ops.matmul_nbits(g, xp, p.base, p.weights, k, d.vocab, p.group, opts.accuracy_level, p.bits)
            logits = out if logits is None else g.node("Add", [logits, out], f"/{p.base}/Add")
    elif "lm_head.qweight" in ck or ("lm_head.weight" in ck and not d.tied):
        logits = project(g, x, "lm_head", ck.linear("lm_head"), opts)
    else:
        flat = ops.reshape(g, x, [-1, d.hidden], "/lm_head/flat")
        logits = g.node("Gemm", [flat, f"{spec.family.embed}.weight"], "/lm_head/Gemm", transB=1)
        shape = g.node("Concat", [g.node("Shape", ["input_ids"], "/lm_head/Shape"), ops.int64(g, [d.vocab])],
                       "/lm_head/OutShape", axis=0)
        logits = g.node("Reshape", [logits, shape], "/lm_head/Reshape")
    if spec.logit_softcap:
        logits = ops.softcap(g, logits, spec.logit_softcap, "/lm_head")
    return logits


def io_spec(g: ops.Graph, d: Dims, opts: ExportOptions):
    """Graph inputs and outputs with the names onnxruntime-genai expects."""
    kv_in = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
    kv_out = ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim]
    g.inputs = [
        ops.value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        ops.value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    if opts.target == "trt":
        g.inputs.append(ops.value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    logits_type = TensorProto.FLOAT if casts_logits(opts) else g.elem
    g.outputs = [ops.value_info("logits", logits_type, ["batch_size", "sequence_length", d.vocab])]
    for i in range(d.layers):
        for kind in ("key", "value"):
            g.inputs.append(ops.value_info(f"past_key_values.{i}.{kind}", g.elem, kv_in))
            g.outputs.append(ops.value_info(f"present.{i}.{kind}", g.elem, kv_out))


def ort_blocks(g: ops.Graph, ck: Checkpoint, spec: Spec, opts: ExportOptions):
    """(attention, norm, skip-norm) builders with onnxruntime's fused ops; GQA reads lengths off the mask."""
    d, tables = spec.dims, {}
    for kind, rope in spec.ropes.items():
        if opts.rope_in_graph:
            tables[kind] = rope_tables_in_graph(g, rope, d.max_positions, f"/model/rope/{kind}")
        else:
            cos, sin = rope_tables(rope, d.max_positions)
            tables[kind] = g.weight(f"cos_cache_{kind}", cos), g.weight(f"sin_cache_{kind}", sin)
    base = "/model/attn_mask"
    seqlens = g.node("Sub", [g.node("ReduceSum", ["attention_mask", ops.int64(g, [1])], f"{base}/ReduceSum",
                                    keepdims=0), ops.int64(g, 1)], f"{base}/Sub")
    seqlens = g.node("Cast", [seqlens], f"{base}/SeqlensK", to=TensorProto.INT32)
    total = g.node("Gather", [g.node("Shape", ["attention_mask"], f"{base}/Shape"), ops.int64(g, 1)],
                   f"{base}/Gather", axis=0)
    total = g.node("Cast", [total], f"{base}/TotalSeqLen", to=TensorProto.INT32)

    def norm(x, name):
        return ops.simplified_layer_norm(g, x, name, ck.norm(name), d.eps)

    def attend(x, i):
        return attention_ort(g, ck, spec, x, i, tables, (seqlens, total), norm, opts)

    def skip_norm(x, skip, name):
        return ops.skip_simplified_layer_norm(g, x, skip, name, ck.norm(name), d.eps)

    return attend, norm, skip_norm


def trt_blocks(g: ops.Graph, ck: Checkpoint, spec: Spec, opts: ExportOptions):
    """(attention, norm, skip-norm) builders from basic ops; RoPE by position_ids, one causal mask per window."""
    d, tables = spec.dims, {}
    for kind, rope in spec.ropes.items():
        cos, sin = rope_tables(rope, d.max_positions)
        full = [g.weight(f"{n}_table_{kind}", torch.cat([t, t], dim=-1)) for n, t in (("cos", cos), ("sin", sin))]
        tables[kind] = tuple(
            g.node("Unsqueeze", [g.node("Gather", [t, "position_ids"], f"/model/rope/{kind}/{n}"), ops.int64(g, [2])],
                   f"/model/rope/{kind}/{n}4d")
            for t, n in zip(full, ("cos", "sin"))
        )
    seq_len = g.node("Gather", [g.node("Shape", ["input_ids"], "/model/mask/InShape"), ops.int64(g, 1)],
                     "/model/mask/S", axis=0)
    masks = {}

    def mask(window):
        if window not in masks:
            masks[window] = ops.causal_mask(g, "attention_mask", seq_len, window)
        return masks[window]

    def norm(x, name):
        return ops.rms_norm(g, x, name, ck.norm(name), d.eps)

    def attend(x, i):
        return attention_plain(g, ck, spec, x, i, tables, mask, norm, opts)

    def skip_norm(x, skip, name):
        summed = g.node("Add", [x, skip], f"/{name}/Residual")
        return norm(summed, name), summed

    return attend, norm, skip_norm


def float32_residual_blocks(g: ops.Graph, ck: Checkpoint, d: Dims):
    """(block-output norm, skip-norm) builders for an fp16 graph whose residual stream stays float32: Gemma 2/3's
    outgrows fp16 (Gemma-3-270M's reaches 1.0e5). The products still read the graph's dtype."""

    def out_norm(x, name):
        return ops.rms_norm(g, x, name, ck.norm(name), d.eps, float_out=True)

    def skip_norm(x, skip, name):
        summed = g.node("Add", [x, skip], f"/{name}/Residual")
        return ops.rms_norm(g, summed, name, ck.norm(name), d.eps), summed

    return out_norm, skip_norm


def build_decoder(ck: Checkpoint, opts: ExportOptions, external=None) -> onnx.ModelProto:
    """The whole decoder: embeddings, layers with KV cache, final norm, lm_head; its large initializers written to
    `external` (export.folder.ExternalData) as they are made, or kept in the proto without one."""
    if opts.target not in TARGETS:
        raise AwqEdgeError(f"unknown target {opts.target!r}", f"use --target {' or '.join(TARGETS)}")
    if opts.trt_native and opts.target != "trt":
        raise AwqEdgeError("--trt-native applies to --target trt only", "add --target trt or drop --trt-native")
    spec, f = ck.spec, ck.spec.family
    d = spec.dims
    opts = resolve_head(opts, d.vocab, d.hidden, d.tied)
    g = ops.Graph(opts.dtype, external)
    io_spec(g, d, opts)
    head = quantized_head(g, ck, spec, opts)
    h = embeddings(g, ck, spec, head, opts)

    attend, norm, skip_norm = (ort_blocks if opts.target == "ort" else trt_blocks)(g, ck, spec, opts)
    residual, out_norm = h, norm
    if f.attn_out_norm and g.elem != TensorProto.FLOAT:
        residual = g.node("Cast", [h], "/model/embed_tokens/CastFloat", to=TensorProto.FLOAT)
        out_norm, skip_norm = float32_residual_blocks(g, ck, d)
    x = norm(h, f"{spec.layer(0)}.{f.attn_norm}")
    for i in range(d.layers):
        p = spec.layer(i)
        a = attend(x, i)
        if f.attn_out_norm:
            a = out_norm(a, f"{p}.{f.attn_out_norm}")
        x, residual = skip_norm(a, residual, f"{p}.{f.mlp_norm}")
        m = mlp(g, ck, spec, x, i, opts)
        if f.mlp_out_norm:
            m = out_norm(m, f"{p}.{f.mlp_out_norm}")
        nxt = f"{spec.layer(i + 1)}.{f.attn_norm}" if i + 1 < d.layers else f.final_norm
        x, residual = skip_norm(m, residual, nxt)
    logits = lm_head(g, ck, spec, x, head, opts)
    if casts_logits(opts):
        logits = g.node("Cast", [logits], "/lm_head/CastFloat", to=TensorProto.FLOAT)
    rename_output(g, logits, "logits")

    graph = helper.make_graph(g.nodes, "awq_edge_decoder", g.inputs, g.outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(ops.MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="awq-edge")
