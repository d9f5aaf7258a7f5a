"""Tests for awq_edge.engine.build with real TensorRT-RTX: engines built on a machine without a GPU, and the
hand-off of MatMulNBits nodes from its ONNX parser to a plugin creator."""

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from awq_edge.export.folder import MODEL_FILE
from test_engine import GROUP, HEAD_DIM, HIDDEN, KV_HEADS, VOCAB, tiny_decoder, write_onnx_dir

from awq_edge.engine import build, manifest
from awq_edge.errors import AwqEdgeError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="tensorrt_rtx not installed (pip install tensorrt-rtx==1.7.1.116)")


@pytest.mark.parametrize("device, sm", [("rtx-3090", 86), ("rtx-4090", 89), ("rtx-5090", 120)])
def test_rtx_engine_builds_without_a_gpu_from_int4_dequantize_matmul(tmp_path, device, sm):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native"), context_length=4096)
    out = tmp_path / "engine"
    record = build.build(d, device, out)
    serialized = (out / manifest.ENGINE_FILE).read_bytes()
    assert len(serialized) == record["engine_bytes"] > 0
    on_disk = json.loads((out / manifest.MANIFEST_FILE).read_text())
    assert on_disk == record
    assert on_disk["tensorrt"]["module"] == "tensorrt_rtx" and on_disk["model"]["int4_nodes"]["dq_int4"] == 3
    assert on_disk["compute_capability"].replace(".", "") == str(sm)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_rebuild_replaces_the_engine_folder_and_leaves_nothing_beside_it(tmp_path):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native"))
    out = tmp_path / "engine"
    build.build(d, "rtx-4090", out)
    build.build(d, "rtx-3090", out)
    assert json.loads((out / manifest.MANIFEST_FILE).read_text())["device"] == "rtx-3090"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "onnx"]


def test_an_engine_folder_holding_the_users_files_is_not_replaced(tmp_path):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native"))
    out = tmp_path / "engine"
    build.build(d, "rtx-4090", out)
    (out / "notes.txt").write_text("keep")
    with pytest.raises(AwqEdgeError, match=r"holds files awq-edge did not write \(notes.txt\)"):
        build.build(d, "rtx-3090", out)
    assert (out / "notes.txt").read_text() == "keep"


def test_output_that_is_not_an_engine_folder_is_left_alone(tmp_path):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native"))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.bin").write_bytes(b"keep")
    with pytest.raises(AwqEdgeError, match="not an awq-edge engine folder"):
        build.build(d, "rtx-4090", tmp_path / "precious")
    assert (tmp_path / "precious" / "data.bin").read_bytes() == b"keep"


def _loader_missing() -> bool:
    try:
        ctypes.CDLL("libtensorrt_rtx.so")
        return False
    except OSError:
        return True


@pytest.mark.skipif(not _loader_missing(), reason="libtensorrt_rtx.so is on the library path here")
def test_missing_rtx_loader_name_is_a_clear_error_not_an_abort(tmp_path):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("nbits"))
    plugin = tmp_path / "libawq_edge_trt_plugin.so"
    plugin.write_bytes(b"")
    with pytest.raises(AwqEdgeError, match="needs libtensorrt_rtx.so on the library path") as e:
        build.build(d, "rtx-4090", tmp_path / "engine", plugin_library=plugin)
    assert "LD_LIBRARY_PATH" in e.value.fix


# Runs in a child process: the parser dlopens libtensorrt_rtx.so, found only through LD_LIBRARY_PATH, which
# the dynamic loader reads at process start. The Python creator records what the parser hands it.
_RECORDING_CREATOR = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorrt_rtx as trt

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, n):
            for base in (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
                base.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = "MatMulNBits", "1", ""
            self.num_outputs, self.n, self.timing_cache_id = 1, n, ""

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return Plugin(self.n)

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, exprs):
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = exprs.constant(self.n)
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs):
            return True

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = "MatMulNBits", "1", ""
            self.field_names = trt.PluginFieldCollection([])
            self.calls = []

        def create_plugin(self, name, fc, phase):
            fields = {f.name: np.array(f.data).tolist() for f in fc}
            self.calls.append({"node": name, "fields": fields})
            plugin = Plugin(fields["n"][0])
            keep.append(plugin)
            return plugin

    keep, creator = [], Creator()
    trt.get_plugin_registry().register_creator(creator, "")
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(sys.argv[1])
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugins = [{"name": l.name, "inputs": [str(l.get_input(j).dtype) for j in range(l.num_inputs)]}
               for l in layers if l.type == trt.LayerType.PLUGIN_V3]
    print(json.dumps({"ok": ok, "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)],
                      "calls": creator.calls, "plugin_layers": plugins}))
""")


def test_rtx_parser_hands_matmul_nbits_to_the_plugin_creator_named_matmul_nbits(tmp_path):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("nbits"))
    libs = Path(importlib.util.find_spec("tensorrt_rtx_libs").origin).parent
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtensorrt_rtx.so").symlink_to(libs / "libtensorrt_rtx.so.1")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{tmp_path / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    run = subprocess.run([sys.executable, "-c", _RECORDING_CREATOR, str(d / MODEL_FILE)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["ok"], seen["errors"]
    expected_n = {"k": KV_HEADS * HEAD_DIM, "v": KV_HEADS * HEAD_DIM, "lm_head": VOCAB}
    assert len(seen["calls"]) == len(seen["plugin_layers"]) == 3
    for call in seen["calls"]:
        f = call["fields"]
        assert f["k"] == [HIDDEN] and f["bits"] == [4] and f["block_size"] == [GROUP] and f["has_zeros"] == [0]
    assert sorted(c["fields"]["n"][0] for c in seen["calls"]) == sorted(expected_n.values())
    # Activations fp16, the packed weights as 8-bit bytes, the scales fp16: the plugin's input formats.
    for layer in seen["plugin_layers"]:
        assert layer["inputs"] == ["DataType.HALF", "DataType.INT8", "DataType.HALF"]


def test_a_library_tensorrt_cannot_load_is_one_clear_error(tmp_path):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native"))
    bad = tmp_path / "libawq_edge_trt_plugin.so"
    bad.write_bytes(b"not a shared library")
    with pytest.raises(AwqEdgeError, match="could not load the plugin library"):
        build.build(d, "rtx-4090", tmp_path / "engine", plugin_library=bad)
    assert not (tmp_path / "engine").exists()
