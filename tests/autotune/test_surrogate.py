"""The pooled estimates the sweep ranks layouts by (autotune.sweep.surrogate)."""

from __future__ import annotations

import pytest

from autotune.config import TrialConfig
from autotune.measure import Pacing
from autotune.passes import Sample
from autotune.space import config_key
from autotune.study import Role, TrialRecord, TrialState
from autotune.sweep.surrogate import Fit, pooled


def _trial(number: int, value: float, **fields) -> TrialRecord:
    """A measured search trial of the fake backend (one pass of 2 s, what a pair is priced
    from)."""
    return TrialRecord(
        number=number,
        state=TrialState.COMPLETE,
        role=Role.BASELINE if number == 0 else Role.SEARCH,
        config=TrialConfig(backend="fake", **fields),
        duration_s=3.0,
        value=value,
        result={"load_time_s": 1.0, "prompts": 8},
        samples=[Sample(wall_s=2.0, generated_tokens=100, prefill_tokens=0, tokens_per_s=value)],
    )


def _lucky_and_steady() -> tuple[TrialRecord, list[TrialRecord], list[TrialRecord]]:
    """One pass of 130 at 4 workers batch 4, three of 120 at 2 workers batch 4, and what 4 and
    2 workers measured at batch 1 and 16: a quarter apart."""
    lucky = _trial(10, 130.0, workers=4, batch_size=4)
    steady = [_trial(n, 120.0, workers=2, batch_size=4) for n in (1, 2, 3)]
    others = [
        _trial(4, 72.0, workers=4, batch_size=1),
        _trial(5, 96.0, workers=2, batch_size=1),
        _trial(6, 99.0, workers=4, batch_size=16),
        _trial(7, 132.0, workers=2, batch_size=16),
    ]
    return lucky, steady, others


def test_a_lucky_single_pass_ranks_below_a_layout_its_knobs_back():
    lucky, steady, others = _lucky_and_steady()
    # At batch 1 and 16, 4 workers measured a quarter below 2: 4 workers at batch 4 is
    # expected near 90, and one pass of 130 there is more likely luck than an exception.
    estimates = pooled([lucky, *steady, *others])
    mine, theirs = (estimates[config_key(r.config)] for r in (lucky, steady[0]))
    assert mine < theirs, "three passes of 120 beat one of 130 that its knobs do not back"
    # Its own pass still counts: it stays above what its knobs alone say.
    assert 100.0 < mine < 125.0


def test_a_layout_not_measured_is_predicted_from_its_knob_values_where_each_was_measured():
    # 2 workers: 100 at batch 1, 200 at batch 4; 1 worker: 50 at batch 1. One worker at batch
    # 4 is expected about half of 2 workers' 200 (the sweep skips such a neighbour).
    records = [
        _trial(0, 100.0, workers=2, batch_size=1),
        _trial(1, 200.0, workers=2, batch_size=4),
        _trial(2, 50.0, workers=1, batch_size=1),
    ]
    fit = Fit(records)
    one_at_four = fit.predict(TrialConfig(backend="fake", workers=1, batch_size=4))
    assert one_at_four is not None and 70.0 < one_at_four < 0.8 * 200.0
    assert fit.predict(records[1].config) == pooled(records)[config_key(records[1].config)]
    # A value no trial had (3 workers) predicts nothing: not the average of every trial.
    assert fit.predict(TrialConfig(backend="fake", workers=3, batch_size=4)) is None
    assert fit.predict(TrialConfig(backend="hf", batch_size=4)) is None, "another backend"


def test_the_confirmation_pairs_the_layouts_the_pooled_estimates_rank_first(monkeypatch):
    from autotune.sweep import confirm as confirmation
    from autotune.trial import TrialOutcome

    monkeypatch.setattr(confirmation, "TOP", 2)
    lucky, steady, others = _lucky_and_steady()
    baseline = _trial(0, 10.0, workers=1, batch_size=1)
    asked = []

    def run_pairs(candidate, base, pairs, deadline_s, pacing):
        asked.append((candidate.workers, candidate.batch_size))
        result = {"candidate": [100.0] * pairs, "baseline": [10.0] * pairs}
        return TrialOutcome(True, result=result, duration_s=1.0)

    confirmation.confirm(
        baseline,
        [baseline, lucky, *steady, *others],
        ["fake"],
        pairs=1,
        pacing=Pacing(),
        time_left_s=lambda: 600.0,
        run_pairs=run_pairs,
        tell=lambda event: None,
    )
    # By their single passes the two would be 2x16 (132) and the lucky 4x4 (130).
    assert asked[:2] == [(2, 16), (2, 4)]


def test_lone_layouts_keep_the_order_of_their_figures():
    records = [_trial(n, 100.0 - 3 * n, workers=n + 1) for n in range(5)]
    estimates = pooled(records)
    figures = [estimates[config_key(r.config)] for r in records]
    assert figures == sorted(figures, reverse=True)


def test_records_without_a_figure_are_left_out():
    failed = TrialRecord(
        number=1, state=TrialState.FAIL, role=Role.SEARCH, config=TrialConfig(backend="fake")
    )
    assert pooled([failed]) == {}
    only = _trial(2, 50.0, workers=2)
    assert pooled([failed, only]) == {config_key(only.config): pytest.approx(50.0)}
