"""The sweep's last step: the best layouts re-measured side by side with the baseline.

A claim that A is faster than B is made on A and B measured alternately in one run (A B A B),
never on two figures from different runs: the best `TOP` layouts of the search each run as many
pairs with the naive baseline as fit its share of the time left, and the winner is the best
by the median of its pairs' ratios (which one disturbed pass does not move) weighed with its
search estimate (`_choice`), reported as the geometric mean of its pairs' ratios with its 95%
interval (`autotune.stats.speedup_interval`).

The time kept for this is always spent on it: where a full pair no longer fits, a candidate
runs one short pair (one window a pass); where not even that fits any of them, the cheapest
runs it anyway, so there is never none. Time left over after the `TOP` goes where the choice
is least sure: a pair at a time to the least measured of the leader and the candidates still
within reach of it (`_close`), then, once one leads clearly, to more pairs of the winner (short
ones where a full one no longer fits), which narrow its interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

from autotune.config import TrialConfig
from autotune.failures import FailureClass
from autotune.measure import Pacing, spent_prompts, width_of
from autotune.space import config_key
from autotune.stats import speedup_interval
from autotune.study import Role, TrialRecord
from autotune.sweep.budget import MARGIN_S
from autotune.sweep.events import ConfirmFailed, ConfirmSkipped, ConfirmStarted
from autotune.sweep.ledger import spent_requests
from autotune.sweep.surrogate import NOISE, pooled
from autotune.trial import TrialOutcome

__all__ = ["TOP", "Confirmation", "confirm"]

TOP = 3
_AGREE = 0.10  # a search figure this close to the paired median needs no note
_MAX_PAIRS = 12  # of one candidate, where the time kept for confirming allows more
# A window of a pair counts as much as the search estimate (`_choice`): both are a ratio of
# two noisy figures (the estimate over the baseline's, the candidate's window over the
# baseline's); at 0.5 simulated 10-minute sweeps chose 96.5% of the optimum, at 1.0 96.7%.
_WINDOW_WEIGHT = 1.0
# Standard deviations: a candidate this close to the leader is measured again (`_close`).
_REACH = 2.0
# Full pairs are run only where this many times their expected cost fits: a pair is priced
# from the candidate's one search pass, and one that overran was killed at its deadline,
# leaving no paired figure (simulated sweeps, a VM and a 2-socket host); a short pair is the
# fallback.
_HEADROOM = 1.25


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
    pacing: Pacing,
    time_left_s: Callable[[], float],
    run_pairs: Callable[[TrialConfig, TrialConfig, int, float, Pacing], TrialOutcome],
    tell: Callable[[object], None],
) -> Confirmation:
    """Re-measure the best `TOP` of ``records`` (backends ``searched`` and the baseline's)
    beside ``baseline``, up to ``pairs`` A B pairs each as ``time_left_s`` allows, through
    ``run_pairs(candidate, baseline, pairs, deadline_s, pacing)`` (a `TrialOutcome`; ``pacing``
    sizes each pass, one window a pass where time is short), each in its share of the time
    left; the winner is the best by `_choice` (its pairs' ratios weighed with its search
    estimate), or the baseline where its paired speedup is not above 1."""
    if baseline is None:
        return Confirmation(None)
    # Ranked by their pooled estimates, not their own single passes (`pooled`): the best of
    # thirty single passes is mostly the luckiest.
    estimates = pooled(r for r in records if r.role is not Role.REFERENCE)
    done = sorted(
        (
            r
            for r in records
            if r.complete
            and r.role not in (Role.BASELINE, Role.REFERENCE)
            and r.backend in set(searched) | {baseline.backend}
        ),
        key=lambda r: estimates[config_key(r.config)],
        reverse=True,
    )
    unique, keys = [], {config_key(baseline.config)}
    for record in done:
        if config_key(record.config) not in keys:
            keys.add(config_key(record.config))
            unique.append(record)
    confirmed: list[TrialRecord] = []
    windows: dict[int, int] = {}  # per confirmed trial, the windows its pairs measured

    def plan(record: TrialRecord, most: int, left: float, short_left: float, owed: bool):
        """(pairs, pacing) of ``record``'s re-measurement: up to ``most`` full pairs in
        ``left`` seconds, else one short pair (one window a pass) in ``short_left``, which
        where ``owed`` (no candidate's pair fitted) runs even if it overruns; None where none
        fits."""
        count, paced = most, pacing
        while count > 1 and _HEADROOM * _paired_cost(record, baseline, count, paced) > left:
            count -= 1
        if _HEADROOM * _paired_cost(record, baseline, count, paced) > left:
            count, paced = 1, replace(pacing, windows=1)
            if _paired_cost(record, baseline, 1, paced) > short_left and not owed:
                return None
        return count, paced

    def measure(record: TrialRecord, most: int, owed: bool, share: float = 1.0) -> dict | None:
        """Up to ``most`` pairs of ``record`` that fit ``share`` of the time left
        (`plan`), as rates; None where none fits (said) or they failed. A sweep never ends
        without a paired figure it had time kept for (``owed``)."""
        total = time_left_s() - MARGIN_S
        # A short pair that does not fit its share still runs where it fits the time left:
        # the least a candidate can run.
        planned = plan(record, most, share * total, total, owed)
        if planned is None:
            tell(ConfirmSkipped(record.number))
            return None
        count, paced = planned
        tell(ConfirmStarted(record.number, record.config, count))
        outcome = run_pairs(record.config, baseline.config, count, max(5.0, total), paced)
        if not outcome.complete:
            tell(ConfirmFailed(record.number, outcome.failure_class))
            return None
        rates = {side: outcome.result[side] for side in ("candidate", "baseline")}
        failed = sum((outcome.result.get("failed_requests") or {}).values())
        if failed or min(rates["candidate"] + rates["baseline"]) <= 0:
            # Not the same job on both sides (or no tokens at all): no ratio to claim.
            tell(ConfirmFailed(record.number, FailureClass.REQUESTS))
            return None
        windows[record.number] = windows.get(record.number, 0) + count * paced.windows
        return rates

    def paired(record: TrialRecord, rates: dict) -> None:
        stats = speedup_interval(rates["candidate"], rates["baseline"])
        confirmed.append(record.with_(paired={**stats, **rates}, confirmed=True))

    top = unique[:TOP]
    # Each candidate's first pairs fit its share of the time left, so that the first does not
    # spend it all: a simulated 10-minute sweep of the desktop ran one full pair of a 512-wide
    # layout in 142 of its 150 confirming seconds, and the two others, one of them 7% faster,
    # never ran. One whose short pair does not fit its share runs that pair alone.
    for i, record in enumerate(top):
        rates = measure(record, pairs, owed=False, share=1 / (len(top) - i))
        if rates is not None:
            paired(record, rates)
    if not confirmed and top:
        # Not one short pair fitted (a wide layout's pass is long): the cheapest runs one
        # anyway. The best first would run into its deadline and leave none (a simulated
        # 2-socket sweep lost all three to timeouts that way).
        short = replace(pacing, windows=1)
        cheapest = min(top, key=lambda r: _paired_cost(r, baseline, 1, short))
        rates = measure(cheapest, 1, owed=True)
        if rates is not None:
            paired(cheapest, rates)
    if not confirmed:
        return Confirmation(None)
    ratio = {r.number: estimates[config_key(r.config)] / baseline.value for r in confirmed}

    def ranked() -> list[TrialRecord]:
        """The confirmed, best first by `_choice`: what both measurements say."""
        return sorted(confirmed, key=lambda r: _choice(r, ratio[r.number], windows), reverse=True)

    # The time kept for confirming and not spent goes where the choice is least sure: to the
    # least measured of the leader and those still within reach of it (`_close`), a pair at
    # a time, until one leads clearly; then to the leader (up to `_MAX_PAIRS` in all), which
    # narrows its interval. Short pairs where a full one no longer fits (a real 5-minute
    # sweep ended with 40 s of it unspent, its winner on one pair).
    short = replace(pacing, windows=1)
    while True:
        order = ranked()
        leader = order[0]
        close = [r for r in order[1:] if _close(leader, r, ratio, windows)]
        racing = sorted([leader, *close], key=lambda r: windows[r.number])
        racing = [r for r in racing if len(r.paired["candidate"]) < _MAX_PAIRS]
        left = time_left_s() - MARGIN_S
        fits = [r for r in racing if _paired_cost(r, baseline, 1, short) <= left]
        if not fits:
            break
        pick = fits[0]
        more = _MAX_PAIRS - len(pick.paired["candidate"])
        rates = measure(pick, 1 if close else min(pairs, more), owed=False)
        if rates is None:
            break
        merged = {side: pick.paired[side] + rates[side] for side in ("candidate", "baseline")}
        stats = speedup_interval(merged["candidate"], merged["baseline"])
        confirmed[confirmed.index(pick)] = pick.with_(paired={**stats, **merged})
    best = ranked()[0]
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


def _choice(record: TrialRecord, searched: float, windows: dict[int, int]) -> float:
    """How a confirmed ``record`` ranks among the others, a log speedup over the baseline: the
    median of its pairs' log ratios weighed with its pooled search estimate over the
    baseline's figure (``searched``) by their variances; ``windows`` holds the windows its
    pairs measured. The search estimate over the baseline's figure and one window's ratio
    are each a ratio of two figures equally noisy (the surrogate's `NOISE`), so a window
    weighs as much as the search estimate (`_WINDOW_WEIGHT`): one short pair (a window a
    pass) as much, three full pairs of three windows nine times as much. The median, because
    one disturbed pass (25% slow, on either side) moves a mean of three by 8% (on the simulated
    8-GPU node the median chose 99.3% of the optimum, the geometric mean 97.6%); the search
    estimate, because most candidates get one short pair, and on those alone simulated
    10-minute sweeps chose the VM's layout at 93% of the optimum over one at 99.8%
    (docs/sweep.md)."""
    paired = statistics.median(math.log(ratio) for ratio in record.paired["ratios"])
    weight = _weight(record, windows) - 1  # the pairs' weight, the search's being 1
    return (math.log(searched) + weight * paired) / (1 + weight)


def _weight(record: TrialRecord, windows: dict[int, int]) -> float:
    """What `_choice` weighs ``record``'s score by: its search estimate's 1 and its pairs'
    windows (``windows``), each `_WINDOW_WEIGHT`."""
    return 1 + windows[record.number] * _WINDOW_WEIGHT


def _close(
    leader: TrialRecord, other: TrialRecord, ratio: dict[int, float], windows: dict[int, int]
) -> bool:
    """Whether ``other`` may still be the faster of the two: its `_choice` is within
    `_REACH` standard deviations of the ``leader``'s, each score's deviation the surrogate's
    `NOISE` over the square root of its weight (the search estimate's, 1, and its pairs')."""
    gap = _choice(leader, ratio[leader.number], windows) - _choice(
        other, ratio[other.number], windows
    )
    spread = math.sqrt(sum(1 / _weight(r, windows) for r in (leader, other)))
    return gap < _REACH * NOISE * spread


def _paired_cost(record: TrialRecord, baseline: TrialRecord, pairs: int, pacing: Pacing) -> float:
    """Expected seconds of a paired re-measurement: both loads and warmups (where their trials
    had one), 2 x pairs passes sized by ``pacing``, from the seconds per request of the trials'
    own passes."""

    def parts(r: TrialRecord):  # (load, warmup, one timed pass)
        result = r.result or {}
        # A side whose trial ran no warmup wave runs none in the pair either: both follow
        # `autotune.measure.warmed_by_ramp` (`Budget.trial_pacing`, `pair_warmup_waves`).
        # Off by one wave in two cases only: `--warmup 0` on a layout that is not ramped
        # (its pair still warms one: priced short), and `--prompts` (its trial kept the
        # wave, its pair skips it: priced long).
        waves = 1 if (result.get("pacing") or {}).get("warmup", 1) else 0
        load = result.get("load_time_s") or 10.0
        passes = [s.wall_s for s in r.samples or () if s.wall_s]
        one = statistics.median(passes) if passes else (r.duration_s - load) / 2
        prompts = result.get("prompts") or 1
        # A pass cut at its last window spent its time on the requests before the cut.
        per_request = one / spent_requests(r)
        planned = spent_prompts(r.config, pacing)
        warmup = waves * per_request * min(width_of(r.config), prompts)
        return load, warmup, per_request * planned

    load_a, warm_a, run_a = parts(record)
    load_b, warm_b, run_b = parts(baseline)
    return load_a + load_b + warm_a + warm_b + pairs * (run_a + run_b) + 10.0
