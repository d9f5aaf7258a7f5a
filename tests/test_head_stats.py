"""The head statistics: the quantiser measures E[y^2] of the final norm's output on its calibration text and stores
them in the checkpoint; the default export searches its 4-bit head on them without running the model again."""

import json
from dataclasses import replace

import onnx
import pytest
import torch
from conftest import save_tiny_tokenizer, tiny_model
from test_export import assert_equals_pytorch_with_head, write_calibration_text, write_checkpoint

from awq_edge.checkpoint.hf_folder import HEAD_STATS_FILE, load_tokenizer
from awq_edge.checkpoint.reader import Checkpoint
from awq_edge.cli import main
from awq_edge.errors import AwqEdgeError
from awq_edge.export.api import export, export_options
from awq_edge.export.head import quantize_weighted
from awq_edge.quant import dequantize
from awq_edge.quantizer.calib import calibration_blocks


def float_folder(path):
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return model


def test_quantize_stores_the_final_norms_statistics_on_its_calibration_blocks(tmp_path):
    model = float_folder(tmp_path / "m")
    text = write_calibration_text(tmp_path / "calib.txt")
    assert main(["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "ck"), "--method", "awq", "--group-size", "32",
                 "--calib", str(text), "--n-samples", "4", "--seqlen", "64", "--device", "cpu"]) == 0
    stored = Checkpoint(tmp_path / "ck").head_moments()
    blocks = calibration_blocks(load_tokenizer(tmp_path / "m"), str(text), 4, 64)
    with torch.no_grad():  # the float model's last hidden state is the final norm's output
        y = model.model(input_ids=blocks).last_hidden_state.double()
    assert torch.allclose(stored, y.pow(2).mean(dim=(0, 1)).float(), rtol=1e-4)


def test_round_to_nearest_without_calibration_stores_no_statistics(tmp_path):
    float_folder(tmp_path / "m")
    assert main(["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "ck"), "--method", "rtn", "--group-size",
                 "32"]) == 0
    assert not (tmp_path / "ck" / HEAD_STATS_FILE).exists() and Checkpoint(tmp_path / "ck").head_moments() is None


def test_the_default_export_searches_the_head_on_the_stored_statistics(tmp_path):
    model, _ = write_checkpoint(tmp_path / "ck")
    save_tiny_tokenizer(tmp_path / "ck")
    moments = torch.rand(128) * 2
    moments[[3, 70]] = 40.0
    (tmp_path / "ck" / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": moments.tolist()}))
    opts = export_options("ort", accuracy_level=0, head_group=32)  # the default's head, float activations
    out = export(tmp_path / "ck", tmp_path / "onnx", opts)
    w = model.lm_head.weight.data.clone()
    hi = torch.argsort(moments, descending=True)[:64].sort().values  # the 64 channels of largest E[y^2]
    lo = torch.tensor([c for c in range(128) if c not in set(hi.tolist())])
    expected = torch.empty_like(w)
    for cols, bits in ((lo, 4), (hi, 8)):
        expected[:, cols] = dequantize(*quantize_weighted(w[:, cols], moments[cols], bits, 32, False), 32)
    assert_equals_pytorch_with_head(out, model, expected)
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    assert sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nodes
                  if n.op_type == "MatMulNBits" and n.name.startswith("lm_head")) == [4, 8]


