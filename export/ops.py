"""ONNX node builders, one small function per op the decoder uses; each returns its output name."""

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from awq_edge.packing import to_matmul_nbits

MS = "com.microsoft"
DTYPES = {"fp32": (TensorProto.FLOAT, np.float32, torch.float32), "fp16": (TensorProto.FLOAT16, np.float16, torch.float16)}


class Graph:
    """Nodes and initializers under construction, with unique names; large initializers go straight to `external`
    (export.folder.ExternalData) when one is given."""

    def __init__(self, dtype: str, external=None):
        self.elem, self.np_dtype, self.torch_dtype = DTYPES[dtype]
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.external = external
        self._count = {}

    def _initializer(self, name: str, elem: int, dims, data) -> None:
        """One initializer from raw little-endian bytes (bytes or a uint8 array), inline or to the external file."""
        if self.external is not None and len(data) >= self.external.INLINE_BYTES:
            tensor = TensorProto(name=name, data_type=elem, dims=list(dims))
            self.initializers.append(self.external.store(tensor, data))
        else:
            self.initializers.append(helper.make_tensor(name, elem, list(dims), bytes(data), raw=True))

    def name(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def node(self, op: str, inputs, base: str, domain: str = "", **attrs) -> str:
        name = self.name(base)
        self.nodes.append(helper.make_node(op, list(inputs), [f"{name}/out0"], name=name, domain=domain or None,
                                           **attrs))
        return f"{name}/out0"

    def const(self, base: str, array) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        name = self.name(base)
        self._initializer(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape,
                          array.reshape(-1).view(np.uint8))
        return name

    def weight(self, base: str, tensor: torch.Tensor) -> str:
        """A float initializer in the graph's activation dtype."""
        return self.const(base, tensor.to(self.torch_dtype))

    def scalar(self, base: str, value, dtype) -> str:
        """A 0-d initializer (const() would store a scalar with shape [1])."""
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def raw(self, base: str, elem: int, dims, data: bytes) -> str:
        name = self.name(base)
        self._initializer(name, elem, dims, data)
        return name

    def shared(self, key: str, array: np.ndarray) -> str:
        """A small constant stored once under `key`, however many nodes read it."""
        if key not in self._count:
            self.const(key, array)
        return key


def int64(g: Graph, values) -> str:
    """An int64 constant (a scalar for a plain int, a 1-D tensor for a list)."""
    kind = "s" if np.ndim(values) == 0 else "v"
    return g.shared(f"const/i64/{kind}/" + "_".join(str(v) for v in np.atleast_1d(values)),
                    np.array(values, dtype=np.int64))


def scalar(g: Graph, value: float) -> str:
    """A float constant of the activation dtype."""
    return g.shared(f"const/{g.np_dtype.__name__}/{value!r}", np.array(value, dtype=g.np_dtype))


def nbits_weights(g: Graph, base: str, q, scales, zeros, block_size: int, bits: int = 4,
                  implicit_zeros: bool = False):
    """MatMulNBits' B, scales and zero-point initializers for W [N, K] = q (same integers, no re-rounding).

    implicit_zeros: every zero point is 2^(bits-1), the ops' default, so none is stored (B and scales only).
    """
    t = to_matmul_nbits(q, scales, zeros, block_size, bits=bits)
    b, s = g.const(f"{base}.qweight", t["B"]), g.weight(f"{base}.scales", t["scales"])
    if implicit_zeros:
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise ValueError(f"{base}: implicit zero points need every zero point to be {2 ** (bits - 1)}")
        return b, s
    return b, s, g.const(f"{base}.qzeros", t["zero_points"])


def matmul_nbits(g: Graph, x: str, base: str, weights, k: int, n: int, block_size: int, accuracy_level: int,
                 bits: int = 4) -> str:
    """com.microsoft MatMulNBits: x [..., K] @ W^T for W [N, K] given as `nbits_weights`."""
    return g.node(
        "MatMulNBits", [x, *weights], f"{base}/MatMulNBits", domain=MS,
        K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level,
    )


def gather_block_quantized(g: Graph, ids: str, base: str, weights, rows: int, block_size: int, bits: int) -> str:
    """Embedding lookup straight from MatMulNBits weights [V, H] (tied embeddings share the lm_head's)."""
    b, *quant = (reshape(g, w, [rows, -1], f"{base}/{i}") for i, w in enumerate(weights))
    return g.node("GatherBlockQuantized", [b, ids, *quant], f"{base}/GatherBlockQuantized", domain=MS,
                  gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)


def dequantize_matmul(g: Graph, x: str, base: str, q, scales, block_size: int) -> str:
    """Opset-21 blockwise int4 DequantizeLinear + MatMul; symmetric weights only (zero point 8)."""
    n, k = q.shape
    signed = (q.to(torch.int16) - 8).t().contiguous().numpy().astype(np.int8)  # [K, N]
    nibbles = (signed & 0xF).astype(np.uint8).reshape(-1)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    w_int4 = g.raw(f"{base}.qweight", TensorProto.INT4, [k, n], packed)
    scale = g.weight(f"{base}.scales", scales.t().contiguous())  # [n_blocks, N], blocked along K
    w = g.node("DequantizeLinear", [w_int4, scale], f"{base}/DequantizeLinear", axis=0, block_size=block_size)
    return g.node("MatMul", [x, w], f"{base}/MatMul")


def matmul(g: Graph, x: str, base: str, weight: torch.Tensor) -> str:
    """x @ W^T for a float W [N, K], stored transposed so MatMul reads it directly."""
    return g.node("MatMul", [x, g.weight(f"{base}.weight_t", weight.t().contiguous())], f"{base}/MatMul")


def add_bias(g: Graph, x: str, base: str, bias) -> str:
    if bias is None:
        return x
    return g.node("Add", [x, g.weight(f"{base}.bias", bias)], f"{base}/Add")


def simplified_layer_norm(g: Graph, x: str, base: str, weight, eps: float) -> str:
    """onnxruntime's fused RMSNorm: x / sqrt(mean(x^2) + eps) * w."""
    return g.node(
        "SimplifiedLayerNormalization", [x, g.weight(f"{base}.weight", weight)], f"{base}/SimplifiedLayerNorm",
        axis=-1, epsilon=eps, stash_type=1,
    )


def skip_simplified_layer_norm(g: Graph, x: str, skip: str, base: str, weight, eps: float):
    """RMSNorm of x + skip, fused; returns (normed, x + skip) so the sum carries the residual stream."""
    name = g.name(f"{base}/SkipSimplifiedLayerNorm")
    normed, summed = f"{name}/out0", f"{name}/out3"
    g.nodes.append(helper.make_node(
        "SkipSimplifiedLayerNormalization", [x, skip, g.weight(f"{base}.weight", weight)],
        [normed, "", "", summed], name=name, domain=MS, epsilon=eps,
    ))
    return normed, summed


def rms_norm(g: Graph, x: str, base: str, weight, eps: float, float_out: bool = False) -> str:
    """RMSNorm from basic ops (for parsers without the fused op), with the mean of squares in fp32; x may be of
    the graph's dtype or float32. float_out: the output (and the weight) stay float32."""
    xf = g.node("Cast", [x], f"{base}/Cast", to=TensorProto.FLOAT) if g.elem != TensorProto.FLOAT else x
    sq = g.node("Mul", [xf, xf], f"{base}/Square")
    mean = g.node("ReduceMean", [sq, int64(g, [-1])], f"{base}/ReduceMean", keepdims=1)
    eps_c = g.const(f"{base}.eps", np.array(eps, dtype=np.float32))
    inv = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [mean, eps_c], f"{base}/AddEps")], f"{base}/Sqrt")], f"{base}/Reciprocal")
    y = g.node("Mul", [xf, inv], f"{base}/Normalize")
    if float_out:
        return g.node("Mul", [y, g.const(f"{base}.weight", weight.float())], f"{base}/Scale")
    if g.elem != TensorProto.FLOAT:
        y = g.node("Cast", [y], f"{base}/CastBack", to=g.elem)
    return g.node("Mul", [y, g.weight(f"{base}.weight", weight)], f"{base}/Scale")


