"""Tests for awq_edge.engine: ONNX checks, KV budget, optimisation profiles, manifest; and build's early errors."""

import json

import numpy as np
import onnx
import pytest
from awq_edge.export.folder import GENAI_CONFIG, MODEL_FILE, context_length, genai_config
from onnx import TensorProto, helper, numpy_helper

from awq_edge.arch import Dims
from awq_edge.engine import build, manifest, plan
from awq_edge.engine.devices import get_profile
from awq_edge.errors import AwqEdgeError

VOCAB, HIDDEN, KV_HEADS, HEAD_DIM, GROUP = 32, 64, 2, 8, 32


def _int4_weight(g, name, k, n, form, zero_points):
    """A [K, N] int4 weight as MatMulNBits inputs or as int4 DequantizeLinear; returns the MatMul-like node maker."""
    rng = np.random.default_rng(0)
    nb = k // GROUP
    if form == "nbits":
        g["init"] += [numpy_helper.from_array(rng.integers(0, 256, (n, nb, GROUP // 2), dtype=np.uint8), f"{name}.B"),
                      numpy_helper.from_array((rng.random(n * nb) * 0.02).astype(np.float16), f"{name}.scales")]
        ins = [f"{name}.B", f"{name}.scales"]
        if zero_points:
            g["init"].append(numpy_helper.from_array(rng.integers(0, 256, n * ((nb + 1) // 2), dtype=np.uint8),
                                                     f"{name}.zp"))
            ins.append(f"{name}.zp")
        return lambda x, y: helper.make_node("MatMulNBits", [x, *ins], [y], domain="com.microsoft",
                                             K=k, N=n, bits=4, block_size=GROUP)
    g["init"] += [helper.make_tensor(f"{name}.q", TensorProto.INT4, [k, n], rng.integers(-8, 8, k * n).tolist()),
                  numpy_helper.from_array((rng.random((nb, n)) * 0.02).astype(np.float16), f"{name}.s")]
    dq = [f"{name}.q", f"{name}.s"]
    if zero_points:
        g["init"].append(helper.make_tensor(f"{name}.z", TensorProto.INT4, [nb, n], [1] * (nb * n)))
        dq.append(f"{name}.z")
    g["nodes"].append(helper.make_node("DequantizeLinear", dq, [f"{name}.w"], axis=0, block_size=GROUP))
    return lambda x, y: helper.make_node("MatMul", [x, f"{name}.w"], [y])


def tiny_decoder(form="native", zero_points=False, dtype=TensorProto.FLOAT16, extra_dim=None):
    """One-layer decoder with the exporter's I/O names and dims: embeddings, an int4 K/V projection, lm_head."""
    g = {"init": [numpy_helper.from_array(np.random.default_rng(1).random((VOCAB, HIDDEN)).astype(np.float16),
                                          "embed")], "nodes": []}
    kv_out = KV_HEADS * HEAD_DIM
    proj = {n: _int4_weight(g, n, HIDDEN, width, form, zero_points)
            for n, width in (("k", kv_out), ("v", kv_out), ("lm_head", VOCAB))}
    g["init"].append(numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], dtype=np.int64), "kv_shape"))
    nodes = g["nodes"] + [helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                          helper.make_node("ReduceSum", ["attention_mask"], ["n_tokens"], keepdims=1),
                          helper.make_node("Cast", ["n_tokens"], ["n_tokens_f"], to=TensorProto.FLOAT16),
                          helper.make_node("Unsqueeze", ["n_tokens_f", "axis2"], ["bias"])]
    g["init"].append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"))
    for kind in ("k", "v"):
        nodes += [proj[kind]("h", f"{kind}_flat"),
                  helper.make_node("Reshape", [f"{kind}_flat", "kv_shape"], [f"{kind}_4d"]),
                  helper.make_node("Transpose", [f"{kind}_4d"], [f"{kind}_new"], perm=[0, 2, 1, 3]),
                  helper.make_node("Concat", [f"past_key_values.0.{'key' if kind == 'k' else 'value'}", f"{kind}_new"],
                                   [f"present.0.{'key' if kind == 'k' else 'value'}"], axis=2)]
    nodes += [proj["lm_head"]("h", "raw_logits"), helper.make_node("Add", ["raw_logits", "bias"], ["logits"])]
    kv_in = ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    kv_outd = ["batch_size", KV_HEADS, "total_sequence_length", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", extra_dim or "total_sequence_length"])]
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{k}", dtype, kv_in) for k in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch_size", "sequence_length", VOCAB])]
    outputs += [helper.make_tensor_value_info(f"present.0.{k}", dtype, kv_outd) for k in ("key", "value")]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, g["init"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def write_onnx_dir(path, model, context_length=None):
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / MODEL_FILE))
    if context_length:
        dims = Dims(hidden=HIDDEN, layers=1, heads=KV_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, vocab=VOCAB,
                    eps=1e-6, max_positions=context_length, window=0, tied=False)
        genai = genai_config({"model_type": "llama", "eos_token_id": 2}, {}, model, dims)
        (path / GENAI_CONFIG).write_text(json.dumps(genai))
    return path


