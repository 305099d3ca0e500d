"""The statistics: summaries, percentiles, Student's t and the paired speedup interval."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.stats import (
    describe_speedup,
    percentile,
    speedup_interval,
    summarize,
    t_quantile,
)


def test_summary_uses_sample_stdev():
    summary = summarize([10.0, 12.0, 14.0])
    assert summary.median == 12.0 and summary.mean == 12.0
    assert summary.stdev == pytest.approx(2.0)  # ddof=1; population stdev would be 1.633
    assert summary.cv == pytest.approx(2.0 / 12.0)
    assert (summary.min, summary.max, summary.n) == (10.0, 14.0, 3)
    assert summary.noisy


def test_single_sample_and_empty():
    assert summarize([5.0]).stdev == 0.0 and not summarize([5.0]).noisy
    with pytest.raises(ValueError):
        summarize([])


def test_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([], 95) is None


# Two-sided 95% quantiles of Student's t (R: qt(0.975, df)).
T95 = {
    1: 12.706205,
    2: 4.302653,
    3: 3.182446,
    4: 2.776445,
    5: 2.570582,
    6: 2.446912,
    7: 2.364624,
    8: 2.306004,
    9: 2.262157,
    10: 2.228139,
    11: 2.200985,
    12: 2.178813,
    15: 2.131450,
    20: 2.085963,
    25: 2.059539,
    29: 2.045230,
    30: 2.042272,
    39: 2.022691,
}


@pytest.mark.parametrize("df", sorted(T95))
def test_t_quantile_matches_the_reference(df):
    assert t_quantile(0.975, df) == pytest.approx(T95[df], abs=2e-6)


@pytest.mark.parametrize("pairs", [2, 3, 5, 12, 21, 40])
def test_paired_interval_is_the_reference_t_interval(pairs):
    import math

    ratios = [2.0 + 0.1 * ((i * 7) % 5) for i in range(pairs)]
    stats = speedup_interval([10.0 * r for r in ratios], [10.0] * pairs)
    logs = np.log(ratios)
    half = T95[pairs - 1] * logs.std(ddof=1) / math.sqrt(pairs)
    assert stats["speedup"] == pytest.approx(math.exp(logs.mean()))
    assert stats["ci_low"] == pytest.approx(math.exp(logs.mean() - half), rel=1e-6)
    assert stats["ci_high"] == pytest.approx(math.exp(logs.mean() + half), rel=1e-6)
    assert stats["pairs"] == pairs


def test_one_pair_has_no_interval():
    stats = speedup_interval([30.0], [10.0])
    assert stats["speedup"] == pytest.approx(3.0) and stats["ci_low"] is None
    assert describe_speedup(stats) == "x3.00 over 1 A B pairs"


def test_a_zero_median_with_spread_reads_as_unstable():
    from autotune.stats import relative_spread

    assert relative_spread([0, 0, 100]) == float("inf"), "not 0: that would read as stable"
    assert relative_spread([0, 0, 0]) == 0.0 and relative_spread([]) == 0.0


def test_a_pair_without_tokens_has_no_speedup():
    with pytest.raises(ValueError, match="positive tokens/s"):
        speedup_interval([10, 10], [0, 5])
    with pytest.raises(ValueError, match="positive tokens/s"):
        speedup_interval([0, 10], [5, 5])
