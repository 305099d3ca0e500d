"""The one place statistics are computed: float64, sample standard deviation (ddof=1); the
paired speedup and its t-interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "HIGH_CV",
    "Summary",
    "describe_speedup",
    "percentile",
    "prediction_interval",
    "relative_spread",
    "speedup_interval",
    "summarize",
    "t_quantile",
]

# Above this coefficient of variation a result is flagged as noisy: on a quiet machine repeated
# LLM throughput runs agree within a few percent, so 10% means something else was running.
HIGH_CV = 0.10


@dataclass(frozen=True)
class Summary:
    """Median, mean, sample standard deviation (ddof=1), CV = stdev / mean, min, max, n."""

    n: int
    median: float
    mean: float
    stdev: float
    cv: float
    min: float
    max: float

    @property
    def noisy(self) -> bool:
        """True when the coefficient of variation exceeds HIGH_CV."""
        return self.cv > HIGH_CV

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Summary of raw samples; one sample has stdev 0."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("summarize() needs at least one value")
    mean = float(data.mean())
    stdev = float(data.std(ddof=1)) if data.size > 1 else 0.0
    return Summary(
        n=int(data.size),
        median=float(np.median(data)),
        mean=mean,
        stdev=stdev,
        cv=stdev / mean if mean else 0.0,
        min=float(data.min()),
        max=float(data.max()),
    )


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart repeated measurements are (0 for none, or for
    values all equal; infinite where they differ around a median of 0, which no spread
    relative to it can describe as stable)."""
    if len(values) == 0:
        return 0.0
    data = np.asarray(values, dtype=np.float64)
    median = float(np.median(data))
    spread = float(data.max() - data.min())
    if median <= 0:
        return 0.0 if spread == 0 else math.inf
    return spread / median


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), or None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ---------------------------------------------------------------- paired speedups


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, Lentz's method;
    Numerical Recipes 6.4), accurate to ~1e-14 for the arguments Student's t needs."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result / a


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0.5 < p < 1), by
    bisection on `t_cdf`: exact to 1e-9 for every df, where a table stops."""
    if not 0.5 <= p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2


def speedup_interval(candidate: Sequence[float], baseline: Sequence[float]) -> dict:
    """Paired speedup of ``candidate`` over ``baseline`` tokens/s, measured in pairs: the
    geometric mean of the per-pair ratios, with a 95% t-interval on their logs (none for one
    pair). Every figure must be above 0: a pass without tokens has no ratio (ValueError)."""
    if min(candidate, default=1) <= 0 or min(baseline, default=1) <= 0:
        raise ValueError(
            f"speedup_interval() needs positive tokens/s, got candidate {list(candidate)}, "
            f"baseline {list(baseline)}"
        )
    logs = np.log(np.asarray(candidate, dtype=np.float64) / np.asarray(baseline, np.float64))
    if logs.size == 0:
        raise ValueError("speedup_interval() needs at least one pair")
    mean = float(logs.mean())
    result = {
        "speedup": math.exp(mean),
        "pairs": int(logs.size),
        "ratios": [float(math.exp(x)) for x in logs],
        "ci_low": None,
        "ci_high": None,
    }
    if logs.size >= 2:
        half = t_quantile(0.975, logs.size - 1) * float(logs.std(ddof=1)) / math.sqrt(logs.size)
        result.update(ci_low=math.exp(mean - half), ci_high=math.exp(mean + half))
    return result


def prediction_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Where one more measurement of what gave ``values`` falls with probability ``level``
    (normal samples): mean +- t(df = n - 1) x stdev x sqrt(1 + 1/n). Needs two values."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        raise ValueError("prediction_interval() needs at least two values")
    half = t_quantile(0.5 + level / 2, data.size - 1) * float(data.std(ddof=1))
    half *= math.sqrt(1 + 1 / data.size)
    return float(data.mean()) - half, float(data.mean()) + half


def describe_speedup(paired: dict) -> str:
    """``x2.20 over 3 A B pairs, 95% CI 1.90-2.55`` for a `speedup_interval` result."""
    text = f"x{paired['speedup']:.2f} over {paired['pairs']} A B pairs"
    if paired.get("ci_low") is not None:
        text += f", 95% CI {paired['ci_low']:.2f}-{paired['ci_high']:.2f}"
    if (paired.get("chosen_among") or 1) > 1:
        # Picking the best of several on these pairs favours it: the interval is optimistic.
        text += f" (the best of {paired['chosen_among']} layouts on these same pairs)"
    return text
