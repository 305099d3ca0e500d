"""Pipeline partitions: every strategy covers every layer once, bad splits are clear errors."""

from __future__ import annotations

import itertools

import pytest

from autotune.errors import ConfigError
from backends.torch.partition import (
    StageCosts,
    balanced,
    format_boundaries,
    parse_boundaries,
    stage_totals,
    uniform,
)


def covers_once(ranges, layers):
    return [i for r in ranges for i in r] == list(range(layers)) and all(len(r) for r in ranges)


@pytest.mark.parametrize(("layers", "stages"), [(30, 1), (30, 2), (30, 4), (7, 3), (5, 5)])
def test_uniform_covers_every_layer_once_and_differs_by_at_most_one(layers, stages):
    ranges = uniform(layers, stages)
    assert len(ranges) == stages and covers_once(ranges, layers)
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_boundaries_round_trip():
    ranges = parse_boundaries("0-13,14-29", 30, 2)
    assert ranges == [range(0, 14), range(14, 30)]
    assert format_boundaries(ranges) == "0-13,14-29"


@pytest.mark.parametrize(
    ("text", "stages", "word"),
    [
        ("0-13,15-29", 2, "gap"),
        ("0-14,14-29", 2, "overlaps"),
        ("0-13,14-28", 2, "end at layer 28"),
        ("0-29", 2, "name 1 stages"),
        ("0-5,7-3", 2, "empty"),
        ("1-29", 1, "starts at layer 1"),
        ("0-13;14-29", 2, "look like"),
    ],
)
def test_bad_boundaries_say_what_is_wrong(text, stages, word):
    with pytest.raises(ConfigError, match=word):
        parse_boundaries(text, 30, stages)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ConfigError, match="must not exceed"):
        uniform(3, 4)
    with pytest.raises(ConfigError, match="must not exceed"):
        balanced(StageCosts((1.0, 1.0)), 3)


def brute_force_best(costs: StageCosts, stages: int) -> float:
    n = len(costs.layers)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0, *cuts, n)
        ranges = [range(a, b) for a, b in itertools.pairwise(edges)]
        best = min(best, max(stage_totals(costs, ranges)))
    return best


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_balanced_is_optimal_and_contiguous(stages):
    costs = StageCosts((3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0), first=2.0, last=7.0)
    ranges = balanced(costs, stages)
    assert covers_once(ranges, len(costs.layers)) and len(ranges) == stages
    assert max(stage_totals(costs, ranges)) == brute_force_best(costs, stages)


def test_a_heavy_head_gives_the_last_stage_fewer_layers():
    # 30 equal layers, a head worth 7 of them (SmolLM2's tied 49152 x 576 head, roughly).
    ranges = balanced(StageCosts((1.0,) * 30, first=0.0, last=7.0), 2)
    assert len(ranges[1]) < len(ranges[0])
    assert covers_once(ranges, 30)
