"""Issue 20's reader defects, each a named test: what reached transformers, json or safetensors raw and crashed is
one `error: ... (fix: ...)` line now, before any work, and nothing is written."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import assert_one_clear_line, copy_folder, fx, q, run, snapshot, write  # noqa: F401

from awq_edge.errors import AwqEdgeError


def edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def config_with(change):
    return lambda d: edit_json(d / "config.json", change)


@pytest.mark.parametrize("name, change, needle", [
    ("an unknown rope type", lambda c: c.update(rope_scaling={"rope_type": "wobbly", "factor": 2.0}),
     "rope_scaling.rope_type is 'wobbly'"),
    ("an incomplete llama3 rope block", lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope_scaling.low_freq_factor is None"),
    ("layer_types shorter than the layers", lambda c: c.update(layer_types=["full_attention"]),
     "layer_types is ['full_attention'], not a list of 2"),
    ("query_pre_attn_scalar 0", lambda c: c.update(query_pre_attn_scalar=0), "query_pre_attn_scalar is 0"),
    ("a head count of 0", lambda c: c.update(num_attention_heads=0), "num_attention_heads is 0"),
    ("KV heads that do not divide the heads", lambda c: c.update(num_key_value_heads=3), "does not divide"),
    ("an eos id past the vocabulary", lambda c: c.update(eos_token_id=999), "eos_token_id is 999"),
    ("a NaN norm epsilon", lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps is nan"),
])
def test_quantize_refuses_config_values_transformers_would_crash_on(tmp_path, fx, capsys, name, change, needle):
    argv = q(tmp_path, fx, "--group-size", "32", damage=config_with(change))
    before = snapshot(tmp_path)
    assert_one_clear_line(*run(capsys, *argv), needle)
    assert snapshot(tmp_path) == before


def test_a_tokenizer_json_that_is_json_but_not_a_tokenizer_is_refused(tmp_path, fx, capsys):
    argv = q(tmp_path, fx, "--group-size", "32", damage=lambda d: write(d / "tokenizer.json", '{"version": "1.0"}'))
    assert_one_clear_line(*run(capsys, *argv), "tokenizer files", "cannot be loaded")


def test_a_folder_with_tokenizer_config_and_no_tokenizer_json_is_refused(tmp_path, fx, capsys):
    argv = q(tmp_path, fx, "--group-size", "32", damage=lambda d: (d / "tokenizer.json").unlink())
    assert_one_clear_line(*run(capsys, *argv), "cannot be loaded")


def test_a_tokenizer_that_lost_its_merges_is_refused_not_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from awq_edge.checkpoint.hf_folder import check_tokenizer

    letters = "\u0120abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({w: len(letters) + i for i, w in enumerate(
        ["\u0120t", "\u0120th", "\u0120the", "\u0120of", "\u0120and", "\u0120is", "\u0120capital"])})
    merges = [("\u0120", "t"), ("\u0120t", "h"), ("\u0120th", "e")]  # "the" survives, the other words' merges are lost
    broken = Tokenizer(models.BPE(vocab, merges))
    broken.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=broken)
    with pytest.raises(AwqEdgeError, match=r"splits words its vocabulary holds whole .*merges"):
        check_tokenizer(tok, "the tokenizer in x")


def test_special_token_ids_past_the_models_vocabulary_are_refused(tmp_path, fx, capsys):
    argv = q(tmp_path, fx, "--group-size", "32", damage=config_with(lambda c: c.update(vocab_size=2)))
    code, lines, out = run(capsys, *argv)
    assert code == 2 and len(lines) == 1 and "error:" in lines[0], lines  # config or tokenizer: either names it


def flip_exponents(d: Path):
    t = load_file(d / "model.safetensors")
    w = t["model.layers.1.mlp.down_proj.weight"]
    w.view(-1)[:55] = 1e30
    save_file(t, d / "model.safetensors")


def test_float_weights_with_flipped_exponent_bits_are_refused_by_name(tmp_path, fx, capsys):
    argv = q(tmp_path, fx, "--group-size", "32", damage=flip_exponents)
    assert_one_clear_line(*run(capsys, *argv), "model.layers.1.mlp.down_proj.weight holds 55 weight(s)")
    assert not (tmp_path / "q").exists()


def test_eval_of_a_checkpoint_with_huge_weights_reports_instead_of_overflowing(tmp_path, fx, capsys):
    ck = copy_folder(fx["ours"], tmp_path / "ck")
    t = load_file(ck / "model.safetensors")
    t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], 6e4)  # fp16's largest: logits of 1e6
    save_file(t, ck / "model.safetensors")
    text = write(tmp_path / "t.txt", " ".join(f"w{3 + i % 200}" for i in range(300)))
    code, lines, out = run(capsys, "eval", ck, "--text", text, "--seqlen", "32", "--device", "cpu", "--json")
    assert (code == 0 and json.loads(out.splitlines()[-1])["ppl"] > 1e6) or (code == 2 and len(lines) == 1), lines


def without_tensor(name):
    def damage(d: Path):
        t = load_file(d / "model.safetensors")
        del t[name]
        save_file(t, d / "model.safetensors")
    return damage


@pytest.mark.parametrize("flags", [[], ["--exact"]])
def test_export_of_a_checkpoint_missing_a_tensor_is_one_line_with_or_without_the_head_calibration(
        tmp_path, fx, capsys, flags):
    ck = copy_folder(fx["ours"], tmp_path / "ck")
    without_tensor("model.layers.1.self_attn.q_proj.qzeros")(ck)
    assert_one_clear_line(*run(capsys, "export", ck, "-o", tmp_path / "onnx", *flags),
                          "model.layers.1.self_attn.q_proj.qweight but no model.layers.1.self_attn.q_proj.qzeros")
    assert not (tmp_path / "onnx").exists()


def test_eval_of_a_checkpoint_missing_a_tensor_is_one_line(tmp_path, fx, capsys):
    ck = copy_folder(fx["ours"], tmp_path / "ck")
    without_tensor("model.layers.0.mlp.down_proj.scales")(ck)
    text = write(tmp_path / "t.txt", "w3 w4 w5 w6")
    assert_one_clear_line(*run(capsys, "eval", ck, "--text", text, "--device", "cpu"), "no model.layers.0.mlp.down_proj.scales")


def sharded(ck: Path, point_at) -> Path:
    t = load_file(ck / "model.safetensors")
    names = sorted(t)
    save_file({k: t[k] for k in names[:5]}, ck / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in names[5:]}, ck / "model-00002-of-00002.safetensors")
    (ck / "model.safetensors").unlink()
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[:5]}
    weight_map.update({k: point_at for k in names[5:]})
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ck


@pytest.mark.parametrize("point_at, needle", [
    ("model-00003-of-00003.safetensors", "which is missing from"),
    ("/etc/passwd", "which is not a file in"),
    ("../model-00002-of-00002.safetensors", "which is not a file in"),
])
def test_a_shard_index_naming_a_missing_shard_or_a_path_outside_the_folder_is_one_line(
        tmp_path, fx, capsys, point_at, needle):
    ck = sharded(copy_folder(fx["ours"], tmp_path / "ck"), point_at)
    assert_one_clear_line(*run(capsys, "export", ck, "-o", tmp_path / "onnx", "--exact"), needle)


def test_a_shard_index_that_reads_right_exports_as_the_single_file_does(tmp_path, fx, capsys):
    ck = sharded(copy_folder(fx["ours"], tmp_path / "ck"), "model-00002-of-00002.safetensors")
    code, lines, _ = run(capsys, "export", ck, "-o", tmp_path / "onnx", "--exact")
    assert code == 0, lines


def test_a_safetensors_header_whose_shape_does_not_fill_its_bytes_is_refused(tmp_path):
    from awq_edge.checkpoint.hf_folder import check_safetensors

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"shape":[4,4]', b'"shape":[4,5]'))
    with pytest.raises(AwqEdgeError, match=r"shape \[4, 5\] do not fill its 64 bytes"):
        check_safetensors(path)


@pytest.mark.parametrize("group_size", [24, 48, 0, 8, "64", True])
def test_the_python_api_refuses_the_group_sizes_the_cli_refuses_before_any_work(fx, group_size):
    import awq_edge

    with pytest.raises(AwqEdgeError, match="not a power of two of at least 16"):
        awq_edge.quantize(fx["float"], group_size=group_size, method="rtn", device="cpu")


def test_concurrent_first_uses_of_a_builtin_model_convert_it_once_and_both_get_it(tmp_path, monkeypatch):
    from awq_edge.quantizer import source

    monkeypatch.setenv("AWQ_EDGE_CACHE", str(tmp_path))
    calls = []

    def slow_convert(name, out):  # what the real conversion does, slowly: a folder renamed into place
        calls.append(name)
        time.sleep(0.5)
        tmp = out.parent / f"{out.name}.partial"
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        tmp.rename(out)

    monkeypatch.setattr(source, "_convert_builtin", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(source._builtin_dir("smollm2-135m"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["smollm2-135m"] and results == [tmp_path / "smollm2-135m-f16"] * 2


def without_kv_heads(d: Path):
    edit_json(d / "genai_config.json", lambda c: c["model"]["decoder"].pop("num_key_value_heads"))


@pytest.mark.parametrize("damage, needle", [
    (without_kv_heads, "model.decoder.num_key_value_heads is None"),
    (lambda d: write(d / "awq_edge_export.json", ""), "awq_edge_export.json is not valid JSON"),
    (lambda d: write(d / "genai_config.json", (d / "genai_config.json").read_text()[:40]), "genai_config.json is not "
                                                                                             "valid JSON"),
    (lambda d: write(d / "genai_config.json", ""), "genai_config.json is not valid JSON"),
])
@pytest.mark.parametrize("command", ["generate", "chat", "build"])
def test_the_onnx_folders_json_files_are_read_checked_by_generate_chat_and_build(tmp_path, fx, capsys, damage, needle,
                                                                                 command):
    d = copy_folder(fx["onnx"], tmp_path / "onnx")
    damage(d)
    if command == "build" and "export.json" in needle:
        pytest.skip("build reads genai_config.json only (the export's options are onnxruntime's)")
    argv = {"generate": ["generate", d, "--prompt", "hi"], "chat": ["chat", d],
            "build": ["build", d, "--device", "rtx-4090", "-o", tmp_path / "engine"]}[command]
    before = snapshot(tmp_path)
    assert_one_clear_line(*run(capsys, *argv), needle)
    assert snapshot(tmp_path) == before
