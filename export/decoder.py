"""Assemble a Llama-family decoder with KV cache as one ONNX graph from a quantised checkpoint."""

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from awq_edge.errors import AwqEdgeError
from awq_edge.quant import QConfig, quantize
from awq_edge.export import head as head_quant
from awq_edge.export import ops
from awq_edge.export.source import Checkpoint, FloatLinear, QuantLinear

# IR 10 / opset 21: the oldest pair with blockwise int4 DequantizeLinear; onnxruntime
# 1.20+ and TensorRT 10.x's parser load it.
IR_VERSION = 10
OPSET = 21
TARGETS = ("ort", "trt")
# Rope types whose frequencies do not depend on the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ExportOptions:
    target: str = "ort"  # "ort": onnxruntime fused ops; "trt": ops TensorRT 10.3 parses
    dtype: str = "fp32"
    trt_native: bool = False  # trt only: int4 DequantizeLinear + MatMul instead of MatMulNBits
    accuracy_level: int = 0  # MatMulNBits: 0 = float compute, 4 = int8 activations (faster on CPU)
    head_bits: int = 0  # ort only: re-quantise the float lm_head (and tied embeddings) to 8 or 4 bits
    head_group: int = 32  # group size for head_bits: one matrix, so finer scales cost little
    head_calib: str = ""  # head_bits: "" rounds to nearest; "builtin" or a text file: scales searched on its activations
    head_symmetric: bool = False  # head_bits: no zero points (stored implicitly, smaller)
    rope_in_graph: bool = True  # ort only: RoPE tables computed at session load instead of stored (2 MB for 8k)


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
    window: int  # sliding-window length, 0 for full attention
    tied: bool


def dims_of(config: dict) -> Dims:
    heads = config["num_attention_heads"]
    use_window = config.get("use_sliding_window", config["model_type"] == "mistral")
    window = config.get("sliding_window") if use_window else None
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


def rope_tables(config: dict, d: Dims):
    """cos, sin [max_positions, head_dim / 2] in float32, with any attention scaling folded in."""
    inv_freq, scaling = rope_frequencies(config, d)
    angles = torch.outer(torch.arange(d.max_positions, dtype=torch.float64), inv_freq)
    return (angles.cos() * scaling).float(), (angles.sin() * scaling).float()


