"""Bad input the fuzz suite (tests/test_fuzz.py, issue 20) found, each a named case as in tests/test_bad_input.py:
one `error: ... (fix: ...)` line, exit 2, nothing written, the inputs unchanged; and the values beside them that
must still work."""

import json
import math
import random

import numpy as np
import pytest
from test_bad_input import ROOT, Case, damaged_copy, fx, gen, q, refused_and_unchanged, write
from test_runtime_trt import _manifest

import awq_edge
from awq_edge.errors import AwqEdgeError

assert fx  # the inputs' fixture, shared with tests/test_bad_input.py


def calib(name: str, data: bytes):
    def argv(tmp, fx):
        (tmp / name).write_bytes(data)
        return q(tmp, fx, "--group-size", "32", "--calib", tmp / name)
    return argv


def profile(data: bytes = None, **changes):
    """`awq-edge devices` of rtx-4090's profile with keys changed, or of a file holding data."""
    def argv(tmp, fx):
        if data is not None:
            (tmp / "my.toml").write_bytes(data)
            return ["devices", tmp / "my.toml"]
        lines = (ROOT / "devices" / "rtx-4090.toml").read_text().splitlines()
        kept = [line for line in lines if line.split(" = ")[0] not in changes]
        (tmp / "my.toml").write_text("\n".join(kept + [f"{k} = {v}" for k, v in changes.items()]) + "\n")
        return ["devices", tmp / "my.toml"]
    return argv


def export_with(file: str, edit):
    """generate on a copy of the export whose `file` (JSON) went through edit."""
    def argv(tmp, fx):
        def damage(d):
            doc = json.loads((d / file).read_text())
            edit(doc)
            (d / file).write_text(json.dumps(doc))
        return ["generate", damaged_copy(fx["onnx"], tmp / "onnx", damage), "--prompt", "hi", "--max-new-tokens", "2"]
    return argv


def engine_with(edit):
    """generate --backend trt on an engine folder whose manifest.json went through edit."""
    def argv(tmp, fx):
        record, engine = _manifest(tmp)
        edit(record)
        (engine / "manifest.json").write_text(json.dumps(record))
        return ["generate", engine, "--backend", "trt", "--prompt", "hi"]
    return argv


def decoder(key, value):
    return lambda doc: doc["model"]["decoder"].update({key: value})


