"""onnxruntime-gpu: our exported folders on the CUDA execution provider, against PyTorch on the same dequantised
weights, through OrtDecoder, `awq-edge generate --provider cuda`, awq_edge.load and onnxruntime-genai-cuda.
Skipped where onnxruntime has no CUDA execution provider."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_export import PROMPT, write_checkpoint
from test_runtime import genai_greedy, save_byte_tokenizer

import awq_edge
from awq_edge.cli import main
from awq_edge.export.api import export, export_options
from awq_edge.runtime.generate import generate
from awq_edge.runtime.ort import OrtDecoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                                  reason="needs onnxruntime-gpu with the CUDA execution provider")]
# name -> (export_options overrides, max |logit diff| / max |logit| against PyTorch fp32). The CUDA provider's
# float32 matrix products use TF32 (its default): 2.1e-4 measured on an H100 where the CPU gives 1e-5.
EXPORTS = {"exact_fp32": ({"exact": True}, 1e-3), "exact_fp16": ({"exact": True, "dtype": "fp16"}, 2e-2),
           "default_fp16": ({"dtype": "fp16"}, None)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ortcuda")
    model, _ = write_checkpoint(root / "ck", tied=True)
    save_byte_tokenizer(root / "ck")
    moments = (torch.rand(128, generator=torch.Generator().manual_seed(0)) * 4).tolist()  # a non-trivial channel order
    (root / "ck" / "awq_edge_head_stats.json").write_text(json.dumps({"final_norm_sq_mean": moments}))
    return {n: export(root / "ck", root / n, export_options("ort", **o)) for n, (o, _) in EXPORTS.items()}, model


@pytest.mark.parametrize("name", ["exact_fp32", "exact_fp16"])
def test_cuda_logits_match_pytorch_prefill_and_steps(folders, name):
    out, model = folders
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    d = OrtDecoder(out[name], provider="cuda")
    steps = np.concatenate([d.forward(PROMPT[:5])] + [d.forward([t]) for t in PROMPT[5:]])
    assert np.isfinite(steps).all() and np.abs(steps - ref).max() < EXPORTS[name][1] * np.abs(ref).max()


@pytest.mark.parametrize("name", ["exact_fp32", "exact_fp16"])  # the default's int8 activations are CPU-only
def test_cuda_greedy_tokens_equal_the_cpu_providers(folders, name):
    out, _ = folders
    tokens = {}
    for provider in ("cpu", "cuda"):
        d = OrtDecoder(out[name], provider=provider)
        d.eos_ids = set()
        tokens[provider] = list(generate(d, PROMPT, 16))
    assert len(tokens["cuda"]) == 16 and tokens["cuda"] == tokens["cpu"]


@pytest.mark.parametrize("name, shared", [("exact_fp16", True), ("exact_fp32", False)])
def test_cuda_keeps_the_kv_cache_on_the_gpu(folders, name, shared):
    """fp16: one buffer per layer read and written in place; fp32 (no CUDA GroupQueryAttention): the present
    outputs, bound to the GPU."""
    d = OrtDecoder(folders[0][name], provider="cuda")
    d.forward(PROMPT)
    d.forward([3])
    assert d.shared == shared and all(v.device_name().lower() == "cuda" for v in d.cache)


def test_generate_cli_and_load_run_on_cuda(folders, capsys):
    folder = folders[0]["exact_fp16"]
    assert main(["generate", str(folder), "--provider", "cuda", "--prompt", "hi", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    model = awq_edge.load(folder, provider="cuda")
    assert model.generate(PROMPT, max_new_tokens=8) == list(generate(OrtDecoder(folder), PROMPT, 8))[:8]


@pytest.mark.parametrize("name", ["exact_fp16", "default_fp16"])
def test_onnxruntime_genai_cuda_gives_our_backends_greedy_tokens(folders, name):
    og = pytest.importorskip("onnxruntime_genai")
    folder = folders[0][name]
    config = og.Config(str(folder))
    config.clear_providers()
    config.append_provider("cuda")
    theirs = genai_greedy(og.Model(config), PROMPT, 12)
    d = OrtDecoder(folder, provider="cuda")
    d.eos_ids = set()
    assert len(theirs) >= 8 and theirs == list(generate(d, PROMPT, len(theirs)))
