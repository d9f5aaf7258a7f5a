"""Prefill + decode loop with stop tokens, and incremental detokenisation for streaming."""

from collections.abc import Iterator

import numpy as np

from awq_edge.runtime.sampling import Sampling, next_token


def generate(decoder, prompt_ids, max_new_tokens: int, sampling: Sampling = Sampling(), stop_ids=(),
             seed: int = 0) -> Iterator[int]:
    """Yield new token ids one at a time; stops after a stop id (not yielded) or max_new_tokens."""
    rng = np.random.default_rng(seed)
    stops = set(stop_ids) | decoder.eos_ids
    # Greedy on a decoder that can pick the argmax itself: no logits travel to the host.
    on_device = sampling.temperature == 0 and hasattr(decoder, "greedy_step")
    token = next_token(decoder.extend(prompt_ids), sampling, rng)
    for i in range(max_new_tokens):
        if token in stops:
            return
        yield token
        if i + 1 < max_new_tokens:
            token = decoder.greedy_step(token) if on_device else next_token(decoder.forward([token])[-1], sampling, rng)


def stream_text(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece ending in a partial UTF-8 character waits for the next token."""
    ids, shown, text = [], "", ""
    for t in tokens:
        ids.append(t)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    if text != shown:  # generation ended inside a character: show what there is
        yield text[len(shown):]