def test_kv_layout_is_read_from_the_past_inputs():
    kv = plan.kv_layout(plan.graph_inputs(tiny_decoder()))
    assert (kv.layers, kv.kv_heads, kv.head_dim, kv.bytes_per_value) == (1, KV_HEADS, HEAD_DIM, 2)
    assert kv.bytes_per_token == 2 * 1 * KV_HEADS * HEAD_DIM * 2


def test_smollm2_kv_budget_of_a_nano_allows_its_full_context():
    smollm2 = plan.KvLayout(layers=30, kv_heads=3, head_dim=64, bytes_per_value=2)  # 23040 bytes a token
    nano = get_profile("jetson-orin-nano-8gb")
    assert plan.max_context(nano, smollm2, 8192) == nano.max_seq_len == 2048


def test_kv_budget_and_model_length_cut_the_context():
    nano, h100 = get_profile("jetson-orin-nano-8gb"), get_profile("h100")
    big = plan.KvLayout(layers=32, kv_heads=8, head_dim=128, bytes_per_value=2)  # 128 KiB a token
    assert plan.max_context(nano, big) == nano.max_seq_len  # 1 GiB holds 8192 tokens: the profile's 2048 rule
    assert plan.max_context(h100, big, model_max_positions=4096) == 4096
    huge = plan.KvLayout(layers=80, kv_heads=64, head_dim=128, bytes_per_value=2)  # 2.5 MiB a token
    assert plan.max_context(nano, huge) == 409  # 1024 MiB / 2.5 MiB


def test_profiles_cover_prefill_chunks_and_single_token_decode():
    nano = get_profile("jetson-orin-nano-8gb")
    inputs = plan.graph_inputs(tiny_decoder())
    p = plan.optimization_profiles(inputs, 2048, nano)
    assert list(p) == ["prefill", "decode"]
    assert p["prefill"]["input_ids"] == ((1, 1), (1, 256), (1, 256))
    assert p["decode"]["input_ids"] == ((1, 1), (1, 1), (1, 1))
    assert p["prefill"]["past_key_values.0.key"] == ((1, 2, 0, 8), (1, 2, 0, 8), (1, 2, 2048 - 256, 8))
    assert p["decode"]["past_key_values.0.key"] == ((1, 2, 0, 8), (1, 2, 1024, 8), (1, 2, 2047, 8))
    assert p["decode"]["attention_mask"] == ((1, 1), (1, 1025), (1, 2048))
    for shapes in p.values():  # the cache plus the new tokens never exceeds the context
        assert shapes["past_key_values.0.key"][2][2] + shapes["input_ids"][2][1] <= 2048


def test_unknown_symbolic_dim_is_refused():
    inputs = plan.graph_inputs(tiny_decoder(extra_dim="mask_len"))
    with pytest.raises(AwqEdgeError, match="attention_mask has dims .*'mask_len'"):
        plan.optimization_profiles(inputs, 2048, get_profile("h100"))


def test_fp32_export_is_refused_for_an_fp16_device():
    inputs = plan.graph_inputs(tiny_decoder(dtype=TensorProto.FLOAT))
    with pytest.raises(AwqEdgeError, match="export with `--dtype fp16`"):
        plan.check_precision(inputs, get_profile("rtx-4090"))


def test_int4_forms_are_counted():
    assert plan.int4_nodes(tiny_decoder("native")) == {
        "matmul_nbits": 0, "matmul_nbits_zero_points": 0, "dq_int4": 3, "dq_int4_zero_points": 0}
    assert plan.int4_nodes(tiny_decoder("nbits", zero_points=True)) == {
        "matmul_nbits": 3, "matmul_nbits_zero_points": 3, "dq_int4": 0, "dq_int4_zero_points": 0}


@pytest.mark.parametrize("form, zp, device, plugin, message", [
    ("native", True, "rtx-4090", None, "TensorRT's int4 path is symmetric only"),
    ("nbits", True, "rtx-4090", "lib.so", "TensorRT-RTX, whose MatMulNBits import refuses zero points"),
    ("nbits", True, "jetson-orin", None, "no plugin library was given"),
])
def test_int4_forms_the_target_cannot_take_are_refused(form, zp, device, plugin, message):
    with pytest.raises(AwqEdgeError, match=message):
        plan.check_int4_path(plan.int4_nodes(tiny_decoder(form, zp)), get_profile(device), plugin)


def test_int4_forms_the_target_takes_pass():
    plan.check_int4_path(plan.int4_nodes(tiny_decoder("native")), get_profile("rtx-4090"), None)
    plan.check_int4_path(plan.int4_nodes(tiny_decoder("nbits", True)), get_profile("jetson-orin"), "lib.so")


