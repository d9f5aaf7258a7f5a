"""Prefill + decode loop with stop tokens, and incremental detokenisation for streaming."""

from collections.abc import Iterator
from contextlib import closing

import numpy as np

from awq_edge.runtime.sampling import Sampling, next_token


def generate(decoder, prompt_ids, max_new_tokens: int, sampling: Sampling = Sampling(), stop_ids=(),
             seed: int = 0) -> Iterator[int]:
    """Yield new token ids one at a time; stops after a stop id (not yielded) or max_new_tokens."""
    rng = np.random.default_rng(seed)
    stops = set(stop_ids) | decoder.eos_ids
    token = next_token(decoder.extend(prompt_ids), sampling, rng)
    if sampling.temperature == 0 and hasattr(decoder, "greedy_tokens"):
        # Greedy on a decoder that picks the argmax itself: no logits travel to the host, steps queue ahead.
        if max_new_tokens <= 0 or token in stops:
            return
        yield token
        with closing(decoder.greedy_tokens(token, max_new_tokens - 1)) as following:
            for token in following:
                if token in stops:
                    return
                yield token
        return
    # Sampling: on the decoder's device where it samples itself (the CUDA backend), else from host logits.
    on_device = sampling.temperature > 0 and hasattr(decoder, "sample_step")
    generator = decoder.device_generator(seed) if on_device else None
    for i in range(max_new_tokens):
        if token in stops:
            return
        yield token
        if i + 1 < max_new_tokens:
            token = (decoder.sample_step(token, sampling, generator) if on_device
                     else next_token(decoder.forward([token])[-1], sampling, rng))


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
