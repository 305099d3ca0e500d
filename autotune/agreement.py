"""How far a layout's answers agree with a reference run of the same prompts.

Batching, quantization and dtype may change greedy answers a little (kernels chosen by shape,
rounding). autotune measures how much instead of claiming they do not: the reference is the
same backend with batch 1, the model's own weights (the GGUF's own type; float32 for torch)
and greedy decoding; agreement is the share of sequences identical token for token, and, over
those that differ, the mean position of the first difference.
"""

from __future__ import annotations

from collections.abc import Iterable

from autotune.config import TrialConfig

__all__ = ["agreement", "reference_config"]


def reference_config(config: TrialConfig) -> TrialConfig:
    """The run ``config``'s answers are compared with: batch 1, the model's own weights,
    greedy; the same backend and processes."""
    return config.replace(
        batch_size=1, quant=None, dtype="float32", temperature=0.0, top_p=1.0, fault="none"
    )


def agreement(answers: Iterable, reference: Iterable) -> dict:
    """Agreement of ``answers`` with ``reference``, each completions or output dicts (with
    ``id`` and ``token_ids``), matched by id; failed requests (an error) are left out.

    Returns ``compared`` (sequences in both), ``identical`` (their share equal token for
    token) and ``mean_first_difference`` (0-based position, over those that differ; None if
    none differ).
    """
    mine, theirs = _tokens(answers), _tokens(reference)
    common = [key for key in mine if key in theirs]
    firsts = []
    for key in common:
        a, b = mine[key], theirs[key]
        if a != b:
            firsts.append(
                next(
                    (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)),
                )
            )
    return {
        "compared": len(common),
        "identical": (len(common) - len(firsts)) / len(common) if common else None,
        "mean_first_difference": sum(firsts) / len(firsts) if firsts else None,
    }


def _tokens(items: Iterable) -> dict[str, tuple[int, ...]]:
    found = {}
    for item in items:
        data = item if isinstance(item, dict) else item.to_dict()
        if data.get("error") is None:
            found[str(data["id"])] = tuple(data["token_ids"])
    return found
