"""How far a layout's answers agree with a reference run of the same prompts.

Batching, quantization and dtype may change greedy answers a little (kernels chosen by shape,
rounding). autotune measures how much instead of claiming they do not: the reference is a run
at batch 1, with the model's own weights (the GGUF's own type; float32 for torch), greedy;
agreement is the share of sequences identical token for token, and, over those that differ,
the mean position of the first difference.

`autotune bench --agreement` compares with the same backend and processes at batch 1
(`reference_config`). A sweep compares every trial with one reference per answer family
(`answer_family`: the layouts that compute with the same weights and library, e.g. hf, ddp and
the pipeline all run torch on the HF weights): the family's first trial that `is_reference`,
else the run `family_reference` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from autotune.config import TrialConfig

__all__ = [
    "agreement",
    "answer_family",
    "describe_agreement",
    "family_reference",
    "is_reference",
    "reference_config",
]


def reference_config(config: TrialConfig) -> TrialConfig:
    """The run ``config``'s answers are compared with: batch 1, the model's own weights,
    greedy; the same backend and processes."""
    return config.replace(
        batch_size=1, quant=None, dtype="float32", temperature=0.0, top_p=1.0, fault="none"
    )


def is_reference(config: TrialConfig) -> bool:
    """Whether ``config``'s answers are its family's reference: one process, batch 1, the
    model's own weights, greedy, no fault."""
    return config == reference_config(config) and config.processes == 1


def answer_family(config: TrialConfig) -> str:
    """The family of layouts whose answers one reference run serves (see the module)."""
    from backends import backend_class

    return backend_class(config.backend).answer_family


def family_reference(family: str, target, base: TrialConfig) -> TrialConfig:
    """The reference run of ``family`` on ``target``: its first backend's naive layout (by
    `baseline_rank`) made a reference (`reference_config`), on ``base``'s shared settings."""
    from backends import BACKENDS, backend_class

    members = [backend_class(name) for name in BACKENDS]
    first = min((b for b in members if b.answer_family == family), key=lambda b: b.baseline_rank)
    return reference_config(base.replace(backend=first.name, **first.naive(target)))


def agreement(answers: Iterable, reference: Iterable) -> dict:
    """Agreement of ``answers`` with ``reference``, each completions or output dicts (with
    ``id`` and ``token_ids``; failed requests, with an error, and those cut with their pass's
    tail are left out) or a mapping of id to token ids, matched by id.

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


def describe_agreement(found: dict) -> str:
    """An `agreement` in words: "92% of 24 answers identical; first difference at ..."."""
    first = found.get("mean_first_difference")
    return f"{found['identical']:.0%} of {found['compared']} answers identical" + (
        f"; first difference at token {first:.1f} on average" if first is not None else ""
    )


def _tokens(items: Iterable | Mapping) -> dict[str, tuple[int, ...]]:
    if isinstance(items, Mapping):  # already {id: token ids}, as a sweep keeps answers
        return {str(key): tuple(tokens) for key, tokens in items.items()}
    found = {}
    for item in items:
        data = item if isinstance(item, dict) else item.to_dict()
        # A request cut with its pass's tail stopped before its answer ended: no answer.
        if data.get("error") is None and not data.get("cut"):
            found[str(data["id"])] = tuple(data["token_ids"])
    return found
