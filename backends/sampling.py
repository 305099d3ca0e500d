"""Sampling one token from logits: greedy, or temperature + nucleus (top-p). One function for
every backend that samples by itself (llama.cpp's engine, the pipeline's last stage), so a
seeded run samples the same way in both."""

from __future__ import annotations

import numpy as np

__all__ = ["sample_token"]


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """A token id from one row of ``logits``: the argmax when ``temperature`` is 0, else a
    draw by ``rng`` (a numpy Generator) from the softmax at ``temperature``, kept to the
    smallest set of tokens whose probability reaches ``top_p``."""
    if temperature == 0.0:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        # A token stays while the probability before it is still short of top_p.
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
