"""Tests for awq_edge.runtime.trt without a GPU: profile choice, prefill chunking, and its clear refusals."""

import importlib.util
import json

import pytest
from test_engine import tiny_decoder, write_onnx_dir

from awq_edge.engine import manifest, plan
from awq_edge.engine.devices import get_profile
from awq_edge.errors import AwqEdgeError
from awq_edge.runtime import trt


def _manifest(tmp_path, device="jetson-orin-nano-8gb"):
    """The manifest `awq-edge build` writes for the tiny decoder on a device, and its engine folder."""
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder(), context_length=8192)
    profile = get_profile(device)
    inputs = plan.graph_inputs(plan.load_graph(d))
    kv = plan.kv_layout(inputs)
    shapes = plan.optimization_profiles(inputs, 2048, profile)
    m = manifest.manifest(profile, trt_module=profile.tensorrt, trt_version="10.3.0", onnx_dir=d, model_sha256="0",
                        kv=kv, max_seq=2048, profiles=shapes, int4={}, plugin_library=None, engine_bytes=1,
                        build_seconds=1.0)
    out = tmp_path / "engine"
    out.mkdir()
    (out / manifest.MANIFEST_FILE).write_text(json.dumps(m))
    (out / manifest.ENGINE_FILE).write_bytes(b"plan")
    return json.loads(json.dumps(m)), out


def test_one_token_steps_use_the_decode_profile_and_prompts_the_prefill_one(tmp_path):
    m, _ = _manifest(tmp_path)
    assert trt.profile_for(m, 1) == 1 and trt.profile_for(m, 7) == 0


def test_long_prompts_are_cut_into_chunks_the_prefill_profile_takes(tmp_path):
    m, _ = _manifest(tmp_path)  # the nano's prefill chunk is 256 tokens
    assert trt.prefill_chunks(m, 0, 600) == [256, 256, 88]
    assert trt.prefill_chunks(m, 100, 10) == [10]


def test_a_chunk_after_more_cache_than_the_prefill_profile_allows_is_refused(tmp_path):
    m, _ = _manifest(tmp_path)
    with pytest.raises(AwqEdgeError, match="exceeds the engine's prefill profile"):
        trt.prefill_chunks(m, 2048 - 256 + 1, 2)


def test_folder_without_an_engine_is_refused_naming_awq_edge_build(tmp_path):
    with pytest.raises(AwqEdgeError, match="awq-edge build"):
        trt.read_manifest(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_engine_for_a_missing_tensorrt_says_where_to_run_it(tmp_path):
    _, engine_dir = _manifest(tmp_path)
    with pytest.raises(AwqEdgeError, match="needs the Python module `tensorrt`"):
        trt.TrtDecoder(engine_dir)