def test_without_outliers_the_default_head_is_one_4bit_matrix(tmp_path):
    model, _ = write_checkpoint(tmp_path / "ck")
    moments = torch.rand(128) * 2
    (tmp_path / "ck" / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": moments.tolist()}))
    out = export(tmp_path / "ck", tmp_path / "onnx", export_options("ort", accuracy_level=0, head_group=32,
                                                                    head_outliers=0))
    w = model.lm_head.weight.data.clone()
    assert_equals_pytorch_with_head(out, model, dequantize(*quantize_weighted(w, moments, 4, 32, False), 32))


@pytest.mark.parametrize("overrides, needle", [
    ({"head_outliers": 48}, "--head-outliers 48 is not a multiple of --head-group 32 below hidden size 128"),
    ({"head_outliers": 128}, "--head-outliers 128 is not a multiple"),
    ({"head_outliers": -32}, "--head-outliers -32 is not a whole number >= 0"),
    ({"head_outliers": 32, "head_calib": ""}, "--head-outliers needs --head-bits 4 and --head-calib"),
    ({"head_outliers": 32, "head_bits": 8}, "--head-outliers needs --head-bits 4"),
])
def test_bad_head_outliers_are_one_clear_error(tmp_path, overrides, needle):
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": [1.0] * 128}))
    with pytest.raises(AwqEdgeError, match=needle):
        export(tmp_path / "ck", tmp_path / "onnx", export_options("ort", head_group=32, **overrides))
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("overrides, bits", [({}, [4]), ({"head_group": 128}, [4]), ({"head_calib": ""}, [4]),
                                              ({"head_bits": 8}, [8]), ({"head_group": 32}, [4, 8]),
                                              ({"head_group": 32, "head_outliers": 64}, [4, 8])])
def test_the_default_outliers_follow_the_head_flags_and_the_width(tmp_path, overrides, bits):
    """64 channels (or one group) at 8 bits where the head is calibrated at 4 bits and at most half its width; a
    tied table of hidden size 128 in groups of 64 would keep one group (odd) beside 64 outliers, and 128 is more
    than half: no split (test_a_tied_4_bit_table_keeps_an_even_number_of_groups_a_row)."""
    write_checkpoint(tmp_path / "ck")  # hidden size 128
    (tmp_path / "ck" / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": [1.0] * 128}))
    out = export(tmp_path / "ck", tmp_path / "onnx", export_options("ort", **overrides))
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    assert sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nodes
                  if n.op_type == "MatMulNBits" and n.name.startswith("lm_head")) == bits


@pytest.mark.parametrize("overrides, bits", [({"dtype": "fp16"}, [8]),
                                              ({"dtype": "fp16", "head_bits": 4, "head_group": 32}, [4, 8]),
                                              ({"dtype": "fp16", "head_bits": 4, "head_outliers": 0}, [4]),
                                              ({"dtype": "fp16", "head_outliers": 64, "head_bits": 4, "head_group": 32},
                                               [4, 8]),
                                              ({"dtype": "fp16", "head_outliers": 64, "head_group": 32}, [4, 8])])
def test_the_gpu_default_head(tmp_path, capsys, overrides, bits):
    """--dtype fp16 (onnxruntime's CUDA provider): a small head is one 8-bit MatMulNBits and the tied embeddings
    one GatherBlockQuantized; a 4-bit head is split as on the CPU unless asked otherwise; the CLI says which head it
    chose."""
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": [1.0] * 128}))
    out = export(tmp_path / "ck", tmp_path / "onnx", export_options("ort", **overrides))
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    assert sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nodes
                  if n.op_type == "MatMulNBits" and n.name.startswith("lm_head")) == bits
    assert sum(n.op_type == "GatherBlockQuantized" for n in nodes) == len(bits)  # the tied embeddings: one per part
    info = json.loads((out / "awq_edge_export.json").read_text())
    assert (info["head_bits"], info["head_outliers"]) == (bits[0], 64 if len(bits) == 2 else 0)
    if not overrides.get("head_bits"):
        assert main(["export", str(tmp_path / "ck"), "-o", str(tmp_path / "cli"), "--dtype", "fp16"]) == 0
        assert "head: 8 bits g64)" in capsys.readouterr().out


def test_the_gpu_default_head_is_the_split_4_bit_one_past_64mi_weights():
    from awq_edge.export.decoder import AUTO_BITS, AUTO_OUTLIERS, resolve_head

    opts = export_options("ort", dtype="fp16")
    assert opts.head_bits == AUTO_BITS and opts.head_outliers == AUTO_OUTLIERS

    def head(vocab, hidden):
        r = resolve_head(opts, vocab, hidden)
        return r.head_bits, r.head_outliers

    assert head(49152, 576) == (8, 0)  # SmolLM2-135M: one 8-bit node
    assert head(65536, 1024) == (8, 0)  # 64Mi weights exactly
    assert head(128256, 4096) == (4, 64)  # Llama-3-8B (untied): 4 bits, 64 input channels at 8
    assert head(151936, 896) == (4, 64)  # an untied Qwen2.5-0.5B
    assert (resolve_head(export_options("ort"), 49152, 576).head_bits, export_options("ort").head_outliers) == (4, -1)


@pytest.mark.parametrize("vocab, hidden, outliers", [(49152, 576, 64), (151936, 896, 128), (128256, 2048, 128),
                                                     (262144, 640, 128), (262144, 1152, 128)])
