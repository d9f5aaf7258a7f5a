"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Zero all but the most likely tokens whose cumulative probability first reaches top_p."""
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cum, top_p * cum[-1])) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out


def next_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if s.top_p < 1:
        probs = top_p_filter(probs, s.top_p)
    return int(rng.choice(len(probs), p=probs / probs.sum()))
