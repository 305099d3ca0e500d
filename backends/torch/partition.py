"""How the pipeline backend splits a model's decoder layers into stages.

A partition is a list of ``range`` objects, one per stage, contiguous, covering every layer
once. Stage 0 also holds the embeddings and the last stage the final norm and the LM head, so
the cost-based strategies (``memory``, ``compute``) count those on the first and last stage.
Pure functions: the backend supplies the costs (parameter bytes, a measured time profile).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from autotune.errors import ConfigError

__all__ = [
    "StageCosts",
    "balanced",
    "format_boundaries",
    "parse_boundaries",
    "stage_totals",
    "uniform",
]


@dataclass(frozen=True)
class StageCosts:
    """A cost per decoder layer, plus what only the first and only the last stage carry."""

    layers: tuple[float, ...]
    first: float = 0.0  # embeddings
    last: float = 0.0  # final norm + LM head (+ sampling)


def _check_counts(layers: int, stages: int) -> None:
    if stages < 1:
        raise ConfigError(f"stages must be >= 1, got {stages}")
    if stages > layers:
        raise ConfigError(
            f"stages ({stages}) must not exceed the model's decoder layers ({layers}): "
            "every stage needs at least one layer"
        )


def uniform(layers: int, stages: int) -> list[range]:
    """Equal numbers of layers; the first ``layers % stages`` stages take one more."""
    _check_counts(layers, stages)
    size, extra = divmod(layers, stages)
    ranges, start = [], 0
    for stage in range(stages):
        stop = start + size + (stage < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def parse_boundaries(text: str, layers: int, stages: int) -> list[range]:
    """Parse ``0-13,14-29`` (inclusive ranges) and check it covers every layer once, in order."""
    _check_counts(layers, stages)
    if not re.fullmatch(r"\d+-\d+(,\d+-\d+)*", text):
        raise ConfigError(f"boundaries must look like 0-13,14-29, got {text!r}")
    ranges = []
    for part in text.split(","):
        first, last = (int(x) for x in part.split("-"))
        if last < first:
            raise ConfigError(
                f"boundaries {text!r}: stage {part!r} is empty (ends before it starts)"
            )
        ranges.append(range(first, last + 1))
    if len(ranges) != stages:
        raise ConfigError(f"boundaries {text!r} name {len(ranges)} stages but --stages is {stages}")
    expected = 0
    for stage, r in enumerate(ranges):
        if r.start != expected:
            what = "overlaps the previous stage" if r.start < expected else "leaves a gap before it"
            raise ConfigError(
                f"boundaries {text!r}: stage {stage} starts at layer {r.start}, {what} "
                f"(expected {expected}); every layer must be in exactly one stage"
            )
        expected = r.stop
    if expected != layers:
        raise ConfigError(
            f"boundaries {text!r} end at layer {expected - 1}, but the model has layers "
            f"0-{layers - 1}; every layer must be in exactly one stage"
        )
    return ranges


def format_boundaries(ranges: Sequence[range]) -> str:
    """The inverse of `parse_boundaries`: ``[range(0, 14), range(14, 30)]`` -> ``0-13,14-29``."""
    return ",".join(f"{r.start}-{r.stop - 1}" for r in ranges)


def stage_totals(costs: StageCosts, ranges: Sequence[range]) -> list[float]:
    """The cost each stage carries under ``ranges``."""
    totals = [sum(costs.layers[i] for i in r) for r in ranges]
    totals[0] += costs.first
    totals[-1] += costs.last
    return totals


def balanced(costs: StageCosts, stages: int) -> list[range]:
    """Contiguous split that minimises the most expensive stage (ties: earlier stages lighter).

    Exact dynamic programme over split points: O(stages x layers^2), nothing for a few hundred
    layers.
    """
    n = len(costs.layers)
    _check_counts(n, stages)
    prefix = [0.0]
    for layer_cost in costs.layers:
        prefix.append(prefix[-1] + layer_cost)

    def cost(stage: int, start: int, stop: int) -> float:
        total = prefix[stop] - prefix[start]
        if stage == 0:
            total += costs.first
        if stage == stages - 1:
            total += costs.last
        return total

    # best[s][i]: the smallest possible maximum when stages s.. cover layers i..n-1.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[stages][n] = 0.0
    for stage in range(stages - 1, -1, -1):
        remaining = stages - stage - 1  # stages after this one, each needs a layer
        for start in range(n - remaining - 1, -1, -1):
            if stage == 0 and start != 0:
                continue
            for stop in range(start + 1, n - remaining + 1):
                value = max(cost(stage, start, stop), best[stage + 1][stop])
                # "<" keeps the shortest stop among equals: earlier stages take no more than
                # they must, which leaves slack for the last stage's head.
                if value < best[stage][start]:
                    best[stage][start], choice[stage][start] = value, stop
    ranges, start = [], 0
    for stage in range(stages):
        stop = choice[stage][start]
        ranges.append(range(start, stop))
        start = stop
    return ranges