def activation(g: Graph, x: str, kind: str, base: str, fused: bool) -> str:
    """The MLP's gate activation: "silu", "gelu_tanh" or "gelu"; fused: opset-20 Gelu, else basic ops
    (TensorRT 10.3's parser lacks Gelu)."""
    if kind == "silu":
        return g.node("Mul", [x, g.node("Sigmoid", [x], f"{base}/Sigmoid")], f"{base}/SiLU")
    if fused:
        return g.node("Gelu", [x], f"{base}/Gelu", approximate="tanh" if kind == "gelu_tanh" else "none")
    if kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = g.node("Mul", [g.node("Mul", [x, x], f"{base}/Square"), x], f"{base}/Cube")
        inner = g.node("Add", [x, g.node("Mul", [cube, scalar(g, 0.044715)], f"{base}/CubeScaled")], f"{base}/Inner")
        t = g.node("Tanh", [g.node("Mul", [inner, scalar(g, float(np.sqrt(2 / np.pi)))], f"{base}/TanhIn")],
                   f"{base}/Tanh")
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        t = g.node("Erf", [g.node("Mul", [x, scalar(g, float(np.sqrt(0.5)))], f"{base}/ErfIn")], f"{base}/Erf")
    half_x = g.node("Mul", [x, scalar(g, 0.5)], f"{base}/HalfX")
    return g.node("Mul", [half_x, g.node("Add", [t, scalar(g, 1.0)], f"{base}/OnePlus")], f"{base}/Gelu")


