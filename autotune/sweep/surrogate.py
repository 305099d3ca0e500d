"""Pooled estimates of the measured layouts: a ranking that one lucky pass does not lead.

A search trial measures one short pass, and one pass is noisy (one window of a simulated
16-core server: sd 8.7% and a pass in 25 slower; 4-20% on 2 real vCPUs,
`experiments/bench_windows.py`). Ranked by its own figure, the fastest of thirty layouts is
mostly the luckiest: a simulated 10-minute sweep confirmed 32x1 batch 4 q4_0 for its one pass
of 952 tokens/s, where the model gives it 759 and four layouts measured beside it 815-830.

`pooled` estimates each measured layout from every trial at once: the log of tokens/s as a sum
of one effect per knob value (the weights, the batch, the workers, ...) and the layout's own
departure from that sum, each with a prior (ridge regression, `EFFECT` and `OWN`), the trials'
figures with noise `NOISE`. A layout's estimate leans on its own figure as far as its own
figure is better evidence than its knobs' other trials: a single pass far above what the same
weights, batch and workers gave elsewhere counts about half. Used to choose which layouts are
re-measured in pairs (`autotune.sweep.confirm`) and where the search's steps start from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from autotune.config import TrialConfig
from autotune.space import config_key
from autotune.study import TrialRecord

__all__ = ["EFFECT", "NOISE", "OWN", "Fit", "pooled"]

# Prior standard deviations, in log tokens/s (0.1: about 10%).
NOISE = 0.1  # of one trial's figure about its layout's speed
EFFECT = 0.5  # of one knob value's effect (q8_0 against q4_0, batch 16 against 4, ...)
# Of a layout's departure from the sum of its knob values' effects: a choice (0.03-0.2 moved
# the simulated sweeps' ranking less than a point, docs/sweep.md).
OWN = 0.1
_BACKEND = 3.0  # of a backend's own level (hf and llama.cpp differ x10 on a CPU)


class Fit:
    """The ridge model above fitted to the measured ``records`` (complete, with a value)."""

    def __init__(self, records: Iterable[TrialRecord]) -> None:
        self.measured = [r for r in records if r.complete and r.value and r.config is not None]
        self.coefficients: dict[tuple, float] = {}
        self.centre = 0.0
        if not self.measured:
            return
        rows = [_features(r.config) for r in self.measured]
        columns: dict[tuple, int] = {}
        for row in rows:
            for feature in row:
                columns.setdefault(feature, len(columns))
        design = np.zeros((len(rows), len(columns)))
        for i, row in enumerate(rows):
            for feature in row:
                design[i, columns[feature]] = 1.0
        figures = np.log([r.value for r in self.measured])
        self.centre = float(figures.mean())
        prior = np.array([_prior(feature) for feature in columns]) ** -2.0
        # The posterior mean: (X'X / noise^2 + diag(1 / prior^2))^-1 X'y / noise^2.
        gram = design.T @ design / NOISE**2 + np.diag(prior)
        solved = np.linalg.solve(gram, design.T @ (figures - self.centre) / NOISE**2)
        self.coefficients = {feature: float(solved[i]) for feature, i in columns.items()}

    def predict(self, config: TrialConfig) -> float | None:
        """Tokens/s of ``config``'s layout, measured or not: the sum of its knob values'
        effects and, where measured, its own departure (0, its prior mean, where not); None
        where a knob value of it was never measured (its prior mean, the average of all
        trials, would be a guess, not a prediction)."""
        *knobs, own = _features(config)
        if any(feature not in self.coefficients for feature in knobs):
            return None
        total = sum(self.coefficients[f] for f in knobs) + self.coefficients.get(own, 0.0)
        return math.exp(self.centre + total)

    def estimates(self) -> dict[str, float]:
        """Per measured layout (`config_key`), its pooled estimate of tokens/s."""
        found = {}
        for record in self.measured:
            if (value := self.predict(record.config)) is not None:
                found[config_key(record.config)] = value
        return found


def pooled(records: Iterable[TrialRecord]) -> dict[str, float]:
    """Per layout (`config_key`) of the measured ``records`` (complete, with a value), its
    pooled estimate of tokens/s: the posterior mean of the ridge model above."""
    return Fit(records).estimates()


def _features(layout: TrialConfig) -> list[tuple]:
    """The model's terms for a `TrialConfig`: its backend, each (backend, field, value) of
    it, and the layout itself."""
    config = layout.to_dict()
    backend = config["backend"]
    knobs = [(backend, field, str(value)) for field, value in sorted(config.items())]
    return [("backend", backend), *knobs, ("layout", config_key(config))]


def _prior(feature: tuple) -> float:
    if feature[0] == "backend":
        return _BACKEND
    if feature[0] == "layout":
        return OWN
    return EFFECT
