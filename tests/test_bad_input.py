"""Bad input and faults across every command: one `error: ... (fix: ...)` line, a non-zero exit, checked before
the work, nothing written at or beside the output, nothing that was there before lost.

CASES are run through `awq-edge` in this process; docs/errors.md's bad-input table lists each by its name
(test_readme_table_lists_every_case). Faults that need a signal, a pipe or a chat session have their own tests.
"""

import errno
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import pytest
from awq_edge.export.api import export
from conftest import chat_session, save_tiny_tokenizer, tiny_model
from test_engine import tiny_decoder, write_onnx_dir
from test_export import write_checkpoint
from test_runtime import save_byte_tokenizer

from awq_edge import outputs
from awq_edge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def hf_folder(path: Path) -> Path:
    tiny_model("llama").save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Inputs every case may read (never write): a float folder, a checkpoint of ours, an AutoAWQ one, an export."""
    root = tmp_path_factory.mktemp("inputs")
    float_dir = hf_folder(root / "float")
    ours = root / "ours"
    assert main(["quantize", str(float_dir), "-o", str(ours), "--method", "rtn", "--group-size", "32"]) == 0
    write_checkpoint(root / "ck")
    save_byte_tokenizer(root / "ck")
    onnx_dir = export(root / "ck", root / "onnx")
    trt_dir = write_onnx_dir(root / "trt", tiny_decoder("native"))  # what rtx-4090 builds (test_engine_build)
    return {"float": float_dir, "ours": ours, "ck": root / "ck", "onnx": onnx_dir, "trt": trt_dir}


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def snapshot(root: Path) -> dict:
    """Every file and folder under root with its bytes: equal before and after means nothing written or lost."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run(capsys, *argv) -> tuple:
    """(exit code, stderr lines, stdout) of `awq-edge argv` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def assert_one_clear_line(code, lines, out, *needles):
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "error:" in lines[0] and "(fix: " in lines[0] and lines[0].endswith(")"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---- a float model folder broken in one way (each a copy of fx["float"])

def renamed_tensor(d: Path):
    from safetensors.torch import load_file, save_file

    t = load_file(d / "model.safetensors")
    t["model.embed_tokens.weights"] = t.pop("model.embed_tokens.weight")
    save_file(t, d / "model.safetensors")


def wrong_shape_config(d: Path):
    c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(c))


def truncate(path: Path, keep: float = 0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@dataclass
class Case:
    name: str  # as in README.md's table
    argv: Callable  # (tmp_path, fx) -> argv, after preparing whatever it needs under tmp_path
    needles: tuple


def float_copy(tmp, fx, damage=None):
    d = copy_folder(fx["float"], tmp / "model")
    if damage:
        damage(d)
    return d


def q(tmp, fx, *extra, damage=None, out=None):
    return ["quantize", float_copy(tmp, fx, damage), "-o", out or tmp / "q", "--method", "rtn", *extra]


def older_checkpoint_with_notes(tmp, fx):
    ck = copy_folder(fx["ours"], tmp / "q")
    (ck / "NOTES.md").write_text("my notes")
    return q(tmp, fx, "--group-size", "32", out=ck)


def another_models_folder(tmp, fx):
    return q(tmp, fx, "--group-size", "32", out=copy_folder(fx["float"], tmp / "other-model"))


def existing_file(tmp, fx):
    (tmp / "q").write_text("not a folder")
    return q(tmp, fx, "--group-size", "32")


def calib_file(content):
    def argv(tmp, fx):
        (tmp / "c.jsonl").write_text(content)
        return q(tmp, fx, "--group-size", "32", "--calib", tmp / "c.jsonl")
    return argv


def checkpoint_with(damage):
    def argv(tmp, fx):
        ck = copy_folder(fx["ck"], tmp / "ck")
        damage(ck)
        return ["export", ck, "-o", tmp / "onnx"]
    return argv


def onnx_with(damage, *extra):
    def argv(tmp, fx):
        d = copy_folder(fx["onnx"], tmp / "onnx")
        damage(d)
        return ["build", d, "--device", "rtx-4090", "-o", tmp / "engine", *extra]
    return argv


def gen(tmp, fx, *extra, prompt="hi"):
    return ["generate", fx["onnx"], "--prompt", prompt, "--max-new-tokens", "4", *extra]


def cuda_provider_missing(tmp, fx):
    """The generate --provider cuda case's argv where onnxruntime has no CUDA provider (the refusal it shows)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: tests/test_runtime_ort_cuda.py runs it")
    return gen(tmp, fx, "--provider", "cuda")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def damaged_copy(src: Path, dst: Path, damage) -> Path:
    damage(copy_folder(src, dst))
    return dst


