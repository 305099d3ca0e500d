"""A timed pass and what it measures: its windows, its figure, and whether passes agree.

A pass runs the same requests in the same order every time (`autotune.measure.Pacing.pass_of`),
so two passes of one layout hold the same work: their figures are comparable like for like,
where the windows inside one pass are not (the first holds the long prompts of a workload of
mixed lengths, the next the short ones). A measurement is stable when its last
`STABLE_PASSES` passes agree within `STABLE_SPREAD` (`settled`); its estimate is the mean of
those passes with a 95% interval (`estimate`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from autotune.stats import relative_spread, t_quantile
from backends.base import Completion

__all__ = [
    "BALANCED_PROMPTS",
    "MIN_WINDOW",
    "STABLE_PASSES",
    "STABLE_SPREAD",
    "WINDOWS",
    "Estimate",
    "Sample",
    "describe_stability",
    "estimate",
    "pass_prompts",
    "settled",
    "steady_tokens_per_s",
    "window_size",
    "windows",
]

# A pass draws its prompts from the first this many of the file, whatever the layout (so the
# order, and the prompts every trial answers first, do not depend on it): far more than a CPU
# layout's pass (2 x 64 + 3 x 64 requests at batch 64), and balancing them takes milliseconds
# where balancing a 50k-line file in every trial took seconds (experiments/bench_workload.py).
BALANCED_PROMPTS = 8192
# A window is as long as it takes to finish one wave (at least MIN_WINDOW requests) while
# every slot is busy; a pass holds WINDOWS windows, and its figure is their mean.
WINDOWS = 3
MIN_WINDOW = 4
# A measurement is stable when its last STABLE_PASSES passes (the same requests each) agree
# within STABLE_SPREAD (max - min over the median).
STABLE_PASSES = 2
STABLE_SPREAD = 0.05


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One timed pass: its work, its time, its windows' tokens/s."""

    wall_s: float
    generated_tokens: int
    prefill_tokens: int
    tokens_per_s: float  # the whole pass, ramp-up and tail included
    windows: tuple[float, ...] = ()  # generated tokens/s of its windows, in order
    prefill_tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    cpu_utilisation: float = 0.0

    @property
    def steady_tokens_per_s(self) -> float | None:
        """Its windows taken together (`_together`); None without a window."""
        return _together(self.windows)

    @property
    def figure(self) -> float:
        """The pass's tokens/s: the mean of its windows, the whole pass where it has none."""
        return self.steady_tokens_per_s or self.tokens_per_s

    def to_dict(self) -> dict:
        """JSON-ready, with the pass's steady figure beside the raw fields."""
        data = asdict(self)
        data["windows"] = list(self.windows)
        data["steady_tokens_per_s"] = self.steady_tokens_per_s
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Sample:
        """Inverse of `to_dict` (derived keys and keys of older studies are left out)."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in data.items() if k in known}
        given["windows"] = tuple(given.get("windows") or ())
        given.setdefault("wall_s", 0.0)
        given.setdefault("generated_tokens", 0)
        given.setdefault("prefill_tokens", 0)
        given.setdefault("tokens_per_s", 0.0)
        return cls(**given)


@dataclass(frozen=True)
class Estimate:
    """A layout's tokens/s from its last passes: the mean, a 95% interval where two or more
    passes give one, and whether they agree (None: one pass, nothing to compare)."""

    mean: float
    low: float | None
    high: float | None
    passes: int
    spread: float | None  # relative spread of those passes
    stable: bool | None


def settled(figures: Sequence[float]) -> bool:
    """Whether the last `STABLE_PASSES` pass figures agree within `STABLE_SPREAD`: the same
    requests each, so a workload of mixed lengths settles as well as one of equal lengths."""
    return (
        len(figures) >= STABLE_PASSES and relative_spread(figures[-STABLE_PASSES:]) <= STABLE_SPREAD
    )


def estimate(figures: Sequence[float]) -> Estimate:
    """The mean of the last `STABLE_PASSES` pass figures with its 95% t-interval."""
    if not figures:
        raise ValueError("estimate() needs at least one pass")
    last = np.asarray(figures[-STABLE_PASSES:], dtype=np.float64)
    mean = float(last.mean())
    if last.size < 2:
        return Estimate(mean, None, None, 1, None, None)
    half = t_quantile(0.975, last.size - 1) * float(last.std(ddof=1)) / math.sqrt(last.size)
    return Estimate(
        mean, mean - half, mean + half, int(last.size), relative_spread(last), settled(figures)
    )


def describe_stability(stable: bool | None, pass_spread: float | None) -> str:
    """How a measurement's last passes compare, in words: ``stable`` as `settled` says, with
    their spread; one pass is not compared (its windows hold different prompts)."""
    if stable is None or pass_spread is None:
        return "one pass: not compared"
    verdict = "stable" if stable else "not stable"
    return f"its last {STABLE_PASSES} passes spread {pass_spread:.1%}: {verdict}"


def window_size(width: int) -> int:
    """Finishes per window for a layout running ``width`` requests at once: at least one
    wave, so that waves finishing together (static batches, equal lengths) do not split."""
    return max(width, MIN_WINDOW)


def pass_prompts(width: int, ramp: bool = True, windows: int = WINDOWS) -> int:
    """Requests in a pass that holds ``windows`` windows, between a ramp-up wave and a tail
    where the layout refills its slots (``ramp``)."""
    return 2 * width * ramp + windows * window_size(width)


def windows(completions: Sequence[Completion], width: int, ramp: bool = True) -> list[float]:
    """Generated tokens/s of a pass's windows, in order.

    Where the layout refills its slots as they free (``ramp``), the steady state runs from the
    ``width``-th finish (the ramp-up: every slot started at once) to the ``width``-th last
    (then the queue is empty and slots drain: the tail); where it runs static batches, every
    batch starts from empty, so the whole pass is its steady state. It is cut into as many
    equal windows of time as it holds `window_size` finishes. Each request's
    tokens are spread evenly from its first token to its finish, so a window counts the
    tokens generated in it, not those of the requests that happen to end in it (which, with
    answers of different lengths, swings from window to window). Empty when the pass is too
    short for one window, or a backend gave no finish times.
    """
    answered = [c for c in completions if c.error is None]
    if any(c.finished_at is None for c in answered):
        return []
    ends = sorted(c.finished_at for c in answered)
    count = (len(ends) - 2 * width * ramp) // window_size(width)
    if count < 1:
        return []
    if ramp:
        began, ended = ends[width - 1], ends[len(ends) - width - 1]
    else:
        began, ended = min(c.finished_at - c.latency_s for c in answered), ends[-1]
    if ended <= began:
        return []
    spans = [(_first_token_at(c), c.finished_at, len(c.token_ids)) for c in answered]
    step = (ended - began) / count
    rates: list[float] = []
    for index in range(count):
        low, high = began + index * step, began + (index + 1) * step
        rates.append(sum((_tokens_between(span, low, high) for span in spans), 0.0) / step)
    return rates


def _first_token_at(completion: Completion) -> float:
    """When a request's first token came (its start where the backend cannot see that)."""
    started = completion.finished_at - completion.latency_s
    return started + (completion.ttft_s or 0.0)


def _tokens_between(span: tuple[float, float, int], low: float, high: float) -> float:
    """The share of a request's tokens generated between ``low`` and ``high``, its ``count``
    tokens spread evenly over [first token, finish]."""
    first, finished, count = span
    if finished <= first:  # all at once
        return float(count) if low < finished <= high else 0.0
    overlap = min(high, finished) - max(low, first)
    return count * max(0.0, overlap) / (finished - first)


def steady_tokens_per_s(
    completions: Sequence[Completion], width: int, ramp: bool = True
) -> float | None:
    """Generated tokens/s over all of a pass's windows together (None: no window)."""
    return _together(windows(completions, width, ramp))


def _together(rates: Sequence[float]) -> float | None:
    """Windows of equal span taken together: their mean (None: no window)."""
    return statistics.fmean(rates) if rates else None