def rope_tables_in_graph(g: ops.Graph, config: dict, d: Dims):
    """The same tables as `rope_tables`, computed by the graph from the frequencies (in float64).

    Every input is a constant, so onnxruntime folds them once when the session
    loads: the tables cost no time per step and no bytes in the file.
    """
    inv_freq, scaling = rope_frequencies(config, d)
    base = "/model/rope"
    limits = [g.scalar(f"{base}.{n}", v, np.float64) for n, v in (("start", 0), ("limit", d.max_positions),
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


def rope_frequencies(config: dict, d: Dims):
    """RoPE inverse frequencies [head_dim / 2] (float64) and the attention scaling of the rope type."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE:
        raise AwqEdgeError(
            f"rope type {rope_type!r} changes with sequence length and is not exported",
            f"use a model with rope type {', '.join(STATIC_ROPE)}",
        )
    theta = float(params["rope_theta"])
    inv_freq = 1.0 / theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float64) / d.head_dim)
    scaling = 1.0
    if rope_type != "default":
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
        inv_freq = inv_freq.double()
    return inv_freq, float(scaling)


def fuse_rows(linears):
    """One linear computing several at once (outputs concatenated), or None when they cannot share a node."""
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
    else:
        weights = ops.nbits_weights(g, name, lin.q, lin.scales, lin.zeros, lin.group_size)
        y = ops.matmul_nbits(g, x, name, weights, lin.shape[1], lin.shape[0], lin.group_size, opts.accuracy_level)
    return ops.add_bias(g, y, name, lin.bias)


def attention_ort(g, ck, d, x, i, cos, sin, mask_info, opts):
    """Q/K/V (packed into one MatMulNBits when possible) -> GroupQueryAttention -> o_proj."""
    p = f"model.layers.{i}.self_attn"
    lins = [ck.linear(f"{p}.{n}_proj") for n in "qkv"]
    fused = fuse_rows(lins)
    if fused is not None:
        qkv = (project(g, x, f"{p}.qkv_proj", fused, opts),)
    else:
        qkv = tuple(project(g, x, f"{p}.{n}_proj", lin, opts) for n, lin in zip("qkv", lins))
    out, present_k, present_v = ops.group_query_attention(
        g, qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *mask_info, cos, sin,
        f"/model/layers.{i}/attn", d.heads, d.kv_heads, d.window if d.window else -1,
    )
    rename_output(g, present_k, f"present.{i}.key")
    rename_output(g, present_v, f"present.{i}.value")
    return project(g, out, f"{p}.o_proj", ck.linear(f"{p}.o_proj"), opts)


def attention_plain(g, ck, d, x, i, cos, sin, mask, opts):
    """Q/K/V -> RoPE -> MatMul/Softmax attention over the concatenated cache -> o_proj."""
    p, base = f"model.layers.{i}.self_attn", f"/model/layers.{i}/attn"
    q, k, v = (project(g, x, f"{p}.{n}_proj", ck.linear(f"{p}.{n}_proj"), opts) for n in "qkv")
    q = ops.rotary(g, ops.reshape(g, q, [0, 0, d.heads, d.head_dim], f"{base}/q"), cos, sin, f"{base}/q", d.head_dim)
    k = ops.rotary(g, ops.reshape(g, k, [0, 0, d.kv_heads, d.head_dim], f"{base}/k"), cos, sin, f"{base}/k", d.head_dim)
    v = ops.reshape(g, v, [0, 0, d.kv_heads, d.head_dim], f"{base}/v")
    out, present_k, present_v = ops.plain_attention(
        g, q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", mask, base,
        d.heads, d.kv_heads, d.head_dim,
    )
    rename_output(g, present_k, f"present.{i}.key")
    rename_output(g, present_v, f"present.{i}.value")
    return project(g, out, f"{p}.o_proj", ck.linear(f"{p}.o_proj"), opts)


def mlp(g, ck, x, i, opts):
    """down(SiLU(gate(x)) * up(x))."""
    p = f"model.layers.{i}.mlp"
    gate = project(g, x, f"{p}.gate_proj", ck.linear(f"{p}.gate_proj"), opts)
    up = project(g, x, f"{p}.up_proj", ck.linear(f"{p}.up_proj"), opts)
    return project(g, ops.silu_mul(g, gate, up, f"/model/layers.{i}/mlp"), f"{p}.down_proj", ck.linear(f"{p}.down_proj"), opts)


def rename_output(g: ops.Graph, old: str, new: str):
    """Give a node output a graph-output name (for the KV cache and logits)."""
    for node in g.nodes:
        for j, name in enumerate(node.output):
            if name == old:
                node.output[j] = new
        for j, name in enumerate(node.input):
            if name == old:
                node.input[j] = new


def quantized_head(g: ops.Graph, ck: Checkpoint, d: Dims, opts: ExportOptions):
    """MatMulNBits weights of the lm_head rounded to opts.head_bits (RTN, zero points, opts.head_group).

    The float head is the largest tensor a small model reads per token; this
    is the one place the export changes the checkpoint's numbers, so it is opt-in.
    """
    if not opts.head_bits:
        if opts.head_calib or opts.head_symmetric:
            raise AwqEdgeError("--head-calib and --head-symmetric apply to a rounded head only",
                               "add --head-bits 4 (or 8), or drop them")
        return None
    if opts.target != "ort" or opts.head_bits not in (4, 8):
        raise AwqEdgeError(f"--head-bits {opts.head_bits} with --target {opts.target}",
                           "use --head-bits 8 or 4 with --target ort, or drop it")
    if "lm_head.qweight" in ck:
        raise AwqEdgeError("the checkpoint's lm_head is already 4-bit", "export without --head-bits")
    group = opts.head_group
    if group not in (16, 32, 64, 128, 256) or d.hidden % group:
        raise AwqEdgeError(f"--head-group {group} is not a power of two in 16..256 dividing hidden size {d.hidden}",
                           "pick --head-group 32 or 64, or export without --head-bits")
    name = "lm_head.weight" if "lm_head.weight" in ck and not d.tied else "model.embed_tokens.weight"
    w = ck.float_tensor(name)
    if opts.head_calib:
        moments = head_quant.final_norm_moments(ck.folder, opts.head_calib)
        q, scales, zeros = head_quant.quantize_weighted(w, moments, opts.head_bits, group, opts.head_symmetric)
    else:
        q, scales, zeros = quantize(w, QConfig(opts.head_bits, group, zero_point=not opts.head_symmetric))
    weights = ops.nbits_weights(g, "lm_head", q, scales, zeros, group, opts.head_bits,
                                implicit_zeros=opts.head_symmetric)
    return weights, group


def embeddings(g: ops.Graph, ck: Checkpoint, d: Dims, head, opts: ExportOptions) -> str:
    """Token embeddings [B, S, H]; tied to a quantised head, they are gathered from its integer table."""
    if head is not None and d.tied:
        weights, group = head
        return ops.gather_block_quantized(g, "input_ids", "/model/embed_tokens", weights, d.vocab, group,
                                          opts.head_bits)
    g.weight("model.embed_tokens.weight", ck.float_tensor("model.embed_tokens.weight"))
    return g.node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")


def lm_head(g, ck, d, x, head, opts):
    """Logits [B, S, V]; a tied float head reuses the embedding table through Gemm(transB)."""
    if head is not None:
        weights, group = head
        return ops.matmul_nbits(g, x, "lm_head", weights, d.hidden, d.vocab, group, opts.accuracy_level,
                                opts.head_bits)
    if "lm_head.qweight" in ck or ("lm_head.weight" in ck and not d.tied):
        return project(g, x, "lm_head", ck.linear("lm_head"), opts)
    flat = ops.reshape(g, x, [-1, d.hidden], "/lm_head/flat")
    logits = g.node("Gemm", [flat, "model.embed_tokens.weight"], "/lm_head/Gemm", transB=1)
    shape = g.node("Concat", [g.node("Shape", ["input_ids"], "/lm_head/Shape"), ops.int64(g, [d.vocab])],
                   "/lm_head/OutShape", axis=0)
    return g.node("Reshape", [logits, shape], "/lm_head/Reshape")


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
    g.outputs = [ops.value_info("logits", g.elem, ["batch_size", "sequence_length", d.vocab])]
    for i in range(d.layers):
        for kind in ("key", "value"):
            g.inputs.append(ops.value_info(f"past_key_values.{i}.{kind}", g.elem, kv_in))
            g.outputs.append(ops.value_info(f"present.{i}.{kind}", g.elem, kv_out))


def ort_blocks(g: ops.Graph, ck: Checkpoint, d: Dims, opts: ExportOptions):
    """(attention, norm, skip-norm) builders with onnxruntime's fused ops; GQA reads lengths off the mask."""
    if opts.rope_in_graph:
        cos_c, sin_c = rope_tables_in_graph(g, ck.config, d)
    else:
        cos, sin = rope_tables(ck.config, d)
        cos_c, sin_c = g.weight("cos_cache", cos), g.weight("sin_cache", sin)
    base = "/model/attn_mask"
    seqlens = g.node("Sub", [g.node("ReduceSum", ["attention_mask", ops.int64(g, [1])], f"{base}/ReduceSum",
                                    keepdims=0), ops.int64(g, 1)], f"{base}/Sub")
    seqlens = g.node("Cast", [seqlens], f"{base}/SeqlensK", to=TensorProto.INT32)
    total = g.node("Gather", [g.node("Shape", ["attention_mask"], f"{base}/Shape"), ops.int64(g, 1)],
                   f"{base}/Gather", axis=0)
    total = g.node("Cast", [total], f"{base}/TotalSeqLen", to=TensorProto.INT32)

    def attend(x, i):
        return attention_ort(g, ck, d, x, i, cos_c, sin_c, (seqlens, total), opts)

    def norm(x, name):
        return ops.simplified_layer_norm(g, x, name, ck.float_tensor(f"{name}.weight"), d.eps)

    def skip_norm(x, skip, name):
        return ops.skip_simplified_layer_norm(g, x, skip, name, ck.float_tensor(f"{name}.weight"), d.eps)

    return attend, norm, skip_norm


def trt_blocks(g: ops.Graph, ck: Checkpoint, d: Dims, opts: ExportOptions):
    """(attention, norm, skip-norm) builders from basic ops; RoPE by position_ids, one shared causal mask."""
    cos, sin = rope_tables(ck.config, d)
    tables = [g.weight(n, torch.cat([t, t], dim=-1)) for n, t in (("cos_table", cos), ("sin_table", sin))]
    cos_p, sin_p = (
        g.node("Unsqueeze", [g.node("Gather", [t, "position_ids"], f"/model/rope/{n}"), ops.int64(g, [2])],
               f"/model/rope/{n}4d")
        for t, n in zip(tables, ("cos", "sin"))
    )
    seq_len = g.node("Gather", [g.node("Shape", ["input_ids"], "/model/mask/InShape"), ops.int64(g, 1)],
                     "/model/mask/S", axis=0)
    mask = ops.causal_mask(g, "attention_mask", seq_len, d.window)

    def attend(x, i):
        return attention_plain(g, ck, d, x, i, cos_p, sin_p, mask, opts)

    def norm(x, name):
        return ops.rms_norm(g, x, name, ck.float_tensor(f"{name}.weight"), d.eps)

    def skip_norm(x, skip, name):
        summed = g.node("Add", [x, skip], f"/{name}/Residual")
        return norm(summed, name), summed

    return attend, norm, skip_norm


def build_decoder(ck: Checkpoint, opts: ExportOptions) -> onnx.ModelProto:
    """The whole decoder: embeddings, layers with KV cache, final norm, lm_head."""
    if opts.target not in TARGETS:
        raise AwqEdgeError(f"unknown target {opts.target!r}", f"use --target {' or '.join(TARGETS)}")
    if opts.trt_native and opts.target != "trt":
        raise AwqEdgeError("--trt-native applies to --target trt only", "add --target trt or drop --trt-native")
    d = dims_of(ck.config)
    if d.heads % d.kv_heads:
        raise AwqEdgeError(f"{d.heads} heads do not divide into {d.kv_heads} KV heads", "check config.json")
    g = ops.Graph(opts.dtype)
    io_spec(g, d, opts)
    head = quantized_head(g, ck, d, opts)
    h = embeddings(g, ck, d, head, opts)

    attend, norm, skip_norm = (ort_blocks if opts.target == "ort" else trt_blocks)(g, ck, d, opts)
    residual = h
    x = norm(h, "model.layers.0.input_layernorm")
    for i in range(d.layers):
        a = attend(x, i)
        x, residual = skip_norm(a, residual, f"model.layers.{i}.post_attention_layernorm")
        m = mlp(g, ck, x, i, opts)
        nxt = f"model.layers.{i + 1}.input_layernorm" if i + 1 < d.layers else "model.norm"
        x, residual = skip_norm(m, residual, nxt)
    rename_output(g, lm_head(g, ck, d, x, head, opts), "logits")

    graph = helper.make_graph(g.nodes, "awq_edge_decoder", g.inputs, g.outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(ops.MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="awq-edge")
