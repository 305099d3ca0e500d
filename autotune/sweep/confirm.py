"""The sweep's last step: the best layouts re-measured side by side with the baseline.

A claim that A is faster than B is made on A and B measured alternately in one run (A B A B),
never on two figures from different runs: the best `TOP` layouts of the search each run as many
pairs with the naive baseline as fit the time left, and the winner is the best paired speedup,
with its 95% interval (`autotune.stats.speedup_interval`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from autotune.config import TrialConfig
from autotune.failures import FailureClass
from autotune.measure import width_of
from autotune.space import config_key
from autotune.stats import speedup_interval
from autotune.study import Role, TrialRecord
from autotune.sweep.budget import MARGIN_S
from autotune.sweep.events import ConfirmFailed, ConfirmSkipped, ConfirmStarted
from autotune.trial import TrialOutcome

__all__ = ["TOP", "Confirmation", "confirm"]

TOP = 3
_AGREE = 0.10  # a search figure this close to the paired median needs no note


@dataclass
class Confirmation:
    """The winner (None: nothing could be re-measured) and what the summary must say of it."""

    winner: TrialRecord | None
    note: str | None = None


def confirm(
    baseline: TrialRecord | None,
    records: list[TrialRecord],
    searched: list[str],
    *,
    pairs: int,
    time_left_s: Callable[[], float],
    run_pairs: Callable[[TrialConfig, TrialConfig, int, float], TrialOutcome],
    tell: Callable[[object], None],
) -> Confirmation:
    """Re-measure the best `TOP` of ``records`` (backends ``searched`` and the baseline's)
    beside ``baseline``, up to ``pairs`` A B pairs each as ``time_left_s`` allows, through
    ``run_pairs(candidate, baseline, pairs, deadline_s)`` (a `TrialOutcome`); the winner is
    the best paired speedup, or the baseline where no layout beat it."""
    if baseline is None:
        return Confirmation(None)
    done = sorted(
        (
            r
            for r in records
            if r.complete
            and r.role not in (Role.BASELINE, Role.REFERENCE)
            and r.backend in set(searched) | {baseline.backend}
        ),
        key=lambda r: r.value,
        reverse=True,
    )
    unique, keys = [], {config_key(baseline.config)}
    for record in done:
        if config_key(record.config) not in keys:
            keys.add(config_key(record.config))
            unique.append(record)
    base_config = baseline.config
    confirmed = []
    for record in unique[:TOP]:
        left = time_left_s() - MARGIN_S
        count = pairs  # as many as fit in the time left, at least one
        while count > 1 and _paired_cost(record, baseline, count) > left:
            count -= 1
        if _paired_cost(record, baseline, count) > left:
            tell(ConfirmSkipped(record.number))
            continue
        config = record.config
        tell(ConfirmStarted(record.number, config, count))
        outcome = run_pairs(config, base_config, count, max(5.0, left))
        if not outcome.complete:
            tell(ConfirmFailed(record.number, outcome.failure_class))
            continue
        rates = {side: outcome.result[side] for side in ("candidate", "baseline")}
        failed = sum((outcome.result.get("failed_requests") or {}).values())
        if failed or min(rates["candidate"] + rates["baseline"]) <= 0:
            # Not the same job on both sides (or no tokens at all): no ratio to claim.
            tell(ConfirmFailed(record.number, FailureClass.REQUESTS))
            continue
        stats = speedup_interval(rates["candidate"], rates["baseline"])
        confirmed.append(record.with_(paired={**stats, **rates}, confirmed=True))
    if not confirmed:
        return Confirmation(None)
    best = max(confirmed, key=lambda r: r.paired["speedup"])
    if best.paired["speedup"] <= 1.0:
        # The baseline is a candidate too: no layout beat it when measured side by side, so
        # exporting one would make the user's job slower.
        note = (
            f"no layout beat the naive baseline in paired runs (best: trial {best.number}, "
            f"x{best.paired['speedup']:.2f}); the winner is the baseline"
        )
        return Confirmation(baseline.with_(confirmed=True), note)
    note = None
    runs = best.paired["candidate"]
    paired = statistics.median(runs)
    if not min(runs) <= best.value <= max(runs) and abs(best.value / paired - 1) > _AGREE:
        # One short search pass, picked as the best of many, is optimistic (or was
        # disturbed): the figure to expect is what the paired runs measured.
        note = (
            f"the winner's search trial measured {best.value:.1f} tokens/s, outside its "
            f"paired runs ({min(runs):.1f}-{max(runs):.1f}); expect the paired median, "
            f"{paired:.1f} tokens/s"
        )
    # The interval comes from the same pairs that picked this layout among the others.
    return Confirmation(best.with_(paired={**best.paired, "chosen_among": len(confirmed)}), note)


def _paired_cost(record: TrialRecord, baseline: TrialRecord, pairs: int) -> float:
    """Expected seconds of a paired re-measurement: both loads and warmups, 2 x pairs passes."""

    def parts(r: TrialRecord):  # (load, warmup, one timed pass)
        result = r.result or {}
        load = result.get("load_time_s") or 10.0
        passes = [s.wall_s for s in r.samples or () if s.wall_s]
        one = statistics.median(passes) if passes else (r.duration_s - load) / 2
        prompts = result.get("prompts") or 1
        width = width_of(r.config)
        return load, one * min(1.0, width / prompts), one

    load_a, warm_a, run_a = parts(record)
    load_b, warm_b, run_b = parts(baseline)
    return load_a + load_b + warm_a + warm_b + pairs * (run_a + run_b) + 10.0
