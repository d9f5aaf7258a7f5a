"""What every batch-1 decoder backend shares: feeding a prompt that may extend the cached one."""

import numpy as np

from awq_edge.errors import AwqEdgeError


class PrefixCachedDecoder:
    """Base for decoders with `tokens` (ids in the KV cache), `reset()` and `forward(ids, last_only)` -> logits
    [n, vocab] (at least the last row when last_only). A decoder may add
    `greedy_tokens(token, n)`: feed token, then each argmax, yielding the n ids that follow (see generate)."""

    def extend(self, ids) -> np.ndarray:
        """Feed a prompt, reusing the cache when it holds a prefix of it; logits of the last id [vocab]."""
        ids = list(ids)
        if not ids:
            raise AwqEdgeError("the prompt is empty", "pass some text to the model")
        if ids[: len(self.tokens)] != self.tokens or len(ids) == len(self.tokens):
            self.reset()
        return self.forward(ids[len(self.tokens):], last_only=True)[-1]
