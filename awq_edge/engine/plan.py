"""What a TensorRT engine build needs that TensorRT itself does not: ONNX checks, the KV budget, the shapes."""

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from awq_edge.engine.devices import DeviceProfile
from awq_edge.errors import AwqEdgeError
from awq_edge.export.folder import MODEL_FILE


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """One graph input: name, ONNX element type, dims (int or symbolic name)."""

    name: str
    elem_type: int
    dims: tuple


@dataclasses.dataclass(frozen=True)
class KvLayout:
    """The decoder's KV cache, read off its past_key_values inputs."""

    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value


def load_graph(onnx_dir) -> onnx.ModelProto:
    """The exported graph without its weights (external data stays on disk)."""
    path = Path(onnx_dir) / MODEL_FILE
    if not path.is_file():
        raise AwqEdgeError(f"{path} does not exist",
                           "pass the folder written by `awq-edge export QUANT_DIR -o ONNX_DIR --target trt`")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise AwqEdgeError(f"{path} is not a readable ONNX model ({type(e).__name__})",
                           "export it again with `awq-edge export QUANT_DIR -o ONNX_DIR --target trt`") from None


def onnx_bytes(onnx_dir) -> int:
    """Bytes of the exported model files: about what its engine takes on disk."""
    return sum(f.stat().st_size for f in Path(onnx_dir).glob(f"{MODEL_FILE}*"))


def graph_inputs(model: onnx.ModelProto) -> list:
    initializers = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim)
        out.append(GraphIO(vi.name, t.elem_type, dims))
    return out