def latin1(path: Path) -> Path:
    path.write_bytes("w3 caf\u00e9 w4".encode("latin-1"))
    return path


def base_model_export(tmp, fx):
    d = copy_folder(fx["onnx"], tmp / "base")
    for f in [*d.glob("tokenizer*"), *d.glob("chat_template*")]:
        f.unlink()
    save_tiny_tokenizer(d)  # the word-level tokenizer has no chat template
    return d


def same_folder(tmp, fx):
    d = float_copy(tmp, fx)
    return ["quantize", d, "-o", d, "--method", "rtn", "--group-size", "32"]


def folder_above(tmp, fx):
    float_copy(tmp, fx)
    return ["quantize", tmp / "model", "-o", tmp, "--method", "rtn", "--group-size", "32"]


CASES = [
    # quantize: the output
    Case("quantize -o the input model folder", same_folder, ("is the input",)),
    Case("quantize -o a folder holding the input", folder_above, ("holds the input",)),
    Case("quantize -o another model's folder", another_models_folder, ("not an awq-edge checkpoint",)),
    Case("quantize -o an older checkpoint with the user's files", older_checkpoint_with_notes,
         ("files awq-edge did not write (NOTES.md)",)),
    Case("quantize -o an existing file", existing_file, ("is a file",)),
    # quantize: options
    *[Case(f"quantize --group-size {g}", lambda tmp, fx, g=g: q(tmp, fx, "--group-size", g), ("power of two",))
      for g in ("0", "-1", "7", "48")],
    Case("quantize --group-size abc", lambda tmp, fx: q(tmp, fx, "--group-size", "abc"), ("invalid int value",)),
    *[Case(f"quantize --w-bit {b}", lambda tmp, fx, b=b: q(tmp, fx, "--w-bit", b), ("4-bit weights only",))
      for b in ("0", "16")],
    Case("quantize --device tpu", lambda tmp, fx: q(tmp, fx, "--device", "tpu"), ("'tpu' is not one of",)),
    Case("quantize --n-samples 0", lambda tmp, fx: q(tmp, fx, "--n-samples", "0"), ("at least one sample",)),
    Case("quantize --seqlen 1", lambda tmp, fx: q(tmp, fx, "--seqlen", "1"), ("at least 2 tokens",)),
    Case("quantize --keep-8bit -1", lambda tmp, fx: q(tmp, fx, "--keep-8bit", "-1"), ("negative",)),
    Case("quantize -o below a file", lambda tmp, fx: q(tmp, fx, "--group-size", "32", out=write(tmp / "f", "x") / "q"),
         ("f is a file",)),
    Case("quantize without -o", lambda tmp, fx: ["quantize", float_copy(tmp, fx)], ("-o/--output",)),
    # quantize: the input
    Case("quantize a config.json that is not JSON", lambda tmp, fx: q(
        tmp, fx, damage=lambda d: write(d / "config.json", "{model_type: llama")), ("not valid JSON",)),
    Case("quantize a config.json that is a JSON list", lambda tmp, fx: q(
        tmp, fx, damage=lambda d: write(d / "config.json", "[1, 2]")), ("JSON list, not an object",)),
    Case("quantize a model with a renamed tensor", lambda tmp, fx: q(tmp, fx, damage=renamed_tensor),
         ("lacks 1 tensor(s)", "model.embed_tokens.weight")),
    Case("quantize weights that do not match config.json", lambda tmp, fx: q(tmp, fx, damage=wrong_shape_config),
         ("has shape", "config.json implies")),
    Case("quantize a truncated tokenizer.json", lambda tmp, fx: q(
        tmp, fx, damage=lambda d: truncate(d / "tokenizer.json")), ("tokenizer.json is not valid JSON",)),
    Case("quantize a truncated model.safetensors", lambda tmp, fx: q(
        tmp, fx, damage=lambda d: truncate(d / "model.safetensors", 0.9)), ("truncated",)),
    Case("quantize an AWQ checkpoint", lambda tmp, fx: ["quantize", fx["ours"], "-o", tmp / "q"],
         ("already quantised", "float model")),
    Case("quantize a missing folder", lambda tmp, fx: ["quantize", tmp / "nope", "-o", tmp / "q"], ("not found",)),
    Case("quantize --calib .jsonl whose text is a number", calib_file('{"text": 42}\n'), ('"text" is 42',)),
    Case("quantize --calib .jsonl whose text is null", calib_file('{"text": null}\n'), ('"text" is null',)),
    Case("quantize --calib .jsonl line that is not an object", calib_file('["a"]\n'), ('"text" field',)),
    # eval
    Case("eval --seqlen 0", lambda tmp, fx: ["eval", fx["float"], "--text", write(tmp / "t.txt", "w3 w4"),
                                            "--seqlen", "0"], ("at least 2 tokens",)),
    Case("eval --text a missing file", lambda tmp, fx: ["eval", fx["float"], "--text", tmp / "t.txt"], ("not found",)),
    Case("eval --text that is not UTF-8", lambda tmp, fx: ["eval", fx["float"], "--text", latin1(tmp / "t.txt")],
         ("not UTF-8",)),
    Case("eval --max-tokens -5", lambda tmp, fx: ["eval", fx["float"], "--text", write(tmp / "t.txt", "w3"),
                                                  "--max-tokens", "-5"], ("negative",)),
    Case("eval without --text", lambda tmp, fx: ["eval", fx["float"]], ("--text FILE",)),
    Case("eval --device tpu", lambda tmp, fx: ["eval", fx["float"], "--text", write(tmp / "t.txt", "w3"),
                                               "--device", "tpu"], ("'tpu' is not one of",)),
    # export
    Case("export a truncated model.safetensors", checkpoint_with(lambda d: truncate(d / "model.safetensors")),
         ("truncated",)),
    Case("export a config.json that is a JSON list", checkpoint_with(lambda d: write(d / "config.json", "[]")),
         ("JSON list",)),
    Case("export -o the checkpoint folder", lambda tmp, fx: [
        "export", copy_folder(fx["ck"], tmp / "ck"), "-o", tmp / "ck"], ("is the input",)),
    Case("export an ONNX folder", lambda tmp, fx: ["export", fx["onnx"], "-o", tmp / "onnx"], ("already an exported",)),
    Case("export --head-group 48", lambda tmp, fx: ["export", fx["ck"], "-o", tmp / "onnx", "--head-group", "48"],
         ("power of two",)),
    Case("export --trt-native for onnxruntime", lambda tmp, fx: ["export", fx["ck"], "-o", tmp / "onnx",
                                                                 "--trt-native"], ("--target trt only",)),
    Case("export --head-bits 4 for TensorRT", lambda tmp, fx: ["export", fx["ck"], "-o", tmp / "onnx",
                                                               "--target", "trt", "--head-bits", "4"],
         ("--head-bits: the head is re-quantised for --target ort only",)),
    Case("export -o a non-empty folder", lambda tmp, fx: ["export", fx["ck"], "-o", tmp, "--exact"]
         if write(tmp / "mine.txt", "keep") else None, ("not an awq-edge export",)),
    # generate and chat
    Case("generate a prompt with bytes that are not UTF-8", lambda tmp, fx: gen(tmp, fx, prompt="hi \udcff"),
         ("not UTF-8",)),
    Case("generate --max-new-tokens -1", lambda tmp, fx: gen(tmp, fx, "--max-new-tokens", "-1"), ("0 or more",)),
    Case("generate --temperature -1", lambda tmp, fx: gen(tmp, fx, "--temperature", "-1"), ("--temperature >= 0",)),
    Case("generate --top-p 0", lambda tmp, fx: gen(tmp, fx, "--top-p", "0"), ("--top-p in (0, 1]",)),
    Case("generate --provider cuda without onnxruntime-gpu", cuda_provider_missing,
         ("no CUDAExecutionProvider", "awq-edge[gpu]")),
    Case("generate on a checkpoint instead of an export", lambda tmp, fx: ["generate", fx["ck"], "--prompt", "hi"],
         ("awq-edge export",)),
    Case("generate on a missing folder", lambda tmp, fx: ["generate", tmp / "nope", "--prompt", "hi"], ("not found",)),
    Case("generate --raw with an empty prompt", lambda tmp, fx: gen(tmp, fx, "--raw", prompt=""), ("prompt is empty",)),
    Case("generate with a truncated tokenizer.json", lambda tmp, fx: [
        "generate", damaged_copy(fx["onnx"], tmp / "onnx", lambda d: truncate(d / "tokenizer.json")), "--prompt", "hi"],
         ("tokenizer.json is not valid JSON",)),
    Case("eval a checkpoint with a truncated tokenizer.json", lambda tmp, fx: [
        "eval", damaged_copy(fx["ours"], tmp / "q", lambda d: truncate(d / "tokenizer.json")), "--text",
        write(tmp / "t.txt", "w3 w4")], ("tokenizer.json is not valid JSON",)),
    Case("generate --backend tpu", lambda tmp, fx: gen(tmp, fx, "--backend", "tpu"), ("invalid choice",)),
    Case("chat on a base model without a chat template", lambda tmp, fx: ["chat", base_model_export(tmp, fx)],
         ("no chat template",)),
    # devices and build
    Case("devices an unknown name", lambda tmp, fx: ["devices", "jetson-tx2"], ("unknown device 'jetson-tx2'",)),
    Case("devices --field an unknown field", lambda tmp, fx: ["devices", "rtx-4090", "--field", "speed"],
         ("no field 'speed'",)),
    Case("devices a .toml that is not TOML", lambda tmp, fx: ["devices", write(tmp / "my.toml", "name = [")],
         ("not valid TOML",)),
    Case("build a missing ONNX folder", lambda tmp, fx: ["build", tmp / "nope", "--device", "rtx-4090", "-o",
                                                         tmp / "engine"], ("does not exist",)),
    Case("build a truncated model.onnx", onnx_with(lambda d: truncate(d / "model.onnx", 0.3)),
         ("not a readable ONNX model",)),
    Case("build -o an existing file", lambda tmp, fx: ["build", fx["trt"], "--device", "rtx-4090", "-o",
                                                       write(tmp / "engine", "x")], ("is a file",)),
    Case("build -o the ONNX folder", lambda tmp, fx: ["build", copy_folder(fx["trt"], tmp / "onnx"), "--device",
                                                      "rtx-4090", "-o", tmp / "onnx"], ("is the input",)),
    Case("build -o a non-empty folder", lambda tmp, fx: ["build", fx["trt"], "--device", "rtx-4090", "-o", tmp]
         if write(tmp / "mine.txt", "keep") else None, ("not an awq-edge engine folder",)),
    Case("build an fp32 export for an fp16 device", lambda tmp, fx: ["build", fx["onnx"], "--device", "rtx-4090",
                                                                     "-o", tmp / "engine"], ("--dtype fp16",)),
    Case("devices a .toml that does not exist", lambda tmp, fx: ["devices", tmp / "mine.toml"], ("does not exist",)),
    Case("build an unknown device", lambda tmp, fx: ["build", fx["onnx"], "--device", "tpu", "-o", tmp / "e"],
         ("unknown device 'tpu'",)),
]