def softcap(g: Graph, x: str, cap: float, base: str) -> str:
    """cap * tanh(x / cap) (Gemma 2's logit and attention-score soft-capping)."""
    t = g.node("Tanh", [g.node("Mul", [x, scalar(g, 1.0 / cap)], f"{base}/SoftcapIn")], f"{base}/SoftcapTanh")
    return g.node("Mul", [t, scalar(g, cap)], f"{base}/Softcap")


def split(g: Graph, x: str, sizes, base: str) -> list:
    """x split along the last axis into parts of `sizes`."""
    name = g.name(f"{base}/Split")
    outs = [f"{name}/out{i}" for i in range(len(sizes))]
    g.nodes.append(helper.make_node("Split", [x, int64(g, list(sizes))], outs, name=name, axis=-1))
    return outs


def group_query_attention(g: Graph, qkv, past_k: str, past_v: str, seqlens_k: str, total_len: str,
                          cos: str, sin: str, base: str, n_heads: int, n_kv: int, window: int, scale: float,
                          softcap: float):
    """com.microsoft GroupQueryAttention with rotary inside; qkv is (packed,) or (q, k, v)."""
    q, k, v = (qkv[0], "", "") if len(qkv) == 1 else qkv
    name = g.name(f"{base}/GroupQueryAttention")
    outs = [f"{name}/out0", f"{name}/present_key", f"{name}/present_value"]
    extra = {"softcap": softcap} if softcap else {}
    g.nodes.append(helper.make_node(
        "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin], outs, name=name,
        domain=MS, num_heads=n_heads, kv_num_heads=n_kv, do_rotary=1, rotary_interleaved=0,
        local_window_size=window, scale=scale, **extra,
    ))
    return outs


def rotary(g: Graph, x: str, cos: str, sin: str, base: str, head_dim: int) -> str:
    """Half-split RoPE on x [B, S, heads, D] with cos/sin [B, S, 1, D] (halves repeated)."""
    half = head_dim // 2
    x1 = g.node("Slice", [x, int64(g, [0]), int64(g, [half]), int64(g, [-1])], f"{base}/SliceLo")
    x2 = g.node("Slice", [x, int64(g, [half]), int64(g, [head_dim]), int64(g, [-1])], f"{base}/SliceHi")
    rotated = g.node("Concat", [g.node("Neg", [x2], f"{base}/Neg"), x1], f"{base}/RotateHalf", axis=-1)
    return g.node(
        "Add", [g.node("Mul", [x, cos], f"{base}/MulCos"), g.node("Mul", [rotated, sin], f"{base}/MulSin")],
        f"{base}/Rotary",
    )


