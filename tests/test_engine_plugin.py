"""Tests for the TensorRT plugin (plugins/tensorrt) where it has been built: inside a TensorRT-RTX build, and on a
GPU through its own interfaces. CI has no TensorRT headers, so these skip there; build the plugin with
`cmake -S plugins/tensorrt -B plugins/build/tensorrt -DTENSORRT_ROOT=...` to run them."""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_engine import tiny_decoder, write_onnx_dir

from awq_edge.engine import manifest

BUILD = Path(os.environ.get("AWQE_TRT_PLUGIN_BUILD", Path(__file__).resolve().parents[1] / "plugins/build/tensorrt"))
PLUGIN = BUILD / "libawq_edge_trt_plugin.so"
CHECK = BUILD / "awq_edge_trt_plugin_check"


@pytest.mark.skipif(not PLUGIN.is_file(), reason=f"plugin not built ({PLUGIN}); needs TensorRT headers")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
def test_tensorrt_rtx_builds_an_engine_with_our_plugin_for_its_matmul_nbits_nodes(tmp_path):
    onnx_dir = write_onnx_dir(tmp_path / "onnx", tiny_decoder("nbits"))
    libs = Path(importlib.util.find_spec("tensorrt_rtx_libs").origin).parent
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtensorrt_rtx.so").symlink_to(libs / "libtensorrt_rtx.so.1")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{tmp_path / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    script = textwrap.dedent("""
        import sys
        from awq_edge.engine import build
        build.build(sys.argv[1], "rtx-4090", sys.argv[2], plugin_library=sys.argv[3])
    """)
    out = tmp_path / "engine"
    run = subprocess.run([sys.executable, "-c", script, str(onnx_dir), str(out), str(PLUGIN)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    serialized = (out / manifest.ENGINE_FILE).read_bytes()
    # Each of the three plugin layers is serialized with our getFieldsToSerialize names.
    assert serialized.count(b"has_zero_points") >= 3 and b"MatMulNBits" in serialized
    # The folder ships the plugin and the kernels it links, so it deploys as one piece.
    assert (out / PLUGIN.name).is_file() and (out / "libawq_edge_kernels.so").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not CHECK.is_file(), reason=f"plugin check not built ({CHECK}); needs TensorRT headers")
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU")
def test_plugin_interfaces_reproduce_dequantised_matmul_on_the_gpu():
    run = subprocess.run([str(CHECK)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all cases match" in run.stdout