def table_rows() -> list:
    """docs/errors.md's bad-input table, each row's cells (a `\\|` inside a cell is a literal bar)."""
    text = (ROOT / "docs" / "errors.md").read_text()
    block = text[text.index("<!-- bad-input-table -->"):text.index("<!-- end-bad-input-table -->")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in block.splitlines() if line.startswith("| ") and not line.startswith("| case ")]


TABLE = {row[0]: row[1] for row in table_rows() if len(row) == 2}


def as_shown(line: str, tmp_path: Path, fx: dict) -> str:
    """A stderr line as the table shows it: without `awq-edge CMD: error: `, folders relative to the case's."""
    message = line.split(": error: ", 1)[1]
    for base in (tmp_path, fx["float"].parent):
        message = message.replace(f"{base}/", "").replace(str(base), ".")
    return message


def refused_and_unchanged(case, tmp_path, fx, capsys) -> str:
    """The case's one error line, once it is known that nothing under tmp_path or in the inputs changed."""
    argv = case.argv(tmp_path, fx)
    inputs_before = {k: snapshot(v) for k, v in fx.items()}
    before = snapshot(tmp_path)
    capsys.readouterr()
    code, lines, out = run(capsys, *argv)
    assert_one_clear_line(code, lines, out, *case.needles)
    assert snapshot(tmp_path) == before
    assert {k: snapshot(v) for k, v in fx.items()} == inputs_before
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, tmp_path, fx, capsys):
    # The table's message is the whole line; "…" stands for what depends on the machine (versions, providers).
    shown = as_shown(refused_and_unchanged(case, tmp_path, fx, capsys), tmp_path, fx)
    assert re.fullmatch(re.escape(TABLE[case.name]).replace("…", ".*"), shown), f"the line is: {shown}"


