"""Perplexity over non-overlapping windows of a text file."""

import math
from pathlib import Path

import torch
from tqdm import tqdm

from awq_edge.errors import AwqEdgeError


def text_tokens(tokenizer, path: Path, max_tokens: int = 0) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise AwqEdgeError(f"text file {path} not found", "pass an existing UTF-8 text file to --text")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    return ids


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts a text with BOS (Gemma does; SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def bos_blocks(tokenizer, ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """ids cut into [n, seqlen] blocks; where the tokenizer adds BOS, each block is BOS + (seqlen - 1) tokens."""
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    step = seqlen - 1 if bos is not None else seqlen
    n = ids.numel() // step
    blocks = ids[: n * step].view(n, step)
    if bos is not None:
        blocks = torch.cat([torch.full((n, 1), bos, dtype=blocks.dtype), blocks], dim=1)
    return blocks


@torch.no_grad()
def perplexity(model, tokenizer, ids: torch.Tensor, seqlen: int = 512, batch_size: int = 4,
               device: str = "cpu", progress: bool = True) -> dict:
    """exp(mean NLL) of every token predicted inside windows of `seqlen` tokens.

    Models whose tokenizer adds BOS see BOS + (seqlen - 1) text tokens per
    window, as they were trained; the BOS itself is never scored.
    """
    windows = bos_blocks(tokenizer, ids, seqlen)
    n_windows = len(windows)
    if n_windows == 0:
        raise AwqEdgeError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}", "use more text or a smaller --seqlen")
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        pred = logits[:, :-1].reshape(-1, logits.shape[-1])
        target = batch[:, 1:].reshape(-1)
        nll += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
        count += target.numel()
    if not math.isfinite(nll):
        raise AwqEdgeError(f"the model's loss is {nll} on this text: its outputs are not finite",
                           "re-create the checkpoint from a float model whose weights are finite")
    mean = nll / count
    return {"ppl": math.exp(mean) if mean < 700 else math.inf, "tokens": count, "seqlen": seqlen,
            "windows": n_windows}
