"""The one statistics function."""

from __future__ import annotations

import pytest

from autotune.stats import percentile, summarize


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