def assert_line_of_named_row(case, test, tmp_path, fx, capsys) -> None:
    """The case's one error line is the message (in backticks) of the table row that names `test`."""
    shown = as_shown(refused_and_unchanged(case, tmp_path, fx, capsys), tmp_path, fx)
    me = f"`{test.__name__}`"
    row = next(re.search("`([^`]*)`", r[1]).group(1) for r in table_rows() if len(r) == 3 and r[2] == me)
    assert re.fullmatch(re.escape(row).replace("…", ".*"), shown), f"the line is: {shown}"


def test_provider_cuda_with_both_onnxruntime_wheels_names_the_uninstall(tmp_path, fx, capsys, monkeypatch):
    """`pip install 'awq-edge[gpu]'` leaves onnxruntime and onnxruntime-gpu side by side and the CPU module wins
    (tried on the CPU machine): the refusal then names the two commands that leave only the GPU wheel."""
    from awq_edge.runtime import ort as ort_backend

    monkeypatch.setattr(ort_backend, "_installed", lambda distribution: True)
    case = Case("generate --provider cuda with both wheels", cuda_provider_missing,
                ("hides onnxruntime-gpu", "--no-deps onnxruntime-gpu"))
    assert_line_of_named_row(case, test_provider_cuda_with_both_onnxruntime_wheels_names_the_uninstall, tmp_path,
                             fx, capsys)


