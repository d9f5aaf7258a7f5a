"""Calibration text: the user's file, the multi-domain text shipped with awq-edge, Python's own documentation, or
text the model writes; cut into token blocks.

The shipped text is awq_edge/data/calibration/*.txt, written for this project (licence: the project's,
Apache-2.0), so it installs with the package and needs no download. Each file is one domain; documents in a file
are separated by a line that holds only ``<|doc|>``.
"""

import ast
import json
import os
import random
import sysconfig
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from awq_edge.errors import AwqEdgeError
from awq_edge.quantizer.eval import adds_bos, bos_blocks

MIXED = "mixed"
BUILTIN = "builtin"
SAMPLED = "sampled"
SOURCES_HELP = (f"{MIXED!r} (prose, dialogue, code and several languages shipped with awq-edge, topped up with "
                f"Python's documentation), {BUILTIN!r} (Python's documentation only), {SAMPLED!r} (text the model "
                "writes), or a .txt/.jsonl file")
SEPARATOR = "<|doc|>"
DOMAINS = ("prose", "dialogue", "code", "multilingual", "math")


def split_documents(text: str) -> list[str]:
    """Documents of one domain file: the text between ``<|doc|>`` lines, stripped, empty ones dropped."""
    docs, lines = [], []
    for line in text.splitlines():
        if line.strip() == SEPARATOR:
            docs.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line)
    docs.append("\n".join(lines).strip())
    return [d for d in docs if d]


def domain_text(domain: str) -> str:
    """The raw UTF-8 text of one domain file."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown calibration domain {domain!r}; known: {', '.join(DOMAINS)}")
    return resources.files("awq_edge.data").joinpath("calibration", f"{domain}.txt").read_text(encoding="utf-8")


def mixed_documents() -> dict[str, list[str]]:
    """Each domain's documents, in file order: {"prose": [...], "dialogue": [...], ...}."""
    return {domain: split_documents(domain_text(domain)) for domain in DOMAINS}


def builtin_texts(n_chars: int) -> list:
    """Docstrings of the Python standard library, read with ast (nothing is imported).

    English prose about many subjects, present on every machine that runs us,
    so calibration needs no download. Files are visited in a fixed shuffled
    order so the text is spread over the library, not its first modules.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not ({"test", "tests", "idlelib", "site-packages"} & set(p.parts)))
    random.Random(0).shuffle(files)
    texts, total = [], 0
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    texts.append(doc)
                    total += len(doc)
        if total >= n_chars:
            break
    return texts


class _Progress(LogitsProcessor):
    """Counts generated tokens on a progress bar; leaves the scores alone."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(input_ids.shape[0])
        return scores


@torch.no_grad()
def sampled_blocks(model, tokenizer, n_samples: int, seqlen: int, device: str = "cpu", seed: int = 0,
                   progress: bool = True) -> torch.Tensor:
    """[n, seqlen] tokens the model itself writes, each from a random first token (as in LLM-QAT).

    Data-free: the activations seen are the model's own distribution, with no
    domain chosen for it. Sampled at temperature 1 and never stopped early.
    """
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    first = vocab[torch.randint(len(vocab), (n_samples, 1), generator=g)]
    if adds_bos(tokenizer):  # a model that always runs after BOS (Gemma) samples after it too
        first = torch.cat([torch.full_like(first, tokenizer.bos_token_id), first], dim=1)
    torch.manual_seed(seed)
    blocks = []
    new = seqlen - first.shape[1]
    with tqdm(total=n_samples * new, desc="calibration: sampling text", unit="tok", disable=not progress) as bar:
        for batch in first.split(32):
            out = model.generate(input_ids=batch.to(device), attention_mask=torch.ones_like(batch, device=device),
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=tokenizer.eos_token_id, logits_processor=LogitsProcessorList([_Progress(bar)]))
            blocks.append(out[:, :seqlen].cpu())
    return torch.cat(blocks)


def read_texts(path: Path) -> list:
    """Plain text (one document) or JSON lines with a "text" field."""
    if not path.is_file():
        raise AwqEdgeError(f"calibration file {path} not found", "pass an existing text or .jsonl file to --calib")
    # Bytes that are not UTF-8 (a binary file, Latin-1 text) and NULs (UTF-16 text) would calibrate on garbage.
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise AwqEdgeError(f"calibration file {path} is not UTF-8 text ({e.reason} at byte {e.start})",
                           "convert it, e.g. iconv -t utf-8, or pass another --calib file") from None
    if "\0" in raw:
        raise AwqEdgeError(f"calibration file {path} holds NUL bytes (binary, or UTF-16 text)",
                           "pass a UTF-8 text or .jsonl file to --calib")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AwqEdgeError(f"{path}:{i} is not a JSON object with a \"text\" field", "write one {\"text\": ...} object per line") from None
            if not isinstance(text, str):
                raise AwqEdgeError(f"{path}:{i}: \"text\" is {json.dumps(text)}, not a string",
                                   "write the text as a JSON string, e.g. {\"text\": \"...\"}")
            texts.append(text)
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise AwqEdgeError(f"calibration file {path} has no text", "pass a file with at least a few thousand words")
    return texts


def mixed_texts(n_chars: int) -> list:
    """The shipped multi-domain documents, topped up with stdlib docstrings to n_chars, in a fixed shuffled order.

    Shuffled so that every block of tokens, the held-out ones included, mixes domains.
    """
    docs = [d for domain in mixed_documents().values() for d in domain]
    short = n_chars - sum(map(len, docs))
    if short > 0:
        docs += builtin_texts(short)
    random.Random(0).shuffle(docs)
    return docs


def calibration_blocks(tokenizer, source: str, n_samples: int, seqlen: int, model=None, device: str = "cpu") -> torch.Tensor:
    """[n, seqlen] token ids: sampled from the model, or text joined, tokenised, cut into blocks, n spread evenly over it."""
    counts = all(isinstance(n, int) and not isinstance(n, bool) for n in (n_samples, seqlen))
    if not counts or n_samples < 1 or seqlen < 2:
        raise AwqEdgeError(f"n_samples={n_samples!r}, seqlen={seqlen!r}", "use --n-samples >= 1 and --seqlen >= 2")
    if not isinstance(source, (str, os.PathLike)):
        raise AwqEdgeError(f"calibration source {source!r} is not a name or a path", f"use {SOURCES_HELP}")
    if source == SAMPLED:
        return sampled_blocks(model, tokenizer, n_samples, seqlen, device)
    need = n_samples * seqlen
    readers = {MIXED: mixed_texts, BUILTIN: builtin_texts}
    texts = readers[source](need * 6) if source in readers else read_texts(Path(source))
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    # A model whose tokenizer starts every text with BOS (Gemma) is calibrated as it runs: BOS + seqlen - 1 tokens.
    # Too little text is refused before the blocks are cut: a --seqlen past int64 would overflow torch's view.
    blocks = bos_blocks(tokenizer, ids, seqlen) if ids.numel() >= seqlen - 1 else ids[:0]
    n_blocks = len(blocks)
    if n_blocks == 0:
        raise AwqEdgeError(
            f"calibration text has {ids.numel()} tokens, fewer than one block of {seqlen}",
            "give more text or a smaller --seqlen",
        )
    if n_blocks < n_samples:
        print(f"calibration: only {n_blocks} blocks of {seqlen} tokens in the text (asked for {n_samples})", flush=True)
        return blocks
    pick = torch.linspace(0, n_blocks - 1, n_samples).round().long()
    return blocks[pick]