def reshape(g: Graph, x: str, shape, base: str) -> str:
    return g.node("Reshape", [x, int64(g, shape)], f"{base}/Reshape")


def transpose(g: Graph, x: str, perm, base: str) -> str:
    return g.node("Transpose", [x], f"{base}/Transpose", perm=list(perm))


def plain_attention(g: Graph, q: str, k: str, v: str, past_k: str, past_v: str, mask: str, base: str,
                    n_heads: int, n_kv: int, head_dim: int, scale: float, softcap_at: float):
    """Causal GQA from MatMul/Softmax: q [B,S,N,D] and k, v [B,S,KV,D] already rotated.

    Query heads are grouped as [B, KV, N/KV, S, D] so each KV head broadcasts
    over its group without copying the cache. Returns (out [B,S,N*D], present_k, present_v).
    """
    rep = n_heads // n_kv
    k_new = transpose(g, k, (0, 2, 1, 3), f"{base}/k")
    v_new = transpose(g, v, (0, 2, 1, 3), f"{base}/v")
    present_k = g.node("Concat", [past_k, k_new], f"{base}/ConcatK", axis=2)
    present_v = g.node("Concat", [past_v, v_new], f"{base}/ConcatV", axis=2)
    qg = transpose(g, reshape(g, q, [0, 0, n_kv, rep, head_dim], f"{base}/q"), (0, 2, 3, 1, 4), f"{base}/q")
    kg = g.node("Unsqueeze", [present_k, int64(g, [2])], f"{base}/UnsqueezeK")
    vg = g.node("Unsqueeze", [present_v, int64(g, [2])], f"{base}/UnsqueezeV")
    kt = transpose(g, kg, (0, 1, 2, 4, 3), f"{base}/kT")
    qs = g.node("Mul", [qg, scalar(g, scale)], f"{base}/Scale")
    scores = g.node("MatMul", [qs, kt], f"{base}/QK")
    if softcap_at:
        scores = softcap(g, scores, softcap_at, base)
    scores = g.node("Add", [scores, mask], f"{base}/Mask")
    probs = g.node("Softmax", [scores], f"{base}/Softmax", axis=-1)
    out = g.node("MatMul", [probs, vg], f"{base}/PV")  # [B, KV, rep, S, D]
    out = transpose(g, out, (0, 3, 1, 2, 4), f"{base}/out")
    return reshape(g, out, [0, 0, n_heads * head_dim], f"{base}/out"), present_k, present_v


def causal_mask(g: Graph, attention_mask: str, seq_len: str, window: int) -> str:
    """Additive mask [B, 1, 1, S, T]: 0 where query i may see key j, dtype-min elsewhere.

    Query i sits at absolute position T - S + i; key j is visible when j <= that
    position, the attention mask is 1, and (with a sliding window) j is within it.
    """
    base = "/model/mask"
    total = g.node("Gather", [g.node("Shape", [attention_mask], f"{base}/Shape"), int64(g, 1)], f"{base}/T", axis=0)
    past = g.node("Sub", [total, seq_len], f"{base}/P")
    keys = g.node("Range", [int64(g, 0), total, int64(g, 1)], f"{base}/Keys")
    queries = g.node("Unsqueeze", [g.node("Range", [past, total, int64(g, 1)], f"{base}/Queries"), int64(g, [1])],
                     f"{base}/QueriesCol")
    visible = g.node("LessOrEqual", [keys, queries], f"{base}/Causal")
    if window > 0:
        lo = g.node("Sub", [queries, int64(g, window)], f"{base}/WindowStart")
        visible = g.node("And", [visible, g.node("Greater", [keys, lo], f"{base}/InWindow")], f"{base}/Window")
    padding = g.node("Cast", [reshape(g, attention_mask, [0, 1, 1, 1, -1], f"{base}/pad")], f"{base}/PadBool",
                     to=TensorProto.BOOL)
    allowed = g.node("And", [visible, padding], f"{base}/Allowed")
    neg = g.const(f"{base}.min", np.array(np.finfo(g.np_dtype).min, dtype=g.np_dtype))
    return g.node("Where", [allowed, scalar(g, 0.0), neg], f"{base}/Additive")


def value_info(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)