def test_provider_cuda_that_cannot_start_is_one_line_not_a_silent_cpu_run(tmp_path, fx, capsys, monkeypatch):
    """onnxruntime-gpu on a machine without a usable GPU or CUDA libraries creates the session on the CPU with only a
    warning (tried on the CPU machine with onnxruntime-gpu 1.31.1): `--provider cuda` must refuse instead. Here the
    CPU wheel is handed the CUDA provider's name, which it likewise drops."""
    from awq_edge.runtime import ort as ort_backend

    monkeypatch.setattr(ort_backend, "execution_providers", lambda p: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    case = Case("generate --provider cuda where it cannot start", lambda tmp, f: gen(tmp, f, "--provider", "cuda"),
                ("could not start its CUDAExecutionProvider", "--provider cpu"))
    assert_line_of_named_row(case, test_provider_cuda_that_cannot_start_is_one_line_not_a_silent_cpu_run, tmp_path,
                             fx, capsys)


# ---- faults found at the output, refused before the work

def test_quantize_into_a_read_only_place_is_refused_before_the_work(tmp_path, fx, capsys, monkeypatch):
    # Root may write anywhere, so the read-only file system is what os.access reports for it.
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    argv = q(tmp_path, fx, "--group-size", "32")
    before = snapshot(tmp_path)
    assert_one_clear_line(*run(capsys, *argv), "is not writable")
    assert snapshot(tmp_path) == before


def test_quantize_onto_a_full_disk_is_refused_before_the_work(tmp_path, fx, capsys, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    argv = q(tmp_path, fx, "--group-size", "32")
    before = snapshot(tmp_path)
    assert_one_clear_line(*run(capsys, *argv), "MiB free")
    assert snapshot(tmp_path) == before


def test_a_write_error_at_the_end_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, fx, capsys, monkeypatch):
    out = copy_folder(fx["ours"], tmp_path / "q")
    before = snapshot(tmp_path)
    argv = ["quantize", fx["float"], "-o", out, "--method", "rtn", "--group-size", "32"]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("awq_edge.checkpoint.writer.save_file", no_space)
    code, lines, _ = run(capsys, *argv)
    # Found after the work, so the progress lines come first; the error is the last line, no traceback.
    assert_one_clear_line(code, lines[-1:], "", "No space left on device")
    assert not any("Traceback" in line for line in lines)
    assert snapshot(tmp_path) == before


# ---- writing over an earlier output: replaced whole, nothing beside it

def test_quantize_replaces_its_own_checkpoint_and_leaves_nothing_beside_it(tmp_path, fx, capsys):
    out = copy_folder(fx["ours"], tmp_path / "q")
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["quantize", str(fx["float"]), "-o", str(out), "--method", "rtn", "--group-size", "32"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert (out / "model.safetensors").read_bytes() == (fx["ours"] / "model.safetensors").read_bytes()


def test_quantize_dash_o_dot_in_an_earlier_checkpoint_leaves_no_folder_inside_or_beside(tmp_path, fx, monkeypatch):
    out = copy_folder(fx["ours"], tmp_path / "q")
    monkeypatch.chdir(out)
    assert main(["quantize", str(fx["float"]), "-o", ".", "--method", "rtn", "--group-size", "32"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_ctrl_c_while_writing_keeps_the_earlier_checkpoint_and_leaves_nothing_beside_it(tmp_path, fx, capsys,
                                                                                        monkeypatch):
    out = copy_folder(fx["ours"], tmp_path / "q")
    before = snapshot(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("awq_edge.checkpoint.writer.save_file", interrupted)
    code, lines, _ = run(capsys, "quantize", fx["float"], "-o", out, "--method", "rtn", "--group-size", "32")
    assert code == 130 and lines[-1] == "awq-edge quantize: interrupted"
    assert snapshot(tmp_path) == before


def test_a_signal_during_the_swap_waits_until_the_new_folder_is_in_place_and_the_old_one_gone(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / ".out.tmp-1"
    out.mkdir()
    (out / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    real_replace = os.replace

    def replace_then_ctrl_c(src, dst):
        real_replace(src, dst)
        signal.raise_signal(signal.SIGINT)  # to this thread: delivered before the call returns

    monkeypatch.setattr(outputs.os, "replace", replace_then_ctrl_c)
    # Python's own Ctrl-C handler, whatever was inherited: a suite started as a background job (`make test &`)
    # inherits SIGINT ignored, and then no KeyboardInterrupt comes (two clean-clone runs failed so).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            outputs.replace_dir(tmp, out)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "a").read_text() == "new"


def test_sigterm_during_export_removes_its_temporary_folder_and_keeps_the_earlier_export(tmp_path, fx, capsys,
                                                                                         monkeypatch):
    out = export(fx["ck"], tmp_path / "onnx")
    before = snapshot(tmp_path)
    real_save = onnx.save_model

    def save_then_sigterm(*args, **kwargs):
        real_save(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # to this thread: delivered before the call returns

    monkeypatch.setattr(onnx, "save_model", save_then_sigterm)
    code, lines, _ = run(capsys, "export", fx["ck"], "-o", out, "--exact")
    assert code == 143 and lines == ["awq-edge export: terminated"]
    assert snapshot(tmp_path) == before


def test_a_temporary_folder_left_by_a_killed_run_is_removed_by_the_next(tmp_path, fx, capsys):
    dead = 2**22 + 12345  # above the kernel's default pid_max, so no process has it
    stale = tmp_path / f".onnx.tmp-{dead}"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    assert run(capsys, "export", fx["ck"], "-o", tmp_path / "onnx", "--exact")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


# ---- generate and chat

def test_generate_into_a_closed_pipe_is_one_line_and_exit_141(fx, capsys, monkeypatch):
    r, w = os.pipe()
    os.close(r)

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return w

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code, lines, _ = run(capsys, "generate", fx["onnx"], "--prompt", "hi", "--max-new-tokens", "8")
    os.close(w)
    assert code == 141 and len(lines) == 1 and "output pipe was closed" in lines[0] and "fix:" in lines[0]


def test_chat_reports_an_over_long_message_and_answers_the_next(fx, capsys, monkeypatch):
    chat_session(monkeypatch, ["hi"])
    fresh = run(capsys, "chat", fx["onnx"], "--max-new-tokens", "4")
    chat_session(monkeypatch, ["x" * 400, "hi"])
    code, lines, out = run(capsys, "chat", fx["onnx"], "--max-new-tokens", "4")
    assert code == 0 and fresh[0] == 0
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "the model's context holds 256" in errors[0] and "/reset" in errors[0]
    assert out == fresh[2]  # the over-long turn was dropped: "hi" is answered as in a fresh session


def test_chat_ctrl_c_stops_the_answer_stays_in_the_session_and_a_second_leaves(fx, capsys, monkeypatch):
    from awq_edge.runtime import api as runner

    real_stream = runner.Model.stream
    calls = []

    def stream_interrupted_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_stream(self, *args, **kwargs)

    monkeypatch.setattr(runner.Model, "stream", stream_interrupted_once)
    chat_session(monkeypatch, ["hi", "hi", KeyboardInterrupt()])
    code, lines, out = run(capsys, "chat", fx["onnx"], "--max-new-tokens", "4")
    assert code == 130 and len(calls) == 2 and out.count("\n") == 1
    assert any("answer stopped" in line for line in lines) and lines[-1] == "awq-edge chat: interrupted"


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(fx, capsys, monkeypatch):
    chat_session(monkeypatch, [UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "hi"])
    code, lines, out = run(capsys, "chat", fx["onnx"], "--max-new-tokens", "4")
    assert code == 0 and any("not UTF-8" in line and "fix:" in line for line in lines)
    assert out.count("\n") == 1  # then "hi" was answered


def test_readme_table_lists_every_case_and_each_row_is_a_test():
    rows = table_rows()
    cases = [r[0] for r in rows if len(r) == 2]
    assert cases == [c.name for c in CASES]
    import test_engine_make

    named = [r[2].strip("`") for r in rows if len(r) == 3]
    assert len(named) >= 15 and all(callable(globals().get(n) or getattr(test_engine_make, n, None)) for n in named)
    assert len(cases) + len(named) >= 40


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_once_quantisation_starts_leaves_the_old_or_the_new_checkpoint_and_nothing_beside(tmp_path, fx, sig,
                                                                                                  code):
    import subprocess

    out = copy_folder(fx["ours"], tmp_path / "q")
    (out / "model.safetensors").write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-m", "awq_edge.cli", "quantize", str(fx["float"]), "-o", str(out),
                             "--method", "rtn", "--group-size", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # "rtn w4 g32 ..." is printed just before the layers are quantised (after the load and calibration phases).
    assert any(line.startswith("rtn w4 g32") for line in iter(proc.stdout.readline, ""))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (code, 0), err  # 0: the signal came after the checkpoint was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    new = (fx["ours"] / "model.safetensors").read_bytes()
    # Stopped: the old checkpoint, or the new one when the signal came during the swap; finished: the new one.
    assert (out / "model.safetensors").read_bytes() in ((b"old", new) if proc.returncode else (new,))


def test_a_tokenizer_rebuilt_wrongly_from_a_gguf_is_refused_in_one_line():
    """transformers 5.17 rebuilds Gemma-3's GGUF tokenizer so that every word falls apart into characters."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from awq_edge.errors import AwqEdgeError
    from awq_edge.quantizer.source import check_converted_tokenizer

    chars = {c: i for i, c in enumerate("\u2581abcdefghijklmnopqrstuvwxyz")}
    vocab = {**chars, **{f"\u2581{w}": 30 + i for i, w in enumerate(("the", "of", "and", "is", "capital"))},
             "<unk>": 99}
    apart = Tokenizer(models.BPE(vocab, []))  # no merges: characters only, though the vocabulary holds the words
    apart.normalizer = normalizers.Replace(" ", "\u2581")
    with pytest.raises(AwqEdgeError, match=r"transformers .* rebuilt from m.gguf splits words .*transformers>=5.23"):
        check_converted_tokenizer(PreTrainedTokenizerFast(tokenizer_object=apart), "m.gguf")
    whole = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    whole.normalizer = normalizers.Replace(" ", "\u2581")
    whole.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    check_converted_tokenizer(PreTrainedTokenizerFast(tokenizer_object=whole), "m.gguf")


def test_safetensors_files_without_an_index_are_read_together_and_a_name_in_two_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from awq_edge.checkpoint.hf_folder import tensor_files
    from awq_edge.errors import AwqEdgeError

    save_file({"a": torch.zeros(1)}, str(tmp_path / "part-1.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "part-2.safetensors"))
    assert tensor_files(tmp_path) == {"a": tmp_path / "part-1.safetensors", "b": tmp_path / "part-2.safetensors"}
    save_file({"a": torch.ones(1)}, str(tmp_path / "consolidated.safetensors"))
    with pytest.raises(AwqEdgeError, match="a is in both consolidated.safetensors and part-1.safetensors"):
        tensor_files(tmp_path)
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert set(tensor_files(tmp_path).values()) == {tmp_path / "model.safetensors"}  # the others are ignored
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(AwqEdgeError, match="is not a safetensors index"):
        tensor_files(tmp_path)