def kv_layout(inputs) -> KvLayout:
    """Layers, KV heads and head size from the past_key_values.{i}.key inputs [batch, heads, past, head_dim]."""
    keys = [i for i in inputs if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not keys:
        raise AwqEdgeError("the ONNX graph has no past_key_values.*.key inputs",
                           "export the decoder with its KV cache (`awq-edge export ... --target trt`)")
    _, heads, _, head_dim = keys[0].dims
    if not (isinstance(heads, int) and isinstance(head_dim, int)):
        raise AwqEdgeError(f"{keys[0].name} has symbolic heads or head size {keys[0].dims}",
                           "export with static KV head count and head size")
    size = onnx.helper.tensor_dtype_to_np_dtype(keys[0].elem_type).itemsize
    return KvLayout(len(keys), heads, head_dim, size)


def check_precision(inputs, profile: DeviceProfile) -> None:
    """The network is strongly typed, so the ONNX activation dtype is the engine's precision."""
    want = {"fp16": onnx.TensorProto.FLOAT16}[profile.precision]
    wrong = [i.name for i in inputs if i.name.startswith("past_key_values.") and i.elem_type != want]
    if wrong:
        raise AwqEdgeError(f"{wrong[0]} is not {profile.precision} but device {profile.name} runs {profile.precision}",
                           "export with `--dtype fp16`")


def max_context(profile: DeviceProfile, kv: KvLayout, model_max_positions=None) -> int:
    """Longest context (prompt + generated) the engine accepts: the profile's, cut to the KV budget and the model."""
    by_budget = profile.kv_cache_mib * 2**20 // (kv.bytes_per_token * profile.max_batch)
    limits = [profile.max_seq_len, by_budget] + ([model_max_positions] if model_max_positions else [])
    n = min(limits)
    if n < 2:
        raise AwqEdgeError(f"device {profile.name}'s KV budget of {profile.kv_cache_mib} MiB holds {by_budget} tokens",
                           "raise kv_cache_mib in the device profile")
    return n


def _dim_ranges(max_seq: int, prefill: int, max_batch: int) -> dict:
    """(min, opt, max) of each symbolic dim, for the prefill and the decode profile.

    Prefill takes a prompt chunk of up to `prefill` tokens with room for the chunk
    in the cache; decode takes one token with up to max_seq - 1 cached before it.
    """
    batch = (1, 1, max_batch)
    return {
        "prefill": {"batch_size": batch, "sequence_length": (1, prefill, prefill),
                    "past_sequence_length": (0, 0, max_seq - prefill), "total_sequence_length": (1, prefill, max_seq)},
        "decode": {"batch_size": batch, "sequence_length": (1, 1, 1),
                   "past_sequence_length": (0, max_seq // 2, max_seq - 1),
                   "total_sequence_length": (1, max_seq // 2 + 1, max_seq)},
    }


def optimization_profiles(inputs, max_seq: int, profile: DeviceProfile) -> dict:
    """{"prefill"|"decode": {input name: (min shape, opt shape, max shape)}} for every graph input."""
    prefill = min(profile.prefill_tokens, max_seq - 1)
    out = {}
    for phase, ranges in _dim_ranges(max_seq, prefill, profile.max_batch).items():
        shapes = {}
        for i in inputs:
            unknown = [d for d in i.dims if isinstance(d, str) and d not in ranges]
            if unknown or any(d == 0 for d in i.dims if isinstance(d, int)):
                raise AwqEdgeError(f"input {i.name} has dims {i.dims}; only {sorted(ranges)} may be symbolic",
                                   "re-export with `awq-edge export`, which names its dims so")
            shapes[i.name] = tuple(tuple(ranges[d][k] if isinstance(d, str) else d for d in i.dims) for k in range(3))
        out[phase] = shapes
    return out


def int4_nodes(model: onnx.ModelProto) -> dict:
    """Counts of the two int4 forms: MatMulNBits (with/without zero points) and int4 DequantizeLinear."""
    int4 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    types = {t.name: t.data_type for t in model.graph.initializer}
    counts = {"matmul_nbits": 0, "matmul_nbits_zero_points": 0, "dq_int4": 0, "dq_int4_zero_points": 0}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            counts["matmul_nbits"] += 1
            counts["matmul_nbits_zero_points"] += len(n.input) > 3 and n.input[3] != ""
        elif n.op_type == "DequantizeLinear" and types.get(n.input[0]) in int4:
            counts["dq_int4"] += 1
            counts["dq_int4_zero_points"] += len(n.input) > 2 and n.input[2] != ""
    return counts


def check_int4_path(counts: dict, profile: DeviceProfile, plugin_library) -> None:
    """Refuse, before any TensorRT call, the int4 forms the chosen TensorRT cannot take."""
    if counts["dq_int4_zero_points"]:
        raise AwqEdgeError("int4 DequantizeLinear with zero points: TensorRT's int4 path is symmetric only",
                           "re-quantise with `--no-zero-point`, or export MatMulNBits (without --trt-native)")
    if not counts["matmul_nbits"]:
        return
    if profile.tensorrt == "tensorrt_rtx" and counts["matmul_nbits_zero_points"]:
        raise AwqEdgeError(f"device {profile.name} builds with TensorRT-RTX, whose MatMulNBits import refuses zero points",
                           "re-quantise with `--no-zero-point` and export with `--trt-native`")
    if plugin_library is None:
        raise AwqEdgeError(f"the ONNX has {counts['matmul_nbits']} MatMulNBits nodes and no plugin library was given",
                           "pass --plugin plugins/build/tensorrt/libawq_edge_trt_plugin.so (built as "
                           "docs/deploying-to-jetson.md says), or export with `--trt-native`")


def weights_as_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """MatMulNBits weights moved from initializers into node attributes, for full TensorRT; changes `model`.

    TensorRT's ONNX importer hands a plugin node's attributes to the plugin creator at build time, where the
    plugin packs them once into the kernels' layout and the engine stores them packed; as initializers they
    would reach the plugin only at run time, widened from uint8 to int32. uint8 travels as int8 (the same
    bytes), because plugin fields have no uint8 type. Needs the weights loaded (onnx.load with external data).
    """
    inits = {t.name: t for t in model.graph.initializer}
    moved = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a, b, scales, zero_points, g_idx, bias = list(node.input) + [""] * (6 - len(node.input))
        if g_idx or any(n and n not in inits for n in (b, scales, zero_points)):
            raise AwqEdgeError(f"MatMulNBits node {node.name} has g_idx or weights computed in the graph",
                               "export with `awq-edge export --target trt`, which writes plain initializers")
        fields = [("weights", b, np.int8), ("scales", scales, np.float16), ("zero_points", zero_points, np.int8)]
        for field, name, dtype in fields:
            if name:
                values = onnx.numpy_helper.to_array(inits[name]).reshape(-1)
                node.attribute.append(onnx.helper.make_attribute(
                    field, onnx.numpy_helper.from_array(values.view(dtype) if values.dtype.itemsize == 1 else
                                                        values.astype(dtype), field)))
                moved.add(name)
        node.attribute.append(onnx.helper.make_attribute("has_bias", int(bool(bias))))
        del node.input[:]
        node.input.extend([a] + ([bias] if bias else []))
    still_used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in moved or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model