CASES = [
    # sampling options: a number of the wrong kind was garbage or a traceback
    Case("generate --seed -1", lambda tmp, fx: gen(tmp, fx, "--seed", "-1"), ("seed -1 is not a count",
                                                                              "--seed 0 or more")),
    Case("generate --temperature nan", lambda tmp, fx: gen(tmp, fx, "--temperature", "nan"),
         ("temperature nan is not a finite number",)),
    Case("generate --temperature inf", lambda tmp, fx: gen(tmp, fx, "--temperature", "inf"),
         ("temperature inf is not a finite number",)),
    Case("generate --top-p nan", lambda tmp, fx: gen(tmp, fx, "--top-p", "nan"), ("top_p nan",)),
    # quantize --max-gpu-memory: NaN and inf were a traceback, 0 and negatives taken
    *[Case(f"quantize --max-gpu-memory {v}", lambda tmp, fx, v=v: q(tmp, fx, "--max-gpu-memory", v),
           ("--max-gpu-memory", "finite number of GiB > 0")) for v in ("nan", "inf", "-1", "0")],
    # a --seqlen past int64 overflowed torch's view of the text's blocks
    Case("quantize --seqlen 99999999999999999999", lambda tmp, fx: q(
        tmp, fx, "--method", "awq", "--calib", write(tmp / "c.txt", "w3 w4 " * 50), "--n-samples", "1", "--seqlen",
        "99999999999999999999"), ("--seqlen 99999999999999999999: a calibration block needs at least 2 tokens",)),
    Case("eval --seqlen 99999999999999999999", lambda tmp, fx: [
        "eval", fx["float"], "--text", write(tmp / "t.txt", "w3 w4"), "--seqlen", "99999999999999999999"],
         ("fewer than one window of 99999999999999999999",)),
    # calibration text: bytes that are not UTF-8 and NULs were calibrated on
    Case("quantize --calib a binary file", calib("c.txt", random.Random(0).randbytes(4000)), ("not UTF-8 text",)),
    Case("quantize --calib Latin-1 text", calib("c.txt", "w3 caf\u00e9 w4".encode("latin-1")), ("not UTF-8 text",)),
    Case("quantize --calib UTF-16 text", calib("c.txt", "w3 w4 w5".encode("utf-16-le")), ("NUL bytes",)),
    Case("quantize --calib .jsonl that is not UTF-8", calib("c.jsonl", b'{"text": "caf\xe9"}\n'), ("not UTF-8",)),
    # device profiles
    Case("devices a .toml that is not UTF-8", profile(b'description = "caf\xe9"\n'), ("is not UTF-8 text",)),
    Case("devices a folder named .toml", lambda tmp, fx: ["devices", (tmp / "my.toml").mkdir() or tmp / "my.toml"],
         ("cannot be read",)),
    Case("devices memory_gib = inf", profile(memory_gib="inf"), ("memory_gib = inf is not a positive number",
                                                                  "finite")),
    Case("devices description = 1.5", profile(description="1.5"), ("description = 1.5 is not a string",)),
    # the export's own files
    Case("generate an export whose accuracy_level is true", export_with(
        "awq_edge_export.json", lambda d: d.update(accuracy_level=True)), ("accuracy_level True is not an integer",)),
    Case("generate an export whose genai_config.json counts other layers", export_with(
        "genai_config.json", decoder("num_hidden_layers", 3)), ("KV cache of 2 layers", "says 3")),
    Case("generate an export whose genai_config.json has another head size", export_with(
        "genai_config.json", decoder("head_size", 16)), ("(KV heads, head size) (2, 32)", "says (2, 16)")),
    # the engine's manifest
    Case("generate --backend trt a manifest naming another module", engine_with(
        lambda m: m["tensorrt"].update(module="os")), ("tensorrt.module",)),
    Case("generate --backend trt a manifest naming no module", engine_with(
        lambda m: m["tensorrt"].update(module="")), ("tensorrt.module",)),
    Case("generate --backend trt a plugin outside the engine folder", engine_with(
        lambda m: m.update(plugin_library="../libx.so")), ("not a file name beside the engine",)),
    Case("generate --backend trt a kv_cache of true layers", engine_with(
        lambda m: m["kv_cache"].update(layers=True)), ("kv_cache",)),
    Case("generate --backend trt a prefill profile without shapes", engine_with(
        lambda m: m["optimization_profiles"][0].update(shapes={})), ("prefill profile without the shapes",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fuzzed_bad_input_is_one_clear_line_and_changes_nothing(case, tmp_path, fx, capsys):
    refused_and_unchanged(case, tmp_path, fx, capsys)


# ---- the Python API: every wrong sampling value is an AwqEdgeError, never another exception

@pytest.fixture(scope="module")
def model(fx):
    return awq_edge.load(fx["onnx"])


@pytest.mark.parametrize("call", ["generate", "stream", "chat"])
@pytest.mark.parametrize("options", [
    {"temperature": "hot"}, {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": None},
    {"top_p": math.nan}, {"top_p": [0.5]}, {"top_k": 2.5}, {"top_k": True}, {"top_k": -1}, {"seed": -1},
    {"seed": 1e30}, {"seed": True}, {"seed": []}, {"max_new_tokens": 2.0}, {"temprature": 0.5},
], ids=repr)
def test_a_wrong_sampling_value_in_the_api_is_an_awq_edge_error(model, call, options):
    options = {"max_new_tokens": 2, **options}
    with pytest.raises(AwqEdgeError, match=r"\(fix: "):
        if call == "chat":
            model.chat([{"role": "user", "content": "hi"}], **options)
        else:
            "".join(getattr(model, call)("hi", **options))


def test_numpy_numbers_are_taken_as_sampling_values(model):
    assert model.generate("hi", max_new_tokens=np.int64(2), temperature=np.float32(0.5), top_k=np.int32(3),
                          seed=np.uint8(1)) == model.generate("hi", max_new_tokens=2, temperature=0.5, top_k=3, seed=1)


def test_a_top_k_wider_than_the_vocabulary_samples_as_no_limit(model):
    wide = model.generate("hi", max_new_tokens=4, temperature=0.8, top_k=10**30, seed=3)
    assert wide == model.generate("hi", max_new_tokens=4, temperature=0.8, top_k=0, seed=3)


def test_a_huge_seed_is_a_seed(model):
    assert isinstance(model.generate("hi", max_new_tokens=2, temperature=0.8, seed=10**30), str)


@pytest.mark.parametrize("folder", [None, 5, ["a"]], ids=repr)
def test_load_of_a_folder_that_is_not_a_path_is_an_awq_edge_error(folder):
    with pytest.raises(AwqEdgeError, match="is not a path"):
        awq_edge.load(folder)


@pytest.mark.parametrize("n_samples,seqlen,source", [("1", 16, "c.txt"), (1.5, 16, "c.txt"), (1, math.nan, "c.txt"),
                                                     (True, 16, "c.txt"), (1, 16, 5)], ids=repr)
def test_calibration_blocks_of_counts_or_a_source_of_the_wrong_type_is_an_awq_edge_error(n_samples, seqlen, source):
    from conftest import tiny_tokenizer

    from awq_edge.quantizer.calib import calibration_blocks

    with pytest.raises(AwqEdgeError, match=r"\(fix: "):
        calibration_blocks(tiny_tokenizer(), source, n_samples, seqlen)


def test_an_export_whose_cache_is_not_four_dimensional_is_refused_naming_its_shape(tmp_path):
    from types import SimpleNamespace as Value

    from awq_edge.runtime.ort import check_graph

    inputs = {"input_ids": Value(type="tensor(int64)", shape=["b", "s"]),
              "attention_mask": Value(type="tensor(int64)", shape=["b", "t"]),
              "past_key_values.0.key": Value(type="tensor(float)", shape=["b", 2, "p"]),
              "past_key_values.0.value": Value(type="tensor(float)", shape=["b", 2, "p"])}
    with pytest.raises(AwqEdgeError, match=r"KV cache of shape \['b', 2, 'p'\]"):
        check_graph(tmp_path, inputs, {"logits": Value(shape=["b", "s", 256])}, 1, (2, 32))
    inputs["past_key_values.0.key"].shape = ["b", 2, "p", 32]
    check_graph(tmp_path, inputs, {"logits": Value(shape=["b", "s", 256])}, 1, (2, 32))