def test_a_tied_4_bit_table_keeps_an_even_number_of_groups_a_row(vocab, hidden, outliers):
    """The default's outlier channels leave a tied 4-bit table an even number of groups of 64 a row (onnxruntime's
    CUDA GatherBlockQuantized misreads the zero points of an odd one): SmolLM2 512 / 64 = 8 with 64 outliers;
    Qwen2.5-0.5B, Llama-3.2-1B, Gemma-3-270M and Gemma-3-1B need 128. The CPU default does the same."""
    from awq_edge.export.decoder import odd_gather_groups, resolve_head

    for opts in (export_options("ort", dtype="fp16"), export_options("ort")):
        r = resolve_head(replace(opts, head_bits=4), vocab, hidden, tied=True)
        assert (r.head_bits, r.head_outliers) == (4, outliers) and not odd_gather_groups(r, hidden, True)
        assert ((hidden - outliers) // 64) % 2 == 0


def test_a_symmetric_tied_table_keeps_the_default_64_outliers():
    """Without zero points there is nothing for the CUDA gather to misread: an odd count a row is kept (Qwen2.5-0.5B's
    896 - 64 = 13 groups of 64), not bumped to 128 outlier channels at 8 bits."""
    from awq_edge.export.decoder import odd_gather_groups, resolve_head

    opts = replace(export_options("ort", dtype="fp16"), head_bits=4, head_symmetric=True)
    r = resolve_head(opts, 151936, 896, tied=True)
    assert (r.head_bits, r.head_outliers) == (4, 64) and not odd_gather_groups(r, 896, True)


def test_an_odd_tied_4_bit_table_for_the_gpu_is_one_clear_error(tmp_path):
    """Asked for explicitly in fp16 (the GPU's export), a tied 4-bit table of an odd number of groups a row stops
    before any file is written; symmetric (no zero points), fp32 or an even count export."""
    write_checkpoint(tmp_path / "ck")  # tied, hidden size 128
    (tmp_path / "ck" / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": [1.0] * 128}))
    odd = {"head_bits": 4, "head_outliers": 0, "head_group": 128}  # one group a row
    with pytest.raises(AwqEdgeError, match="1 groups a row .* odd number of groups a row wrongly"):
        export(tmp_path / "ck", tmp_path / "bad", export_options("ort", dtype="fp16", **odd))
    assert not (tmp_path / "bad").exists()
    assert main(["export", str(tmp_path / "ck"), "-o", str(tmp_path / "cli"), "--dtype", "fp16", "--head-bits", "4",
                 "--head-outliers", "0", "--head-group", "128"]) != 0
    for name, extra in {"sym": {"dtype": "fp16", "head_symmetric": True}, "fp32": {},
                        "even": {"dtype": "fp16", "head_group": 64}}.items():
        export(tmp_path / "ck", tmp_path / name, export_options("ort", **{**odd, **extra}))


@pytest.mark.parametrize("value", [-1, 2.5, "64"])
def test_head_outliers_must_be_a_whole_number(value):
    with pytest.raises(AwqEdgeError, match="is not a whole number >= 0"):
        export_options("ort", head_outliers=value)


def test_a_checkpoint_without_statistics_is_measured_on_builtin_text_as_before(tmp_path, capsys):
    model, _ = write_checkpoint(tmp_path / "ck")
    save_tiny_tokenizer(tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "a", export_options("ort", head_calib="checkpoint", head_group=32))
    assert "holds no head statistics" in capsys.readouterr().out
    export(tmp_path / "ck", tmp_path / "b", export_options("ort", head_calib="builtin", head_group=32))
    assert json.loads((tmp_path / "a" / "awq_edge_export.json").read_text())["head_outliers"] == 64  # split too
    assert (tmp_path / "a" / "model.onnx.data").read_bytes() == (tmp_path / "b" / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("content, needle", [
    ("{not json", "is not awq-edge's head statistics"),
    ('{"final_norm_sq_mean": [1.0, 2.0]}', "does not hold 128 finite non-negative numbers"),
    ('{"final_norm_sq_mean": ' + json.dumps([-1.0] * 128) + "}", "does not hold 128 finite"),
    ('{"other": 1}', "is not awq-edge's head statistics"),
])
def test_broken_head_statistics_are_one_clear_error(tmp_path, content, needle):
    write_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / HEAD_STATS_FILE).write_text(content)
    with pytest.raises(AwqEdgeError, match=needle):
        Checkpoint(tmp_path / "ck").head_moments()


def test_head_bits_0_keeps_the_float_head_with_the_other_defaults(tmp_path, capsys):
    model, _ = write_checkpoint(tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), "-o", str(tmp_path / "onnx"), "--head-bits", "0"]) == 0
    info = json.loads((tmp_path / "onnx" / "awq_edge_export.json").read_text())
    assert info["head_bits"] == 0 and info["accuracy_level"] == 4 and info["head_outliers"] == 0
    nodes = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph.node
    assert not any(n.op_type == "MatMulNBits" and n.name.startswith("lm_head") for n in nodes)