def test_model_hash_covers_external_data(tmp_path):
    d = tmp_path / "onnx"
    d.mkdir()
    (d / MODEL_FILE).write_bytes(b"graph")
    (d / f"{MODEL_FILE}.data").write_bytes(b"weights")
    (d / "tokenizer.json").write_bytes(b"{}")
    first = manifest.model_hash(d)
    (d / "tokenizer.json").write_bytes(b"{ }")
    assert manifest.model_hash(d) == first
    (d / f"{MODEL_FILE}.data").write_bytes(b"weightz")
    assert manifest.model_hash(d) != first


def test_manifest_records_device_tensorrt_model_and_shapes(tmp_path):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder(), context_length=8192)
    nano = get_profile("jetson-orin-nano-8gb")
    inputs = plan.graph_inputs(plan.load_graph(d))
    kv = plan.kv_layout(inputs)
    max_seq = plan.max_context(nano, kv, context_length(d))
    shapes = plan.optimization_profiles(inputs, max_seq, nano)
    m = manifest.manifest(nano, trt_module="tensorrt", trt_version="10.3.0", onnx_dir=d,
                        model_sha256=manifest.model_hash(d), kv=kv, max_seq=max_seq, profiles=shapes,
                        int4=plan.int4_nodes(tiny_decoder()), plugin_library="/x/libawq_edge_trt_plugin.so",
                        engine_bytes=123, build_seconds=1.23456)
    m = json.loads(json.dumps(m))  # what lands on disk
    assert (m["device"], m["compute_capability"], m["tensorrt"]) == (
        "jetson-orin-nano-8gb", "8.7", {"module": "tensorrt", "version": "10.3.0"})
    assert m["model"]["sha256"] == manifest.model_hash(d) and m["plugin_library"] == "libawq_edge_trt_plugin.so"
    assert m["kv_cache"]["max_seq_len"] == 2048 and m["kv_cache"]["bytes"] == kv.bytes_per_token * 2048
    assert [p["name"] for p in m["optimization_profiles"]] == ["prefill", "decode"]
    assert m["optimization_profiles"][1]["shapes"]["input_ids"] == [[1, 1], [1, 1], [1, 1]]
    assert m["build_seconds"] == 1.235


def test_missing_onnx_folder_names_the_export_command(tmp_path):
    with pytest.raises(AwqEdgeError, match="awq-edge export"):
        plan.load_graph(tmp_path)


def test_build_without_tensorrt_says_where_to_run(tmp_path, monkeypatch):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("nbits", zero_points=True))
    plugin = tmp_path / "libawq_edge_trt_plugin.so"
    plugin.write_bytes(b"")
    real_import = build.importlib.import_module

    def no_tensorrt(name, *a):
        if name == "tensorrt":
            raise ImportError(name)
        return real_import(name, *a)

    monkeypatch.setattr(build.importlib, "import_module", no_tensorrt)
    with pytest.raises(AwqEdgeError, match="needs the Python module `tensorrt`") as e:
        build.build(d, "jetson-orin", tmp_path / "engine", plugin_library=plugin)
    assert "on the device itself" in e.value.fix
    assert not (tmp_path / "engine").exists()


def test_build_cli_prints_one_error_line_and_exits_2(tmp_path, capsys):
    from awq_edge.cli import main
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native", zero_points=True))
    assert main(["build", str(d), "--device", "rtx-4090", "-o", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symmetric only" in err[0] and "--no-zero-point" in err[0]


def test_weights_move_into_matmul_nbits_attributes_byte_for_byte():
    model = tiny_decoder("nbits", zero_points=True)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    plan.weights_as_fields(model)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3
    for n in nodes:
        base = n.name or n.output[0]
        attrs = {a.name: a for a in n.attribute}
        assert len(n.input) == 1 and attrs["has_bias"].i == 0
        weights = numpy_helper.to_array(attrs["weights"].t)
        assert weights.dtype == np.int8 and attrs["scales"].t.data_type == TensorProto.FLOAT16
        original = [v for k, v in before.items() if k.endswith(".B") and v.size == weights.size]
        assert any(np.array_equal(weights.view(np.uint8), o.reshape(-1)) for o in original), base
        assert numpy_helper.to_array(attrs["zero_points"].t).dtype == np.int8
    left = {t.name for t in model.graph.initializer}
    assert not any(name.endswith((".B", ".scales", ".zp")) for name in left) and "embed" in left


def test_fields_model_is_written_with_its_other_weights_external(tmp_path):
    d = tmp_path / "onnx"
    d.mkdir()
    onnx.save_model(tiny_decoder("nbits"), str(d / MODEL_FILE), save_as_external_data=True,
                    location=f"{MODEL_FILE}.data", size_threshold=0)
    path = build._write_fields_model(d, tmp_path / "scratch")
    model = onnx.load(str(path))
    assert all(len(n.input) == 1 for n in model.graph.node if n.op_type == "MatMulNBits")
    assert (tmp_path / "scratch" / f"{MODEL_FILE}.data").is_file()
