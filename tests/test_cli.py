"""Bad input to `awq-edge quantize` / `eval`: one clear error line, exit code 2, nothing left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import save_tiny_tokenizer, tiny_model


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "awq_edge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _hf_folder(path: Path, model_type="llama", **overrides):
    model = tiny_model(model_type, **overrides)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def assert_one_clear_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "error:" in lines[0] and "fix:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_folder(tmp_path):
    proc = run_cli("quantize", tmp_path / "nope", "-o", tmp_path / "out")
    assert_one_clear_error(proc, "not found", "smollm2-135m")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path):
    src = _hf_folder(tmp_path / "m")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    proc = run_cli("quantize", src, "-o", tmp_path / "out", "--group-size", "32")
    assert_one_clear_error(proc, "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_corrupt_safetensors_header(tmp_path):
    src = _hf_folder(tmp_path / "m")
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    proc = run_cli("quantize", src, "-o", tmp_path / "out", "--group-size", "32")
    assert_one_clear_error(proc, "not a readable safetensors file")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    src = _hf_folder(tmp_path / "m")
    (src / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    proc = run_cli("quantize", src, "-o", tmp_path / "out")
    assert_one_clear_error(proc, "no .safetensors", "pytorch_model.bin")


def test_unknown_architecture(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    save_file({"x": torch.zeros(1)}, src / "model.safetensors")
    save_tiny_tokenizer(src)
    proc = run_cli("quantize", src, "-o", tmp_path / "out")
    assert_one_clear_error(proc, "unsupported architecture 'gpt2'", "llama")


def test_group_size_not_dividing_k(tmp_path):
    src = _hf_folder(tmp_path / "m", hidden_size=96, intermediate_size=192, num_attention_heads=3, num_key_value_heads=3)
    proc = run_cli("quantize", src, "-o", tmp_path / "out", "--group-size", "64", "--method", "rtn")
    assert_one_clear_error(proc, "in_features=96", "--group-size")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(tmp_path):
    src = tmp_path / "m"
    tiny_model("llama").save_pretrained(src)
    proc = run_cli("quantize", src, "-o", tmp_path / "out")
    assert_one_clear_error(proc, "no tokenizer")


@pytest.mark.parametrize("content,needle", [("", "has no text"), ("   \n\n", "has no text"),
                                            ('{"txt": 1}\n', "text\" field")])
def test_bad_calibration_file(tmp_path, content, needle, smollm2_dir):
    calib = tmp_path / ("c.jsonl" if content.startswith("{") else "c.txt")
    calib.write_text(content)
    proc = run_cli("quantize", "smollm2-135m", "-o", tmp_path / "out", "--group-size", "64", "--calib", calib)
    assert_one_clear_error(proc, needle)
    assert not (tmp_path / "out").exists()


def test_eval_missing_text(tmp_path, smollm2_dir):
    proc = run_cli("eval", "smollm2-135m", "--text", tmp_path / "none.txt")
    assert_one_clear_error(proc, "not found")


@pytest.mark.slow
def test_quantize_smollm2_with_default_method_group_and_calibration_picks_a_group_that_fits(tmp_path, smollm2_dir):
    # Every default but the sample count: 128 samples of AWQ take about an hour on two CPU cores (20 s on a GPU).
    proc = run_cli("quantize", "smollm2-135m", "-o", tmp_path / "q", "--n-samples", "2", "--seqlen", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["group_size"] == 64  # 576 = 9 x 64; 128 does not divide it
    assert any("group" in line and "64" in line for line in (proc.stdout + proc.stderr).splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
