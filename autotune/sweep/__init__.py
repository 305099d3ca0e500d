"""`autotune sweep`: an Optuna search over the layouts that fit this machine, within a budget.

Order of work (`Sweep.run`, in `autotune.sweep.core`):

1. the naive baseline (trial 0), then the seeds' recipes (`start`), then, each time nothing is
   queued, the steps (`steps`: the weights screened on the fastest layout, batch climbs, the
   recipes that waited for them, the fastest layout's neighbours, dominated backends dropped),
   then the sampler's draws; every trial in its own process with a deadline, recorded by the
   ledger (`ledger`: ``trials.jsonl`` and the Optuna study) whatever happens to it;
2. with the search's share of the budget spent (`budget`), the best three are re-measured side
   by side with the baseline, alternately (A B A B), and the winner is the one with the best
   paired speedup, reported with a confidence interval (`confirm`);
3. ``best.env`` (the winner as env vars) and ``summary.json`` are written (`outputs`).

Ctrl-C stops at once, keeps every finished trial, and still writes best.env from what was
measured. The clock and the trial runner are injected, so tests run a whole sweep on a fake
clock in no time (`autotune.simulate.SimulatedTrials`). Why each step, and the figures behind its
constants: docs/sweep.md.
"""

from autotune.summary import SweepSummary
from autotune.sweep.core import Sweep, run_sweep
from autotune.sweep.events import (
    BackendDropped,
    ConfirmFailed,
    ConfirmSkipped,
    ConfirmStarted,
    Interrupted,
    LogRepaired,
    SearchEnded,
    TrialEnded,
    TrialStarted,
)
from autotune.sweep.options import SweepOptions
from autotune.sweep.steps import DOMINATED

__all__ = [
    "DOMINATED",
    "BackendDropped",
    "ConfirmFailed",
    "ConfirmSkipped",
    "ConfirmStarted",
    "Interrupted",
    "LogRepaired",
    "SearchEnded",
    "Sweep",
    "SweepOptions",
    "SweepSummary",
    "TrialEnded",
    "TrialStarted",
    "run_sweep",
]
