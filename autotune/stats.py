"""The one place statistics are computed: float64, sample standard deviation (ddof=1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["HIGH_CV", "Summary", "percentile", "summarize"]

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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), or None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
