"""A sweep's trials as they are recorded: the one place a trial's record is kept.

Every trial, finished, failed or pruned, is a `TrialRecord`: a line in ``trials.jsonl``
(synced as it ends) and the same record in the Optuna study (``study.db``, or any
``--storage`` URL, so several machines can share one study), from which a resumed sweep
rebuilds its records (`previous_records`). `Ledger.keep` writes both and tells Optuna the
trial's state; the ledger remembers what was measured (``seen``), the reference runs' answers
(``references``), which trial scored each weights' quality (``scored``, by `scoring_key`) and
what trials cost (``costs``, for `autotune.sweep.budget.Budget`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from autotune.agreement import answer_family
from autotune.config import TrialConfig
from autotune.measure import Pacing, spent_prompts, width_of
from autotune.space import config_key
from autotune.study import Role, StudyDir, TrialRecord, TrialState
from autotune.sweep.events import TrialEnded
from autotune.sweep.surrogate import Fit
from backends import backend_class

__all__ = [
    "RESULT_KEYS",
    "WORKER",
    "Ledger",
    "abandoned",
    "ask",
    "previous_records",
    "scoring_key",
    "spent_requests",
    "unanswered",
    "waiting",
]

# What a trial record keeps of a RunResult (the raw samples are kept beside it).
RESULT_KEYS = (
    "tokens_per_s",
    "windows",
    "steady",
    "pass_tokens_per_s",
    "tokens_per_s_low",
    "tokens_per_s_high",
    "window_spread",
    "pass_spread",
    "stable",
    "prompts",
    "requests_per_s",
    "latency_p50_s",
    "latency_p95_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "tpot_p50_s",
    "prefill_tokens_per_s",
    "load_time_s",
    "peak_memory_bytes",
    "peak_gpu_memory_bytes",
    "gpu_utilisation",
    "failed_requests",
    "cpu_utilisation",
    "tokens_per_s_summary",
    "warnings",
    "details",
    "stopped",
    "quality",
    "pacing",
)

# A leader measured in one pass has no interval: its figure less this is taken as its lower
# bound (the windows of one pass spread 6-66% in a real 5-minute sweep on 2 vCPUs, their mean
# far less: docs/results/dev-2vcpu-epyc.md, issue 25).
LEADER_MARGIN = 0.10

# This sweep process: host and pid, so that several sweeps sharing a study (--storage) are
# told apart, and a resumed one can tell a trial left running by a killed sweep.
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class Ledger:
    """The records of one sweep, and what follows from them. ``warmup``: the warmup waves of
    a trial (the sweep's pacing) whose result does not say its own, counted in its cost;
    ``tell``: the sweep's event sink."""

    def __init__(self, warmup: int, tell: Callable[[object], None]) -> None:
        self.warmup = warmup
        self.tell = tell
        self.records: list[TrialRecord] = []
        self.seen: dict[str, int] = {}  # config key -> the number of the trial that ran it
        # Per answer family (`autotune.agreement.answer_family`): the reference run's answers,
        # or None where the reference failed (agreement unknown for that family).
        self.references: dict[str, dict | None] = {}
        self.scored: dict[str, TrialRecord] = {}  # scoring key -> the trial that scored it
        # Per backend, (width, threads over all its processes, load seconds, seconds per
        # generated token) of its measured trials.
        self.costs: dict[str, list[tuple[int, int, float, float]]] = {}
        self.log = None  # trials.jsonl, open while the sweep runs
        self._fit: tuple[int, Fit, dict[str, float]] = (0, Fit(()), {})  # (records, fit, estimates)

    def resume(self, records: list[TrialRecord]) -> None:
        """Take the records a study already holds (a resumed sweep)."""
        for record in records:
            self.records.append(record)
            self.remember(record)

    def keep(self, study, trial, record: TrialRecord) -> None:
        """Record a trial everywhere: Optuna's storage, trials.jsonl, this ledger."""
        import optuna

        trial.set_user_attr("record", record.to_dict())
        if record.complete and record.role is not Role.REFERENCE:
            study.tell(trial, record.value)
        elif record.state is TrialState.PRUNED and record.result is not None:
            # Measured, then pruned: its answers (a region the user does not want), or stopped
            # early, clearly slower than the leader.
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            # A trial that never ran is FAIL to Optuna, not PRUNED: TPE counts pruned trials in
            # its "bad" group, which would mark the region of a duplicate or of a config asked
            # for too late as slow; failed trials it leaves out. The record says what happened.
            # A reference run, measured on a short pass of its own, is left out the same way.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        StudyDir.append(self.log, record)
        self.records.append(record)
        self.remember(record)
        self.tell(TrialEnded(record))

    def remember(self, record: TrialRecord) -> None:
        """What a record tells later trials: its layout was measured, its family's reference
        answers, its backend's cost."""
        if record.config is None or (record.state is TrialState.PRUNED and not record.result):
            return  # never ran
        self.seen[config_key(record.config)] = record.number
        if record.answers is not None:
            self.references[answer_family(record.config)] = record.answers
        if record.quality is not None and record.quality.scored_by is None:
            self.scored.setdefault(scoring_key(record.config), record)
        cost = trial_cost(record, 0 if record.role is Role.REFERENCE else self.warmup)
        if cost is not None:
            threads = record.config.total_threads
            self.costs.setdefault(record.backend, []).append(
                (width_of(record.config), threads, *cost)
            )

    def settle(self, config, number: int) -> None:
        """Take ``config``'s layout as decided without a run (trial ``number`` pruned it
        unrun: it cannot win), so that it is not asked for again."""
        self.seen[config_key(config)] = number

    def measured(self, key: str) -> TrialRecord | None:
        """The record that measured the config of ``key``, if one did."""
        number = self.seen.get(key)
        return next((r for r in self.records if r.number == number and r.result), None)

    def scored_alike(self, config) -> TrialRecord | None:
        """The trial whose quality ``config``'s layout would score: one of the same
        `scoring_key` that was scored, if one was."""
        return self.scored.get(scoring_key(config))

    def reference_runs(self) -> list[TrialRecord]:
        """The reference runs that measured a figure (complete)."""
        return [r for r in self.records if r.complete and r.role is Role.REFERENCE]

    def measured_trials(self) -> list[TrialRecord]:
        """The trials measured as candidates (complete, not a reference run)."""
        return [r for r in self.records if r.complete and r.role is not Role.REFERENCE]

    def leader_bar(self) -> float | None:
        """The leader's lower bound, below which a search trial stops early
        (`autotune.measure.clearly_below`): the 95% interval's low end of the fastest measured
        trial, or its figure less `LEADER_MARGIN` where one pass gave no interval."""
        leader = max(self.measured_trials(), key=lambda r: r.value, default=None)
        if leader is None:
            return None
        low = (leader.result or {}).get("tokens_per_s_low")
        return low if low is not None else leader.value * (1 - LEADER_MARGIN)

    def fastest_within(self, backend: str, record: TrialRecord) -> TrialRecord | None:
        """``backend``'s fastest measured trial at a batch no wider than ``record``'s (a
        narrower batch is slower: what ``record`` must at least match)."""
        batch = record.config.batch_size
        return max(
            (
                r
                for r in self.measured_trials()
                if r.backend == backend and r.config.batch_size <= batch
            ),
            key=lambda r: r.value,
            default=None,
        )

    def estimate(self, record: TrialRecord) -> float:
        """A measured trial's layout's pooled estimate of tokens/s
        (`autotune.sweep.surrogate.pooled`: its own figure weighed with every other trial's
        of the same knob values), what the search ranks layouts by."""
        return self._fitted()[1].get(config_key(record.config), record.value or 0.0)

    def predicted(self, config: TrialConfig) -> float | None:
        """The pooled model's tokens/s for ``config``'s layout, measured or not
        (`autotune.sweep.surrogate.Fit.predict`); None where a knob value of it was never
        measured."""
        return self._fitted()[0].predict(config)

    def _fitted(self) -> tuple[Fit, dict[str, float]]:
        if self._fit[0] != len(self.records):  # new records since: fit again
            fit = Fit(self.measured_trials())
            self._fit = (len(self.records), fit, fit.estimates())
        return self._fit[1], self._fit[2]

    def bests(self, backends) -> dict[str, TrialRecord]:
        """Per backend of ``backends`` (those still searched), its fastest measured trial by
        the pooled estimates (`estimate`)."""
        found: dict[str, TrialRecord] = {}
        for record in self.measured_trials():
            if record.backend in backends and (
                record.backend not in found
                or self.estimate(record) > self.estimate(found[record.backend])
            ):
                found[record.backend] = record
        return found


def scoring_key(config) -> str:
    """One string per scoring pass: ``config`` without the fields its backend's `score` does
    not read (`Backend.unscored`). Layouts of one key score alike, so a sweep scores the first
    and gives the others its figures (with ``scored_by``) rather than the same pass again."""
    unscored = backend_class(config.backend).unscored
    return config_key({k: v for k, v in config.to_dict().items() if k not in unscored})


def spent_requests(record: TrialRecord) -> int:
    """The requests a measured trial's pass spent its time on: all of them, or those before
    its cut where its pacing cut the tail (`autotune.measure.spent_prompts`)."""
    result = record.result or {}
    ran = Pacing.from_dict(result.get("pacing"))
    return spent_prompts(record.config, ran, result.get("prompts") or 1)


def trial_cost(record: TrialRecord, warmup: int) -> tuple[float, float] | None:
    """(load seconds, seconds per generated token) of a measured trial, or None; the tokens
    are its timed passes' and its warmup waves' (as `Budget.planned_tokens` counts them): as
    many as its pacing says, else ``warmup``."""
    result = record.result or {}
    warmup = (result.get("pacing") or {}).get("warmup", warmup)
    samples = record.samples or []
    generated = sum(s.generated_tokens for s in samples)
    if not result.get("tokens_per_s") or not generated or not result.get("prompts"):
        return None
    per_request = samples[0].generated_tokens / spent_requests(record)
    width = width_of(record.config)
    generated += warmup * width * per_request
    load = result.get("load_time_s") or 0.0
    return load, max(0.0, record.duration_s - load) / generated


def unanswered(result: dict) -> str | None:
    """Why a measured trial cannot count: requests it failed, or no token at all."""
    failed = result.get("failed_requests") or 0
    if failed:
        first = next((w for w in result.get("warnings") or () if "requests failed" in w), "")
        return f"{failed} requests failed" + (f" ({first})" if first else "")
    if not result.get("tokens_per_s"):
        return "generated no tokens"
    return None


# ---------------------------------------------------------------- the Optuna study


def ask(study):
    """The study's next trial, marked with this sweep process (`WORKER`): a resumed sweep
    fails the running trials of a sweep that is gone, and only those."""
    trial = study.ask()
    trial.set_user_attr("worker", WORKER)
    return trial


def abandoned(trial) -> bool:
    """Whether a RUNNING Optuna trial belongs to no live sweep: it names no sweep process, or
    one of this host that is gone (or is this very process, which runs one sweep at a
    time). A sweep on another host is taken to be alive."""
    host, _, pid = str(trial.user_attrs.get("worker") or "").rpartition(":")
    if not host or not pid.isdigit():
        return True
    if host != socket.gethostname():
        return False
    import psutil

    return int(pid) == os.getpid() or not psutil.pid_exists(int(pid))


def waiting(study) -> bool:
    """Whether enqueued fixed layouts are still to be asked for."""
    import optuna

    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def previous_records(study) -> list[TrialRecord]:
    """The records of a resumed study, exactly as its sweeps stored them."""
    return [
        TrialRecord.from_dict(trial.user_attrs["record"])
        for trial in study.get_trials(deepcopy=False)
        if "record" in trial.user_attrs
    ]
