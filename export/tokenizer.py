"""Copy a checkpoint's tokenizer into an export so that onnxruntime-genai reads the same ids as transformers."""

import json
import re
import shutil
from pathlib import Path

# Files a tokenizer or chat template may live in; whichever the checkpoint has are copied.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
    "generation_config.json",
)
# Decoder steps of SentencePiece-style BPE that act only on tokens a byte-level vocabulary never holds.
_SPM_DECODERS = ("ByteFallback", "Fuse", "Replace", "Strip")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def write_tokenizer(source_dir: Path, out_dir: Path, eos_ids: list) -> None:
    """Copy the tokenizer files, with tokenizer.json in the plain byte-level form when it is byte-level BPE, and
    the tokenizer's eos token set to the model's when the two disagree."""
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
    path = out_dir / "tokenizer.json"
    if not path.is_file():
        return
    tok = json.loads(path.read_text())
    if plain_byte_level(tok):
        path.write_text(json.dumps(tok, ensure_ascii=False))
    config_path = out_dir / "tokenizer_config.json"
    if eos_ids and config_path.is_file():
        config = json.loads(config_path.read_text())
        names = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
        current = config.get("eos_token")
        current = current.get("content") if isinstance(current, dict) else current
        if eos_ids[0] in names and current not in {names.get(i) for i in eos_ids}:
            # transformers 5.17's GGUF conversion names SmolLM2's bos as its eos; the model stops at eos_ids.
            config["eos_token"] = names[eos_ids[0]]
            config.pop("eos_token_id", None)
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def plain_byte_level(tok: dict) -> bool:
    """Rewrite (in place) a byte-level BPE tokenizer.json that carries SentencePiece decoding steps, byte fallback
    or an empty normaliser, as transformers 5.17 writes SmolLM2's from GGUF; True if anything changed.

    onnxruntime-genai 0.18 takes a ByteFallback/Replace decoder for a SentencePiece tokenizer and encodes most
    words as id -1. For byte-level BPE every one of those parts is a no-op in transformers: the pre-tokenizer maps
    every byte to a vocabulary symbol (fallback never fires) and no token holds '▁' or '<0xNN>' (checked here),
    so the ids and the decoded text are unchanged.
    """
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pres):
        return False
    vocab = model.get("vocab") or {}
    if any("\u2581" in t or _BYTE_TOKEN.match(t) for t in vocab):
        return False
    changed = False
    if model.get("byte_fallback"):
        model["byte_fallback"] = False
        changed = True
    norm = tok.get("normalizer")
    if norm and norm.get("type") == "Sequence" and not norm.get("normalizers"):
        tok["normalizer"] = None
        changed = True
    dec = tok.get("decoder") or {}
    if dec.get("type") == "Sequence":
        kept = [d for d in dec["decoders"] if d.get("type") not in _SPM_DECODERS]
        if len(kept) != len(dec["decoders"]):
            tok["decoder"] = kept[0] if len(kept) == 1 else {"type": "Sequence", "decoders": kept}
            changed = True
    return changed
