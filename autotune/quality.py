"""How far a layout's next-token distributions are from the source weights': per-token quality.

Whole-answer identity (`autotune.agreement`) is a poor guard for quantizations: one changed
token early changes the rest of the answer, and f16 dequantized from a Q4_1 file scored 21%
identical although it is the same model. What people who study quantization measure instead
(llama.cpp's perplexity tool, ``--kl-divergence``) is per token, by teacher forcing:

- The **reference** (a study's batch-1 run of the model's own weights, greedy) scores its own
  answers: for each answer position, its top `TOP_K` tokens and their log-probabilities
  (`Backend.score`), kept in the study directory (`ReferenceScores`).
- A **candidate** layout reads the same prompts and then the reference's answers, whatever it
  would have generated itself, and gives per position its own most likely token and its
  log-probabilities of the reference's top-k tokens.
- Per position: **top-1 agreement** (the candidate's most likely token is the reference's) and
  **KL(reference || candidate)** over the reference's top-k plus one bucket for the rest of the
  vocabulary (p_rest = 1 - the top-k's mass, q_rest the same over the candidate's
  probabilities of those tokens). Grouping the tail can only lower a KL divergence (the
  log-sum inequality), so the figure is a lower bound of the full one; `Quality.tail_mass`
  says how much of the reference's mass the top-k left out (little at k = 32).

Scoring is one prompt-processing pass per prompt over `SCORED_PROMPTS` prompts (the shortest
the reference answered), after a trial's timed passes and not in its figure; its seconds are
reported (`Quality.scoring_s`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from autotune.errors import ConfigError
from backends.base import ScoreRequest, TokenScores

__all__ = [
    "DEFAULT_FLOOR",
    "SCORED_PROMPTS",
    "TOP_K",
    "Quality",
    "QualityFloor",
    "ReferenceScores",
    "compare",
    "describe_quality",
    "requantized",
    "score_layout",
    "score_reference",
]

TOP_K = 32  # tokens of the reference's distribution kept per position
SCORED_PROMPTS = 4  # prompts scored per trial (the reference's shortest): ~100 positions
_TINY = 1e-12  # a probability is never taken as less (log of a rounded-away tail)


@dataclass(frozen=True)
class Quality:
    """A layout's per-token agreement with the reference over ``positions`` answer positions:
    ``top1`` the share whose most likely token is the reference's; ``kld_mean`` / ``kld_p99``
    the mean and 99th percentile of KL(reference || layout) in nats (top-k plus a tail
    bucket, see the module); ``tail_mass`` the reference's mean mass outside its top-k;
    ``scoring_s`` what scoring took (not in the trial's figure)."""

    top1: float
    kld_mean: float
    kld_p99: float
    positions: int
    tail_mass: float
    scoring_s: float | None = None
    # The file's own type where the layout quantized weights that were quantized already.
    requantized_from: str | None = None
    # The trial whose scoring pass these figures are, where this layout's was not run (its
    # ``scoring_s`` None): the first of the sweep that scores alike
    # (`autotune.sweep.ledger.scoring_key`).
    scored_by: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> Quality | None:
        """Inverse of `to_dict`; None for None."""
        if not data:
            return None
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def describe(self) -> str:
        """``top-1 98.4%, KL 0.0123 (p99 0.091)``, and ``, requantized from q4_1`` where so."""
        text = f"top-1 {self.top1:.1%}, KL {self.kld_mean:.4f} (p99 {self.kld_p99:.3f})"
        if self.requantized_from:
            text += f", requantized from {self.requantized_from}"
        return text


@dataclass(frozen=True)
class ReferenceScores:
    """The reference's scored answers (`TOP_K` per position) with the prompts and answers
    they score: what a candidate is compared with. Kept as one JSON file per answer family
    in the study directory."""

    texts: dict[str, str]  # prompt id -> its text, as the workload gives it
    answers: dict[str, list[int]]  # prompt id -> the reference's generated tokens
    scores: list[TokenScores]

    def requests(self) -> list[ScoreRequest]:
        """What a candidate scores: each prompt and the reference's answer, asking for the
        log-probabilities of the reference's top-k tokens at each position."""
        return [
            ScoreRequest(
                id=scored.id,
                text=self.texts[scored.id],
                answer=tuple(self.answers[scored.id]),
                ids=scored.top_ids,
            )
            for scored in self.scores
        ]

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "top_k": TOP_K,
            "texts": self.texts,
            "answers": self.answers,
            "scores": [s.to_dict() for s in self.scores],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ReferenceScores:
        """Inverse of `to_dict`."""
        return cls(
            texts=dict(data["texts"]),
            answers={k: list(v) for k, v in data["answers"].items()},
            scores=[TokenScores.from_dict(s) for s in data["scores"]],
        )

    def save(self, path: Path) -> None:
        """Write it whole or not at all (a temporary file, then renamed)."""
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_dict()))
        partial.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceScores:
        """Read a file `save` wrote."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def requantized(config, shape) -> str | None:
    """The file's own type where ``config`` quantizes weights that were quantized already (a
    --quant of a GGUF whose type is not f16/bf16/f32, as the embedded Q4_1), else None: a
    copy of a copy, whose figures say little of what the type gives from source weights
    (``shape``: the model's `autotune.models.ModelShape`)."""
    own = (shape.weight_type or "").lower()
    return own if config.quant and own not in ("", "f16", "bf16", "f32") else None


def describe_quality(record) -> str:
    """A trial's quality in words: its figures over how many positions, and, for a
    requantized file, that it is one (``record``: a `TrialRecord`)."""
    quality = record.quality
    figures = replace(quality, requantized_from=None).describe()
    text = f"{figures} over {quality.positions} positions (teacher forcing)"
    if quality.scored_by is not None:
        text += f", trial {quality.scored_by}'s (the same weights and scoring pass)"
    elif quality.scoring_s is not None:
        text += f", scored in {quality.scoring_s:.1f} s"
    if quality.requantized_from:
        text += f"; requantized from {quality.requantized_from}"
    return text


def score_reference(backend, settings, completions, texts: Mapping[str, str]) -> ReferenceScores:
    """The reference's own answers scored by ``backend`` (the reference layout, loaded): the
    `SCORED_PROMPTS` shortest prompts it answered, `TOP_K` per position (``texts``: prompt id
    -> text). The shortest, because every later trial reads them again: one long prompt of
    the shipped workload (1 261 characters) cost most of a scoring pass, 20-27% of a batch-1
    trial of a 4-minute sweep on 2 vCPUs where the limit is 20%."""
    answered = [c for c in completions if c.answered and c.token_ids]
    answered = sorted(answered, key=lambda c: len(texts[c.id]))[:SCORED_PROMPTS]
    requests = [
        ScoreRequest(id=c.id, text=texts[c.id], answer=tuple(c.token_ids)) for c in answered
    ]
    return ReferenceScores(
        texts={r.id: r.text for r in requests},
        answers={r.id: list(r.answer) for r in requests},
        scores=backend.score(requests, settings, TOP_K),
    )


def score_layout(backend, settings, reference: ReferenceScores) -> Quality:
    """``backend``'s layout (loaded) scored against ``reference`` by teacher forcing, with
    the seconds it took."""
    started = time.monotonic()
    scored = backend.score(reference.requests(), settings, 1)
    found = compare(reference.scores, scored)
    return replace(found, scoring_s=time.monotonic() - started)


def compare(reference: Sequence[TokenScores], candidate: Sequence[TokenScores]) -> Quality:
    """Per-token agreement of ``candidate`` (scored with the reference's top-k ids asked for)
    with ``reference`` (scored with `TOP_K`), matched by prompt id and position."""
    theirs = {scored.id: scored for scored in candidate}
    agree, divergences, tails = [], [], []
    for ref in reference:
        cand = theirs.get(ref.id)
        if cand is None or cand.logprobs is None:
            raise ValueError(f"no candidate scores for prompt {ref.id!r}")
        for position, (ids, p_logs) in enumerate(zip(ref.top_ids, ref.top_logprobs, strict=True)):
            p = np.exp(np.asarray(p_logs, dtype=np.float64))
            q = np.exp(np.asarray(cand.logprobs[position], dtype=np.float64))
            q = np.maximum(q, _TINY)
            p_rest = max(1.0 - float(p.sum()), 0.0)
            q_rest = max(1.0 - float(q.sum()), _TINY)
            kl = float(np.sum(p * (np.asarray(p_logs) - np.log(q))))
            if p_rest > 0:
                kl += p_rest * (math.log(max(p_rest, _TINY)) - math.log(q_rest))
            divergences.append(max(kl, 0.0))  # rounding can take a zero a hair below
            agree.append(cand.top_ids[position][0] == ids[0])
            tails.append(p_rest)
    if not divergences:
        raise ValueError("nothing to compare: the reference scored no position")
    return Quality(
        top1=float(np.mean(agree)),
        kld_mean=float(np.mean(divergences)),
        kld_p99=float(np.percentile(divergences, 99)),
        positions=len(divergences),
        tail_mass=float(np.mean(tails)),
    )


@dataclass(frozen=True)
class QualityFloor:
    """What `--min-quality` asks of a layout: top-1 agreement at least ``top1``, mean KL
    divergence at most ``kld`` (either may be None: not asked)."""

    top1: float | None = None
    kld: float | None = None

    @classmethod
    def parse(cls, text: str, flag: str = "--min-quality") -> QualityFloor:
        """``top1=0.95``, ``kld=0.05``, both comma-separated, or ``none`` (no floor); a bad
        one is a ConfigError naming ``flag``."""
        if text.strip().lower() == "none":
            return cls()
        found: dict[str, float] = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip().lower()
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if name not in ("top1", "kld") or not math.isfinite(number) or number < 0:
                raise ConfigError(
                    f"{flag} {text!r}: expected top1=SHARE, kld=NATS, both (comma-separated) "
                    "or none, e.g. top1=0.9 or kld=0.05"
                )
            if name == "top1" and number > 1:
                raise ConfigError(f"{flag} {text!r}: top1 is a share, 0 to 1")
            found[name] = number
        return cls(**found)

    def why_below(self, quality: Quality | None) -> str | None:
        """Why a layout of this ``quality`` is under the floor, or None (also where its
        quality was not measured: nothing to judge)."""
        if quality is None:
            return None
        if self.top1 is not None and quality.top1 < self.top1:
            return f"top-1 agreement {quality.top1:.1%} under --min-quality top1={self.top1:g}"
        if self.kld is not None and quality.kld_mean > self.kld:
            return f"KL divergence {quality.kld_mean:.4f} over --min-quality kld={self.kld:g}"
        return None

    def as_flag(self) -> str:
        """The `parse` text of this floor: ``top1=0.9,kld=0.1`` or ``none``."""
        parts = [f"{n}={v:g}" for n, v in (("top1", self.top1), ("kld", self.kld)) if v is not None]
        return ",".join(parts) or "none"

    def describe(self) -> str:
        """``top1>=0.9, kld<=0.1`` or ``none``."""
        parts = []
        if self.top1 is not None:
            parts.append(f"top1>={self.top1:g}")
        if self.kld is not None:
            parts.append(f"kld<={self.kld:g}")
        return ", ".join(parts) or "none"


# The default floor: it keeps q8_0 down to the 4-bit K-quants of the embedded model (KL 0.003-
# 0.09, requantized from its Q4_1) and prunes q4_0 (0.35, top-1 68%), which had won a 4-minute
# sweep with answers 0% identical (README "Quality", experiments/bench_quality.py).
DEFAULT_FLOOR = QualityFloor(kld=0.1)
