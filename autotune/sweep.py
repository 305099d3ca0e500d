"""`autotune sweep`: an Optuna search over the layouts that fit this machine, within a budget.

Order of work (`Sweep.run`):

1. the naive baseline (trial 0), then the seeds' recipes, then the sampler's suggestions —
   each one goes through `Sweep._search`, the one path that turns a suggestion into a run, a
   recorded reason not to run it (the space refuses it), or no record at all (measured
   already, too long for the time left); runs happen in their own process with a deadline
   (`trial.run_in_child`, or an injected runner). Between them the budget goes where the
   speed is: each backend's fastest layout is measured with its other weights first
   (`Sweep._screen`, the knobs marked `Knob.screen`), then climbs the batch axis (x4 while a
   step keeps `_CLIMB_KEEPS` of its speed), the other backends' recipes wait for that climb,
   on a CPU host the fastest layout's one-knob neighbours come next (`Sweep._neighbours`),
   a backend under `DOMINATED` of the leader after its climb (on a CPU host, under
   `_SCREEN_DOMINATED` at its batch, before) gets no more trials, and a suggestion too long
   for the time left runs at a smaller batch that fits;
2. the best three are re-measured side by side with the baseline, alternately (A B A B), and
   the winner is the one with the best paired speedup, reported with a confidence interval;
3. ``best.env`` (the winner as env vars) and ``summary.json`` are written.

Every trial, finished, failed or pruned, is a `TrialRecord`: a line in ``trials.jsonl`` (synced
as it ends) and the same record in the Optuna study (``study.db``, or any ``--storage`` URL, so
several machines can share one study). Ctrl-C stops at once, keeps every finished trial, and
still writes best.env from what was measured. The clock and the trial runner are injected, so
tests run a whole sweep on a fake clock in no time (`backends.fake.SimulatedTrials`).
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.agreement import agreement, answer_family, family_reference, is_reference
from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.files import atomic_write
from autotune.knobs import Target
from autotune.measure import Pacing, refills, width_of
from autotune.memory_plan import MemoryPlanner
from autotune.space import Fixed, SearchSpace, Unfit, config_key
from autotune.stats import speedup_interval
from autotune.study import Role, StudyDir, TrialRecord, TrialState
from autotune.trial import TrialOutcome, run_in_child
from autotune.workload import GenerationSettings
from backends import backend_class
from backends.llamacpp_probe import ExtraBuffersVerdict

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

_CONFIRM_SHARE = 0.25  # of the budget kept for the paired re-measurement
_MAX_IDLE_ASKS = 60  # suggestions in a row that could not run: the space is exhausted
_MAX_UNFIT_ASKS = 20  # suggestions in a row too long for the time left: the search ends
# A backend whose best, after its batch climb, is under this share of the leader's gets no
# more trials: a clear margin (in 4-minute sweeps on 2 vCPUs, torch's best measured 0.18-0.68x
# llama.cpp's).
DOMINATED = 0.5
# On a CPU host a backend is dropped before its climb when its best is under this share of
# the leader's fastest layout at a batch no wider: along the batch axis torch gained at most
# x1.9 on llama.cpp per x4 step (2 vCPUs: hf/llama.cpp 0.22 at batch 1, 0.41 at 4, 0.77 at
# 16), and a 10-minute sweep spent 2 of its 7.5 search minutes climbing hf and the pipeline
# from x0.26 and x0.30. On a GPU batching gains far more, and nothing is dropped this early.
_SCREEN_DOMINATED = 1 / 3
_CLIMB = 2  # positions up the batch list per climbing step: batch x4
# A climbing step under this share of the speed it started from ends the climb: one pass is
# noisy (llama.cpp 2x1 at batch 4 measured 52.5, 70.2, 84.2 and 86.0 tokens/s in four sweeps
# on 2 vCPUs; at batch 8, 60.7 in one and 67.4 in a longer experiment).
_CLIMB_KEEPS = 0.8
# A backend not measured yet is priced at this many times its first guess when deciding what
# fits the time left: the guess is one number for every machine (hf on 2 vCPUs: 9.6-23.6
# tokens/s at batch 1-4 where it guesses 25), and a trial that overruns eats the time kept for
# re-measuring.
_UNMEASURED = 2.0
_CLIMBED = "climbed"
# Another layout of a backend (other workers, threads, weights...) within this share of the
# backend's best climbs too, one only: a 10-minute sweep on 2 vCPUs climbed 1x2 (62.7 tokens/s
# at batch 1) and never 2x1 (62.6), a tie inside one pass's noise.
_TIE = 0.9
_LINEAGES = 2  # layouts whose batch climbs, per backend
# The most one search trial may be expected to take, as a share of the search's part of the
# budget: that 10-minute sweep spent a third of its search on one climb step to batch 64.
_STEP_SHARE = 0.2
_TOP = 3
_AGREE = 0.10  # a search figure this close to the paired median needs no note
_MARGIN_S = 5.0  # kept back from every deadline for writing the outputs
# A reference run answers the first prompts of every trial's pass (the same balanced order)
# once, cold; the agreement of a trial is over these.
REFERENCE_PROMPTS = 8
_REFERENCE_PACING = Pacing(prompts=REFERENCE_PROMPTS, warmup=0)


@dataclass
class SweepOptions:
    """Everything `autotune sweep` was asked to do."""

    study: str
    reports_dir: Path
    budget_s: float
    trials: int | None = None
    storage: str | None = None
    resume: bool = False
    backends: list[str] = field(default_factory=list)
    workload: str | None = None
    limit: int | None = None  # only the first N prompts of the workload
    pacing: Pacing = field(default_factory=Pacing)
    min_agreement: float | None = None  # layouts whose answers agree less are pruned
    memory_limit_bytes: int | None = None
    trial_timeout_s: float | None = None
    base: TrialConfig = field(default_factory=TrialConfig)
    pairs: int = 3
    seed: int | None = None
    # The machine file the trials were simulated on (`autotune.simulate`), or None: measured.
    simulated: str | None = None
    warm_start: str | None = None  # a previous study whose best layouts are tried first
    # This CPU's verdict on llama.cpp's extra buffer types (`backends.llamacpp_probe`), probed
    # before the first llama.cpp trial; None where not probed (a simulated machine, or no
    # llama.cpp backend searched).
    extra_buffers: ExtraBuffersVerdict | None = None


# ---------------------------------------------------------------- progress events


@dataclass(frozen=True)
class TrialStarted:
    number: int
    config: TrialConfig
    role: Role
    name: str
    deadline_s: float


@dataclass(frozen=True)
class TrialEnded:
    record: TrialRecord


@dataclass(frozen=True)
class ConfirmStarted:
    number: int
    config: TrialConfig
    pairs: int


@dataclass(frozen=True)
class ConfirmSkipped:
    number: int  # too little time left for even one pair


@dataclass(frozen=True)
class ConfirmFailed:
    number: int
    failure_class: str | None


@dataclass(frozen=True)
class Interrupted:
    pass


@dataclass(frozen=True)
class BackendDropped:
    backend: str
    reason: str


@dataclass(frozen=True)
class LogRepaired:
    path: Path
    dropped: str  # the torn last line (a sweep killed while writing it), cut off


@dataclass(frozen=True)
class SearchEnded:
    reason: str  # why the search stopped before its share of the budget was spent


@dataclass
class SweepSummary:
    """What the sweep found."""

    study: str
    directory: Path
    trials: list[TrialRecord]
    winner: TrialRecord | None
    baseline: TrialRecord | None
    elapsed_s: float
    interrupted: bool = False
    uses_smt_siblings: bool = False
    note: str | None = None
    min_agreement: float | None = None
    dropped: dict[str, str] = field(default_factory=dict)  # backend -> why no more trials
    skipped: dict[str, str] = field(default_factory=dict)  # recipe -> why it never ran
    extra_buffers: str | None = None  # the probe's verdict in words, where it ran

    @property
    def best_recipe(self) -> TrialRecord | None:
        recipes = [r for r in self.trials if r.role is Role.RECIPE and r.complete]
        return max(recipes, key=lambda r: r.value, default=None)

    def count(self, state: TrialState) -> int:
        return sum(r.state is state for r in self.trials)


@dataclass
class _Candidate:
    trial: Any  # optuna.trial.Trial
    config: TrialConfig | None
    role: Role
    name: str
    refused: str | None = None  # the space's reason not to run it


class Sweep:
    """One sweep: `run` searches, confirms and writes the study's outputs.

    ``clock`` is a monotonic clock in seconds; ``runner(spec, deadline_s)`` runs one trial spec
    and returns a `TrialOutcome`. ``extra`` configs are measured right after the recipes
    (tests inject failing trials this way).
    """

    def __init__(
        self,
        options: SweepOptions,
        *,
        topology,
        model,
        shape,
        clock: Callable[[], float] = time.monotonic,
        runner: Callable[[dict, float], TrialOutcome] = run_in_child,
        on_event: Callable[[object], None] | None = None,
        extra: list[TrialConfig] = (),
    ) -> None:
        self.options = options
        self.topology = topology
        self.model = model
        self.clock = clock
        self.runner = runner
        self.tell = on_event or (lambda event: None)
        self.extra = [(config, Role.EXTRA, "injected") for config in extra]
        self.dir = StudyDir(options.reports_dir / options.study)
        # Trials cycle the workload to keep any batch full: the batch is bounded by the space
        # and memory, not by the number of prompts.
        verdict = options.extra_buffers
        self.target = Target.of(
            topology, shape, extra_buffers=verdict.offered if verdict else (None,)
        )
        limit = options.memory_limit_bytes or int(topology.memory_available_bytes * 0.8)
        self.planner = MemoryPlanner(shape, limit, topology)
        self.space = SearchSpace(self.target, options.backends, options.base, self.planner)
        self.records: list[TrialRecord] = []
        self.note: str | None = None  # what the summary must say about the winner
        # Per backend, (load seconds, seconds per generated token) of its measured trials.
        self.costs: dict[str, list[tuple[float, float]]] = {}
        # Per answer family (`autotune.agreement.answer_family`): the reference run's answers,
        # or None where the reference failed (agreement unknown for that family).
        self.references: dict[str, dict | None] = {}
        self.seen: dict[str, int] = {}
        # Per layout climbing the batch axis (`_lineage`: its config but the batch): (tokens/s
        # the step started from, the key of the wider layout queued), or _CLIMBED once over.
        self.climbs: dict[tuple[str, str], tuple[float, str] | str] = {}
        self.deferred: list = []  # recipes of the other backends, queued after the climb
        self.screened: set[str] = set()  # backends whose screened knobs were measured
        self.visited: set[str] = set()  # keys of the layouts whose neighbours were queued
        self.skipped: dict[str, str] = {}  # recipe name -> why it was not run
        self.rng = random.Random(options.seed)  # the exploration after a duplicate
        self.log = None  # trials.jsonl, open while the sweep runs
        self.started = clock()

    # ------------------------------------------------------------ deadlines

    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def time_left_s(self) -> float:
        """Seconds left of the whole budget."""
        return self.options.budget_s - self.elapsed_s()

    def search_left_s(self) -> float:
        """Seconds left for the search: the budget less the share kept for confirming."""
        return self.time_left_s() - self.options.budget_s * _CONFIRM_SHARE

    def planned_tokens(self, config: TrialConfig, pacing: Pacing | None = None) -> int:
        """Tokens a trial of ``config`` generates at least: its warmup waves and its timed
        passes, each sized by the pacing (the sweep's unless given) for the layout's width."""
        pacing, width = pacing or self.options.pacing, width_of(config)
        one_pass = pacing.pass_prompts(width, refills(config))
        requests = pacing.warmup * width + pacing.repeats * one_pass
        return requests * config.max_new_tokens

    def expected_s(self, config: TrialConfig, pacing: Pacing | None = None) -> float:
        """What a trial of ``config`` is expected to take: its backend's load time and seconds
        per generated token as measured so far (else the backend's first guess), times the
        tokens the trial generates (more for a wider layout). The seconds per token are the
        backend's best so far: a wide layout is worth trying only if it is at least that
        fast (the naive and the recipes' batch-1 layouts would price it at twice its cost)."""
        seen = self.costs.get(config.backend)
        if seen:
            load = statistics.fmean(load for load, _ in seen)
            per_token = min(per for _, per in seen)
        else:
            guess = backend_class(config.backend)
            load, per_token = guess.first_guess_load_s, 1.0 / guess.first_guess_tokens_per_s
        return load + per_token * self.planned_tokens(config, pacing)

    def cost_s(self, config: TrialConfig) -> float:
        """What running ``config`` now is expected to take: its trial, and first its answer
        family's reference run where that has not run yet; `_UNMEASURED` times that for a
        backend with no measured trial."""
        family = answer_family(config)
        cost = self.expected_s(config)
        if family not in self.references and not is_reference(config):
            reference = family_reference(family, self.target, self.options.base)
            cost += self.expected_s(reference, _REFERENCE_PACING)
        return cost if config.backend in self.costs else _UNMEASURED * cost

    def trial_deadline_s(self, config: TrialConfig, role: Role) -> float:
        """How long one trial may run: never into the confirmation share's last seconds, never
        more than 4x its expected cost (the baseline, which every speedup needs, up to 10 min)."""
        room = self.time_left_s() - _MARGIN_S
        limit = max(5.0, min(room, 4 * self.expected_s(config) + 30))
        if role is Role.BASELINE:
            limit = max(limit, min(room, 600.0))
        if self.options.trial_timeout_s:
            limit = min(limit, self.options.trial_timeout_s)
        return limit

    # ------------------------------------------------------------ the run

    def run(self) -> SweepSummary:
        """Search, confirm, write summary.json and best.env; returns the summary."""
        warm = self._warm_layouts()  # a bad --warm-start fails before anything is written
        study = self._open_study()
        self._write_machine()
        torn = self.dir.drop_torn_tail()  # a sweep killed mid-write: append after whole lines
        if torn:
            self.tell(LogRepaired(self.dir.trials, torn))
        self.records = _previous_records(study)
        for record in self.records:
            self._remember(record)
        if self.options.resume:
            self._resume_fixed(study, warm)
        else:  # a new study: the fixed layouts first
            self._enqueue_fixed(study, warm)
        interrupted = False
        with self.dir.open_log() as log:
            self.log = log
            try:
                self._search(study)
            except KeyboardInterrupt:
                interrupted = True
                self.tell(Interrupted())
            baseline = next(
                (r for r in self.records if r.role is Role.BASELINE and r.complete), None
            )
            winner = None
            if not interrupted:
                try:
                    winner = self._confirm(baseline)
                except KeyboardInterrupt:
                    interrupted = True
            if winner is None:
                done = self._measured_trials()
                best = max(done, key=lambda r: r.value, default=None)
                winner = best.with_(confirmed=False) if best else None
        summary = SweepSummary(
            study=self.options.study,
            directory=self.dir.path,
            trials=self.records,
            winner=winner,
            baseline=baseline,
            elapsed_s=self.elapsed_s(),
            interrupted=interrupted,
            note=_simulated_note(self.options.simulated, self.note),
            min_agreement=self.options.min_agreement,
            dropped=dict(self.space.dropped),
            skipped=dict(self.skipped),
            extra_buffers=verdict.describe() if (verdict := self.options.extra_buffers) else None,
        )
        summary.uses_smt_siblings = _write_outputs(summary, self.dir, self.topology)
        return summary

    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = self.dir.storage_url(self.options.storage)
        # A --storage URL is opened before anything is written; the default SQLite file needs
        # the study's directory first.
        if not self.options.storage:
            self.dir.create()
        try:
            existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        except Exception as error:  # noqa: BLE001 - any storage failure is the URL's fault
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"--storage {storage}: cannot open it ({type(error).__name__}: {first[:160]})"
            ) from None
        if self.options.study in existing and not self.options.resume:
            raise ConfigError(
                f"--study {self.options.study}: a study of that name exists in {storage}; "
                "add --resume to continue it, or name another"
            )
        self.dir.create()
        study = optuna.create_study(
            study_name=self.options.study,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=self.options.seed),
        )
        # Trials of one study are compared with each other: they must run on one machine...
        machine = {"fingerprint": self.topology.fingerprint(), "simulated": self.options.simulated}
        recorded_machine = study.user_attrs.get("machine") or self._machine_on_disk()
        if recorded_machine is None:
            study.set_user_attr("machine", machine)
        elif recorded_machine != machine:
            raise ConfigError(_machine_differs(self.options.study, recorded_machine, machine))
        # ... and measure the same thing.
        measurement = self.measurement()
        recorded = study.user_attrs.get("measurement")
        if recorded is None:
            study.set_user_attr("measurement", measurement)
        elif recorded != measurement:
            raise ConfigError(_measurement_differs(self.options.study, recorded, measurement))
        return study

    def measurement(self) -> dict:
        """What every trial of this study measures: the prompts (the workload file and its
        hash, the first --limit of them), the pacing of the passes, and the shared config
        (model, tokens)."""
        from autotune.cache import file_sha256
        from autotune.workload import DEFAULT_WORKLOAD

        workload = Path(self.options.workload or DEFAULT_WORKLOAD)
        return {
            "workload": self.options.workload or "shipped default",
            "workload_sha256": file_sha256(workload),
            "limit": self.options.limit,
            **self.options.pacing.to_dict(),
            "base": self.options.base.to_dict(),
        }

    def _machine_on_disk(self) -> dict | None:
        """The machine of a study made before the study recorded it: its machine.json."""
        found = self.dir.read_json(self.dir.machine, "machine.json")
        if not found:
            return None
        return {"fingerprint": found.get("fingerprint"), "simulated": found.get("simulated")}

    def _write_machine(self) -> None:
        self.dir.write_json(
            self.dir.machine,
            {
                "topology": self.topology.to_dict(),
                "fingerprint": self.topology.fingerprint(),
                "model": str(self.model.path),
                "model_embedded": bool(self.model.embedded),
                "simulated": self.options.simulated,
                "llama_extra_buffers": (
                    self.options.extra_buffers.to_dict() if self.options.extra_buffers else None
                ),
            },
        )

    def _warm_layouts(self) -> list[Fixed]:
        """The best `_TOP` layouts of the --warm-start study that this search can run, best
        first; a study of another machine or model is refused (ConfigError)."""
        name = self.options.warm_start
        if not name:
            return []
        previous = StudyDir(self.options.reports_dir / name)
        machine = previous.read_json(previous.machine, "machine.json")
        if machine is None:
            where = self.options.reports_dir
            raise ConfigError(f"--warm-start {name}: no such study in {where}")
        if machine.get("fingerprint") != self.topology.fingerprint():
            raise ConfigError(
                f"--warm-start {name}: measured on machine {machine.get('fingerprint')}, this "
                f"one is {self.topology.fingerprint()}; a layout's speed does not carry over"
            )
        if machine.get("model") != str(self.model.path):
            raise ConfigError(
                f"--warm-start {name}: measured with model {machine.get('model')}, this sweep "
                f"runs {self.model.path}"
            )
        done = [
            r
            for r in previous.records()
            if r.complete and r.role in (Role.SEARCH, Role.RECIPE, Role.EXTRA, Role.WARM)
        ]
        found, keys = [], set()
        for record in sorted(done, key=lambda r: r.value, reverse=True):
            config = self.options.base.replace(
                **{k: v for k, v in record.config.items() if k in _LAYOUT_FIELDS}
            )
            if config_key(config) in keys or self.space.refusal(config) is not None:
                continue
            keys.add(config_key(config))
            label = f"warm start: {name} trial {record.number}, {record.value:.1f} tokens/s there"
            found.append(Fixed(label, Role.WARM.value, config))
            if len(found) == _TOP:
                break
        return found

    def _fixed_layouts(self, warm: list[Fixed] = ()) -> tuple[list[Fixed], list[Fixed]]:
        """(queued first, waiting): the baseline, the ``warm`` layouts (--warm-start) and the
        baseline backend's recipes; the other backends' recipes, which wait until nothing
        else is queued and no climb goes on (`_release_recipe`): the baseline's backend is
        the one expected fastest here (`baseline_priority`), and its batch climb is where a
        short budget finds the most speed."""
        baseline = self.space.baseline()
        first, waiting = [baseline, *warm], []
        for fixed in self.space.recipes():
            (first if fixed.config.backend == baseline.config.backend else waiting).append(fixed)
        return first, waiting

    def _enqueue_fixed(self, study, warm: list[Fixed] = ()) -> None:
        """A new study's fixed layouts (`_fixed_layouts`), queued as Optuna trials with their
        parameters (so the sampler learns from them), or waiting."""
        first, waiting = self._fixed_layouts(warm)
        for fixed in first:
            self._enqueue(study, fixed)
        self.deferred.extend(waiting)

    def _resume_fixed(self, study, warm: list[Fixed] = ()) -> None:
        """A resumed study goes on with exactly the fixed layouts left: those with no record,
        no trial queued and no trial running in a live sweep (several may share a study).
        A trial its sweep was killed in is failed (it has no record) and its layout queued
        again, ahead of the queue it was taken from, so the baseline is still measured
        first; the waiting recipes are rebuilt."""
        import optuna

        states = optuna.trial.TrialState
        for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            if _abandoned(trial):
                study.tell(trial.number, state=states.FAIL)
        pending = study.get_trials(deepcopy=False, states=(states.WAITING, states.RUNNING))
        covered = {(r.role.value, r.name) for r in self.records}
        covered |= {(t.user_attrs.get("role"), t.user_attrs.get("name")) for t in pending}
        first, waiting = self._fixed_layouts(warm)
        missing = [fixed for fixed in first if (fixed.role, fixed.name) not in covered]
        if missing:
            # Optuna asks its queue in order: the queued trials step out and line up again
            # behind what was queued before them.
            queued = [t for t in pending if t.state is states.WAITING]
            for _ in queued:
                study.tell(study.ask(), state=states.FAIL)
            for fixed in missing:
                self._enqueue(study, fixed)
            for trial in queued:
                study.enqueue_trial(trial.system_attrs["fixed_params"], user_attrs=trial.user_attrs)
        self.deferred.extend(f for f in waiting if (f.role, f.name) not in covered)

    def _enqueue(self, study, fixed) -> None:
        """Queue a fixed layout; one outside the space is injected as it is."""
        attrs = {"role": fixed.role, "name": fixed.name}
        try:
            study.enqueue_trial(self.space.params(fixed.config), user_attrs=attrs)
        except Unfit:
            self.extra.insert(0, (fixed.config, Role(fixed.role), fixed.name))

    def _release_recipe(self, study) -> bool:
        """Queue the next waiting recipe that fits the search's time left (those that do not,
        and those of a dropped backend, are named in the summary); returns whether one was."""
        while self.deferred:
            fixed = self.deferred.pop(0)
            dropped = self.space.dropped.get(fixed.config.backend)
            if dropped:
                self.skipped[fixed.name] = f"{fixed.config.backend} was dropped: {dropped}"
                continue
            expected, left = self.cost_s(fixed.config), self.search_left_s()
            if expected <= left:
                self._enqueue(study, fixed)
                return True
            self.skipped[fixed.name] = f"expected {expected:.0f} s with {left:.0f} s left"
        return False

    def _search(self, study) -> None:
        """The fixed layouts, then, each time nothing is queued: backends dominated by a clear
        margin are dropped, the leading backends' weights are screened, their best layouts
        climb the batch axis, and the sampler fills the rest. A suggestion too long for the
        time left runs at the largest batch that fits."""
        import optuna

        idle = unfit = 0
        done = sum(r.state is not TrialState.PRUNED for r in self.records)
        while True:
            if self.options.trials is not None and done >= self.options.trials:
                return
            if self.search_left_s() <= 0 or idle >= _MAX_IDLE_ASKS:
                return
            if unfit >= _MAX_UNFIT_ASKS:
                room, left = self.room_s(), self.search_left_s()
                self.tell(
                    SearchEnded(
                        f"no layout asked for fits in the {room:.0f} s a trial may take "
                        f"({left:.0f} s of the search left)"
                    )
                )
                return
            if not self.extra and not _waiting(study):
                # Drop first: dropping a backend renames the sampler's backend parameter, and
                # a trial queued before that would lose its backend (the sampler would pick).
                self._drop_dominated()
                (
                    self._screen(study)
                    or self._climb(study)
                    or self._release_recipe(study)
                    or self._neighbours(study)
                )
            candidate = self._candidate(study)
            if self._repeated(candidate):
                # Asked for again: no record (it says nothing new; a 10-minute sweep of the
                # 2-vCPU model once ended in 60 of them), and a layout not measured yet that
                # fits the time left is queued in its place, or the search is over.
                study.tell(candidate.trial, state=optuna.trial.TrialState.FAIL)
                idle += 1
                if not self._explore(study):
                    if self.space.exhausted:
                        return  # every layout of the space is measured: on to confirming
                    unfit += 1
                continue
            reason = candidate.refused
            if not reason and self._too_long(candidate):
                # Asked for, never run: no record (a flood of "would not finish" records
                # at the end of the budget said nothing); its narrower neighbour is queued.
                study.tell(candidate.trial, state=optuna.trial.TrialState.FAIL)
                room = self.room_s()
                cost = self.cost_s(candidate.config)
                why = f"expected {cost:.1f} s, over the {room:.1f} s a trial may take"
                # Else another layout that fits, not measured yet: a sampler that keeps asking
                # for long layouts must not end the search with most of its budget left.
                queued = self._fit(study, candidate.config, why) or self._explore(study)
                unfit = 0 if queued else unfit + 1
                continue
            unfit = 0
            if reason:
                # The space refused it: recorded (the reason says why), and a refusal tells
                # the sampler nothing (it is told FAIL), so it would ask for the same region
                # again (8-GPU simulation: 60 suggestions in a row over a GPU's memory ended
                # a sweep at an eighth of its budget): its narrower batch, or elsewhere.
                self._prune(study, candidate, reason)
                idle += 1
                if candidate.config is None or not self._fit(study, candidate.config, reason):
                    self._explore(study)
                continue
            idle = 0
            self._run(study, candidate)
            done += 1

    def _candidate(self, study) -> _Candidate:
        """The next thing to try: an injected config while no fixed layout waits, else the
        sampler's (or the queue's) next trial."""
        injected = self.extra and not _waiting(study)  # before the ask takes a queued trial
        trial = _ask(study)
        if injected:
            config, role, name = self.extra.pop(0)
            return _Candidate(trial, config, role, name)
        role = Role(trial.user_attrs.get("role", Role.SEARCH.value))
        name = trial.user_attrs.get("name", "")
        try:
            return _Candidate(trial, self.space.suggest(trial), role, name)
        except Unfit as why:
            return _Candidate(trial, why.config, role, name, refused=str(why))

    def _explore(self, study) -> bool:
        """After the sampler asked for a config measured already (or one the space refused),
        queue a random one not yet measured that fits `room_s`; returns whether one was. The
        ask is hidden from TPE (it is not a slow region), so without new information TPE
        would ask for the same point again and again."""
        room = self.room_s()
        config = self.space.random_config(
            self.rng, avoid=set(self.seen), fits=lambda c: self._affordable(c, room)
        )
        if config is not None:
            self._queue(study, config)
        return config is not None

    def _queue(self, study, config: TrialConfig, name: str | None = None) -> None:
        """Queue ``config`` as the sampler's next search trial (``name``: why this one); the
        layout of a waiting recipe runs as that recipe, once (`_waiting_recipe`)."""
        recipe = self._waiting_recipe(config)
        if recipe is not None:
            self._enqueue(study, recipe)
            return
        attrs = {"role": "search", **({"name": name} if name else {})}
        study.enqueue_trial(self.space.params(config), user_attrs=attrs)

    def _affordable(self, config: TrialConfig, left: float) -> bool:
        """Not measured yet, and expected to fit the ``left`` seconds of the search."""
        return config_key(config) not in self.seen and self.cost_s(config) <= left

    def _repeated(self, candidate: _Candidate) -> bool:
        """Whether the sampler asked for a layout measured already."""
        config = candidate.config
        return (
            candidate.role is Role.SEARCH
            and not candidate.refused
            and config_key(config) in self.seen
        )

    def room_s(self) -> float:
        """The most one search trial may be expected to take now: the search's time left, and
        never more than `_STEP_SHARE` of the search's part of the budget."""
        search = self.options.budget_s * (1 - _CONFIRM_SHARE)
        return min(self.search_left_s(), _STEP_SHARE * search)

    def _too_long(self, candidate: _Candidate) -> bool:
        """Whether a sampler's suggestion is expected to take more than `room_s`."""
        return candidate.role is Role.SEARCH and self.cost_s(candidate.config) > self.room_s()

    def _fit(self, study, config: TrialConfig, why: str) -> bool:
        """Queue the widest narrower batch of ``config``'s layout that the space allows, is
        not measured yet and fits the time left (``why``: why ``config`` itself did not run);
        False where none does."""
        room = self.room_s()
        for positions in range(1, len(self.target.batch_sizes)):
            narrower = self.space.step(config, "batch_size", -positions)
            if narrower is not None and self._affordable(narrower, room):
                name = f"fitted: asked for batch {config.batch_size}, {why}"
                self._queue(study, narrower, name)
                return True
        return False

    def _bests(self) -> dict[str, TrialRecord]:
        """Per backend still searched, its fastest measured trial."""
        bests: dict[str, TrialRecord] = {}
        for record in self._measured_trials():
            if record.backend in self.space.backends and (
                record.backend not in bests or record.value > bests[record.backend].value
            ):
                bests[record.backend] = record
        return bests

    def _measured_trials(self) -> list[TrialRecord]:
        """The trials measured as candidates (complete, not a reference run)."""
        return [r for r in self.records if r.complete and r.role is not Role.REFERENCE]

    def _origins(self) -> list[TrialRecord]:
        """Where batch climbs start, the fastest backend first: each backend's fastest layout,
        then its fastest other layout (`_lineage`) if that is within `_TIE` of it."""
        fastest: dict[tuple[str, str], TrialRecord] = {}  # per lineage, its fastest trial
        for record in self._measured_trials():
            lineage = _lineage(record.config)
            if lineage not in fastest or record.value > fastest[lineage].value:
                fastest[lineage] = record
        origins = []
        for best in sorted(self._bests().values(), key=lambda r: r.value, reverse=True):
            own = _lineage(best.config)
            others = [r for key, r in fastest.items() if key[0] == best.backend and key != own]
            rival = max(others, key=lambda r: r.value, default=None)
            origins += [best, rival] if rival and rival.value >= _TIE * best.value else [best]
        return origins

    def _screen(self, study) -> bool:
        """On a CPU host, queue once per backend its fastest layout at every other value of
        its screened knobs (`Knob.screen`: the weight type or dtype), the fastest backend
        first; returns whether any was queued. A backend under `DOMINATED` of the leader is
        not screened. The climbs then start from the fastest weights: on 2 vCPUs q4_0
        measured 1.5x the embedded q4_1 at 1x2 batch 8; a 10-minute sweep that never tried
        it ended at x2.2, one that screened first found it in 86 s and ended at x3.9. On a
        GPU host the recipes' small batches are launch-bound and every dtype measures alike
        there (the simulated 8-GPU node: 3 596-3 878 tokens/s for ddp 8 x batch 16 in all
        three), so a screen would pick one by noise and climb with it (float32, whose
        memory then halved the ranks a GPU holds: 71% of the optimum after 60 trials at
        worst, against 92% without a screen); the search weighs dtype there."""
        if self.target.gpus:
            return False
        bests = sorted(self._bests().values(), key=lambda r: r.value, reverse=True)
        for best in bests:
            if best.backend in self.screened or best.value < DOMINATED * bests[0].value:
                continue
            self.screened.add(best.backend)
            config, queued = TrialConfig.from_dict(best.config), False
            for knob in self.space.spaces[best.backend].knobs:
                if knob.screen:
                    variants = self.space.variants(config, knob.name)
                    queued |= self._queue_moves(study, "screen", best, knob.name, variants)
            if queued:
                return True
        return False

    def _climb(self, study) -> bool:
        """Queue the next step of a batch climb; returns whether one was queued. From each
        backend's fastest layout (the fastest backend first) and a near tie of it
        (`_origins`), the same layout at batch x4 (x2 where that does not fit `room_s`), and
        on from there while a step keeps `_CLIMB_KEEPS` of the speed it started from (a step
        is one noisy pass: a slightly slower one may be noise, and tokens/s rarely falls and
        rises again along the batch axis). Batch moves tokens/s the most, and a sampler
        drawing it at random spends a short budget before trying a wide one."""
        for origin in self._origins():
            lineage = _lineage(origin.config)
            state = self.climbs.get(lineage)
            if isinstance(state, str):  # _CLIMBED
                continue
            if state is None:
                started = sum(backend == origin.backend for backend, _ in self.climbs)
                if started >= _LINEAGES:
                    continue
            else:
                started_at, key = state
                step = self._measured(key)
                if step is None or not step.complete or step.value < _CLIMB_KEEPS * started_at:
                    self.climbs[lineage] = _CLIMBED
                    continue
                origin = step
            config, room = TrialConfig.from_dict(origin.config), self.room_s()
            for positions in (_CLIMB, 1):
                wider = self.space.step(config, "batch_size", positions)
                if wider is not None and self._affordable(wider, room):
                    name = f"climb: trial {origin.number}'s layout at batch {wider.batch_size}"
                    self._queue(study, wider, name)
                    self.climbs[lineage] = (origin.value, config_key(wider))
                    return True
            self.climbs[lineage] = _CLIMBED
        return False

    def _neighbours(self, study) -> bool:
        """On a CPU host, queue the neighbours of the fastest layout measured so far, once per
        layout; returns whether any was queued. A neighbour differs in one knob: an ordered
        one a position either way (workers 24 -> 23 and 25; `SearchSpace.step`), another one
        every other value (pinning); never the batch (the climb's) or the screened weights
        (the screen's). Where a neighbour is faster, its own neighbours come next: a hill
        climb, before the sampler's draws. The fastest layouts differ from a climbed one in a
        knob the climb holds fixed: in the speed model (`autotune.simulate`) the 16-core
        server's 32 x 1 at batch 64 gains 7% by pinning alone; over 12 seeds the best layout
        a 60-trial sweep measured there rose from 98.5% of the optimum (95.4% at worst) to
        99.8% (99.0%), what it would pick from 96.2% to 98.0%. Not on a GPU host: there the
        ranks a GPU holds and the batch trade against each other through its memory, a
        one-knob step walks along the memory limit, and 60-trial sweeps of the simulated
        8-GPU node with it picked 82% of the optimum (mean of seeds 0-3), where without it
        bench_search's seeds 0-2 pick 94.5%."""
        if self.target.gpus:
            return False
        best = max(self._bests().values(), key=lambda r: r.value, default=None)
        if best is None or config_key(best.config) in self.visited:
            return False
        self.visited.add(config_key(best.config))
        config, queued = TrialConfig.from_dict(best.config), False
        for knob in self.space.spaces[best.backend].knobs:
            if knob.name == "batch_size" or knob.screen:
                continue
            if knob.ordered:
                moved = [self.space.step(config, knob.name, positions) for positions in (-1, 1)]
            else:
                moved = self.space.variants(config, knob.name)
            queued |= self._queue_moves(study, "neighbour", best, knob.name, moved)
        return queued

    def _queue_moves(self, study, why: str, origin: TrialRecord, knob_name: str, moved) -> bool:
        """Queue each of ``moved`` (``origin``'s layout with its knob ``knob_name`` changed;
        None: no such layout) that `_affordable` lets fit `room_s`, named ``why: trial N's
        layout with KNOB VALUE``; returns whether any was queued."""
        room, queued = self.room_s(), False
        for config in moved:
            if config is not None and self._affordable(config, room):
                value = backend_class(config.backend).knob_values(config, self.target)
                name = f"{why}: trial {origin.number}'s layout with {knob_name}"
                self._queue(study, config, f"{name} {value.get(knob_name)}")
                queued = True
        return queued

    def _waiting_recipe(self, config: TrialConfig) -> Fixed | None:
        """The deferred recipe of ``config``'s very layout, taken off the waiting list (a
        10-minute sweep measured hf batch 8 twice, as a climbing step and later as seed
        000's recipe: 44 s of its 7.5 search minutes)."""
        key = config_key(config)
        for fixed in self.deferred:
            if config_key(fixed.config) == key:
                self.deferred.remove(fixed)
                return fixed
        return None

    def _measured(self, key: str) -> TrialRecord | None:
        """The record that measured the config of ``key``, if one did."""
        number = self.seen.get(key)
        return next((r for r in self.records if r.number == number and r.result), None)

    def _drop_dominated(self) -> None:
        """Drop each backend whose climb is over and whose best is under `DOMINATED` of the
        leader's, and on a CPU host one whose best is under `_SCREEN_DOMINATED` of the
        leading backend's fastest layout at a batch no wider, climbed or not: it gets no
        more trials (the reason goes to the summary)."""
        bests = self._bests()
        if len(bests) < 2:
            return
        leader = max(bests.values(), key=lambda r: r.value)
        for backend, best in bests.items():
            if backend == leader.backend:
                continue
            climbed = self.climbs.get(_lineage(best.config)) == _CLIMBED
            if climbed and best.value < DOMINATED * leader.value:
                rival, share, where = leader, DOMINATED, ""
            else:
                rival = None if self.target.gpus else self._fastest_within(leader.backend, best)
                if rival is None or best.value >= _SCREEN_DOMINATED * rival.value:
                    continue
                share, where = _SCREEN_DOMINATED, f" at batch {best.config['batch_size']} or less"
            reason = (
                f"its best, {best.value:.1f} tokens/s (trial {best.number}), is "
                f"x{best.value / rival.value:.2f} {rival.backend}'s {rival.value:.1f} "
                f"(trial {rival.number}){where}, under x{share:.2f}"
            )
            self.space.drop(backend, reason)
            self.tell(BackendDropped(backend, reason))

    def _fastest_within(self, backend: str, record: TrialRecord) -> TrialRecord | None:
        """``backend``'s fastest measured trial at a batch no wider than ``record``'s."""
        batch = record.config["batch_size"]
        return max(
            (
                r
                for r in self._measured_trials()
                if r.backend == backend and r.config["batch_size"] <= batch
            ),
            key=lambda r: r.value,
            default=None,
        )

    def _run(self, study, candidate: _Candidate) -> None:
        config, trial = candidate.config, candidate.trial
        family = answer_family(config)
        if family not in self.references and not is_reference(config):
            # Every trial's answers are compared with the reference run of its family (batch
            # 1, the model's own weights, greedy): measure that first, once.
            reference = family_reference(family, self.target, self.options.base)
            self._run(study, _Candidate(_ask(study), reference, Role.REFERENCE, "reference"))
        deadline = self.trial_deadline_s(config, candidate.role)
        self.tell(TrialStarted(trial.number, config, candidate.role, candidate.name, deadline))
        if candidate.role is Role.REFERENCE:
            # Only its answers are wanted: one short cold pass, and it is no candidate.
            spec = self._spec(config, pacing=_REFERENCE_PACING.to_dict())
        else:
            spec = self._spec(config)
        outcome = self.runner(spec, deadline)
        record = TrialRecord(
            number=trial.number,
            state=TrialState.FAIL,
            role=candidate.role,
            name=candidate.name,
            config=config.to_dict(),
            duration_s=round(outcome.duration_s, 3),
            ended_s=round(self.elapsed_s(), 3),
            # Which sweep process ran it: several machines may share one study (--storage).
            worker=WORKER,
        )
        if outcome.state == "complete":
            result = outcome.result
            record = record.with_(
                result={k: result.get(k) for k in _RESULT_KEYS},
                samples=result.get("samples"),
            )
            self.planner.observe(config, result["peak_memory_bytes"])
            self.planner.observe_gpus(config, result.get("peak_gpu_memory_bytes") or {})
            answers = result.get("answers") or {}
            if family not in self.references and is_reference(config):
                self.references[family] = answers
                record = record.with_(answers=answers)
            if self.references.get(family) is not None:
                record = record.with_(agreement=agreement(answers, self.references[family]))
            unanswered = _unanswered(result)
            if unanswered:
                # Its tokens/s leaves out the requests it failed, which the user's job
                # contains: it must not win (it would fail those lines in `autotune run`).
                record = record.with_(failure_class="requests", stderr_tail=unanswered)
            elif (low := self._disagrees(record)) is not None:
                record = record.with_(state=TrialState.PRUNED, reason=low)
            else:
                record = record.with_(state=TrialState.COMPLETE, value=result["tokens_per_s"])
        else:
            if candidate.role is Role.REFERENCE:
                self.references[family] = None  # agreement stays unknown for this family
            record = record.with_(
                failure_class=outcome.failure_class,
                stderr_tail=outcome.stderr_tail,
                extra=outcome.extra,
            )
        self._keep(study, trial, record)

    def _disagrees(self, record: TrialRecord) -> str | None:
        """Why a measured trial is pruned for its answers (--min-agreement), or None."""
        minimum, measured = self.options.min_agreement, record.agreement or {}
        identical = measured.get("identical")
        if minimum is None or identical is None or identical >= minimum:
            return None
        return (
            f"answers agree {identical:.0%} with the reference run, under --min-agreement "
            f"{minimum:g} ({measured['compared']} compared)"
        )

    def _prune(self, study, candidate: _Candidate, reason: str) -> None:
        config = candidate.config
        record = TrialRecord(
            number=candidate.trial.number,
            state=TrialState.PRUNED,
            role=candidate.role,
            name=candidate.name,
            config=config.to_dict() if config else None,
            reason=reason,
        )
        self._keep(study, candidate.trial, record)

    def _keep(self, study, trial, record: TrialRecord) -> None:
        """Record a trial everywhere: Optuna's storage, trials.jsonl, the sweep's memory."""
        import optuna

        trial.set_user_attr("record", record.to_dict())
        if record.complete and record.role is not Role.REFERENCE:
            study.tell(trial, record.value)
        elif record.state is TrialState.PRUNED and record.result is not None:
            # Measured, then pruned for its answers: a region the user does not want.
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            # A trial that never ran is FAIL to Optuna, not PRUNED: TPE counts pruned trials in
            # its "bad" group, which would mark the region of a duplicate or of a config asked
            # for too late as slow; failed trials it leaves out. The record says what happened.
            # A reference run, measured on a short pass of its own, is left out the same way.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        StudyDir.append(self.log, record)
        self.records.append(record)
        self._remember(record)
        self.tell(TrialEnded(record))

    def _remember(self, record: TrialRecord) -> None:
        if record.config is None or (record.state is TrialState.PRUNED and not record.result):
            return  # never ran
        self.seen[config_key(record.config)] = record.number
        if record.answers is not None:
            self.references[answer_family(TrialConfig.from_dict(record.config))] = record.answers
        cost = _cost(record, 0 if record.role is Role.REFERENCE else self.options.pacing.warmup)
        if cost is not None:
            self.costs.setdefault(record.backend, []).append(cost)

    def _spec(self, config: TrialConfig, **extra) -> dict:
        return {
            "config": config.to_dict(),
            "workload": self.options.workload,
            "limit": self.options.limit,
            "pacing": self.options.pacing.to_dict(),
            **extra,
        }

    # ------------------------------------------------------------ confirmation

    def _confirm(self, baseline: TrialRecord | None) -> TrialRecord | None:
        """Re-measure the best three beside the baseline (A B A B) and pick the winner on that."""
        if baseline is None:
            return None
        searched = set(self.space.backends) | {baseline.backend}
        done = sorted(
            (
                r
                for r in self.records
                if r.complete
                and r.role not in (Role.BASELINE, Role.REFERENCE)
                and r.backend in searched
            ),
            key=lambda r: r.value,
            reverse=True,
        )
        unique, keys = [], {config_key(baseline.config)}
        for record in done:
            if config_key(record.config) not in keys:
                keys.add(config_key(record.config))
                unique.append(record)
        base_config = TrialConfig.from_dict(baseline.config)
        confirmed = []
        for record in unique[:_TOP]:
            left = self.time_left_s() - _MARGIN_S
            pairs = self.options.pairs  # as many as fit in the time left, at least one
            while pairs > 1 and _paired_cost(record, baseline, pairs) > left:
                pairs -= 1
            if _paired_cost(record, baseline, pairs) > left:
                self.tell(ConfirmSkipped(record.number))
                continue
            config = TrialConfig.from_dict(record.config)
            self.tell(ConfirmStarted(record.number, config, pairs))
            spec = self._spec(config, paired=base_config.to_dict(), pairs=pairs)
            outcome = self.runner(spec, max(5.0, left))
            if outcome.state != "complete":
                self.tell(ConfirmFailed(record.number, outcome.failure_class))
                continue
            rates = {side: outcome.result[side] for side in ("candidate", "baseline")}
            failed = sum((outcome.result.get("failed_requests") or {}).values())
            if failed or min(rates["candidate"] + rates["baseline"]) <= 0:
                # Not the same job on both sides (or no tokens at all): no ratio to claim.
                self.tell(ConfirmFailed(record.number, "requests"))
                continue
            stats = speedup_interval(rates["candidate"], rates["baseline"])
            confirmed.append(record.with_(paired={**stats, **rates}, confirmed=True))
        if not confirmed:
            return None
        best = max(confirmed, key=lambda r: r.paired["speedup"])
        if best.paired["speedup"] <= 1.0:
            # The baseline is a candidate too: no layout beat it when measured side by side,
            # so exporting one would make the user's job slower.
            self.note = (
                f"no layout beat the naive baseline in paired runs (best: trial {best.number}, "
                f"x{best.paired['speedup']:.2f}); the winner is the baseline"
            )
            return baseline.with_(confirmed=True)
        runs = best.paired["candidate"]
        paired = statistics.median(runs)
        if not min(runs) <= best.value <= max(runs) and abs(best.value / paired - 1) > _AGREE:
            # One short search pass, picked as the best of many, is optimistic (or was
            # disturbed): the figure to expect is what the paired runs measured.
            self.note = (
                f"the winner's search trial measured {best.value:.1f} tokens/s, outside its "
                f"paired runs ({min(runs):.1f}-{max(runs):.1f}); expect the paired median, "
                f"{paired:.1f} tokens/s"
            )
        # The interval comes from the same pairs that picked this layout among the others.
        return best.with_(paired={**best.paired, "chosen_among": len(confirmed)})


def run_sweep(options: SweepOptions, **kwargs) -> SweepSummary:
    """`Sweep(options, **kwargs).run()`."""
    return Sweep(options, **kwargs).run()


# ---------------------------------------------------------------- helpers

# What a trial record keeps of a RunResult (the raw samples are kept beside it).
_RESULT_KEYS = (
    "tokens_per_s",
    "windows",
    "steady",
    "pass_tokens_per_s",
    "window_spread",
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
)


_FLAGS = {
    "workload": "--workload",
    "workload_sha256": "--workload (its content)",
    "limit": "--limit",
    "prompts": "--prompts",
    "repeats": "--repeats",
    "warmup": "--warmup",
    "settle_s": "--settle (seconds)",
}


def _machine_differs(study: str, recorded: dict, now: dict) -> str:
    """One line naming the machine a study ran on and the one a resumed sweep runs on."""

    def machine(found: dict) -> str:
        how = f"simulated from {found['simulated']}" if found.get("simulated") else "measured"
        return f"{found.get('fingerprint')} ({how})"

    return (
        f"--resume {study}: its trials ran on machine {machine(recorded)}, this sweep on "
        f"{machine(now)}; a resumed study continues on the same machine only: name a new study"
    )


def _measurement_differs(study: str, recorded: dict, now: dict) -> str:
    """One line naming what a resumed sweep would measure differently from its study."""
    changes = []
    for key, flag in _FLAGS.items():
        if recorded.get(key) != now.get(key) and not (key == "workload_sha256" and changes):
            changes.append(f"{flag} {now.get(key)} (the study has {recorded.get(key)})")
    base_before, base_now = recorded.get("base") or {}, now["base"]
    for name in sorted(set(base_before) | set(base_now)):
        if base_before.get(name) != base_now.get(name):
            changes.append(f"{name} {base_now.get(name)} (the study has {base_before.get(name)})")
    return (
        f"--resume {study}: its trials were measured differently; resume with the same "
        f"settings or name a new study: {'; '.join(changes)}"
    )


def _unanswered(result: dict) -> str | None:
    """Why a measured trial cannot count: requests it failed, or no token at all."""
    failed = result.get("failed_requests") or 0
    if failed:
        first = next((w for w in result.get("warnings") or () if "requests failed" in w), "")
        return f"{failed} requests failed" + (f" ({first})" if first else "")
    if not result.get("tokens_per_s"):
        return "generated no tokens"
    return None


def _waiting(study) -> bool:
    """Whether enqueued fixed layouts are still to be asked for."""
    import optuna

    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


# What a warm start takes of a previous study's layout: everything but the model, the
# generation settings and the fault (those are this sweep's own, `SweepOptions.base`).
_LAYOUT_FIELDS = frozenset(TrialConfig.__dataclass_fields__) - {
    "model",
    "fault",
    *GenerationSettings.__dataclass_fields__,
}


def _lineage(config: dict) -> tuple[str, str]:
    """A layout but its batch, (its backend, the key of the rest): the trials of one batch
    climb share it."""
    return config["backend"], config_key({**config, "batch_size": None})


def _simulated_note(machine: str | None, note: str | None) -> str | None:
    """The summary's note, first saying where every figure came from when simulated."""
    if machine is None:
        return note
    simulated = (
        f"SIMULATED on {machine}: every figure is autotune.simulate's speed model of that "
        "machine, not a measurement"
    )
    return f"{simulated}. {note}" if note else simulated


# This sweep process: host and pid, so that several sweeps sharing a study (--storage) are
# told apart, and a resumed one can tell a trial left running by a killed sweep.
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _ask(study):
    """The study's next trial, marked with this sweep process (`WORKER`): a resumed sweep
    fails the running trials of a sweep that is gone, and only those."""
    trial = study.ask()
    trial.set_user_attr("worker", WORKER)
    return trial


def _abandoned(trial) -> bool:
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


def _previous_records(study) -> list[TrialRecord]:
    """The records of a resumed study, exactly as its sweeps stored them."""
    return [
        TrialRecord.from_dict(trial.user_attrs["record"])
        for trial in study.get_trials(deepcopy=False)
        if "record" in trial.user_attrs
    ]


def _cost(record: TrialRecord, warmup: int) -> tuple[float, float] | None:
    """(load seconds, seconds per generated token) of a measured trial, or None; the tokens
    are its timed passes' and its ``warmup`` waves' (as `Sweep.planned_tokens` counts them)."""
    result = record.result or {}
    samples = record.samples or []
    generated = sum(s.get("generated_tokens") or 0 for s in samples)
    if not result.get("tokens_per_s") or not generated or not result.get("prompts"):
        return None
    per_request = samples[0]["generated_tokens"] / result["prompts"]
    width = width_of(TrialConfig.from_dict(record.config))
    generated += warmup * width * per_request
    load = result.get("load_time_s") or 0.0
    return load, max(0.0, record.duration_s - load) / generated


def _paired_cost(record: TrialRecord, baseline: TrialRecord, pairs: int) -> float:
    """Expected seconds of a paired re-measurement: both loads and warmups, 2 x pairs passes."""

    def parts(r: TrialRecord):  # (load, warmup, one timed pass)
        result = r.result or {}
        load = result.get("load_time_s") or 10.0
        passes = [s["wall_s"] for s in r.samples or () if s.get("wall_s")]
        one = statistics.median(passes) if passes else (r.duration_s - load) / 2
        prompts = result.get("prompts") or 1
        width = width_of(TrialConfig.from_dict(r.config))
        return load, one * min(1.0, width / prompts), one

    load_a, warm_a, run_a = parts(record)
    load_b, warm_b, run_b = parts(baseline)
    return load_a + load_b + warm_a + warm_b + pairs * (run_a + run_b) + 10.0


def _write_outputs(summary: SweepSummary, directory: StudyDir, topology) -> bool:
    """summary.json and best.env; returns whether the winner uses SMT siblings."""
    from autotune.export import render

    winner_threads = (
        TrialConfig.from_dict(summary.winner.config).total_threads if summary.winner else 0
    )
    data = {
        "study": summary.study,
        # More threads than the usable physical cores means SMT siblings are in use (seed
        # 001's question); the host's core count would be wrong in a container.
        "uses_smt_siblings": winner_threads > topology.usable_cores,
        "machine": {
            "physical_cores": topology.physical_cores,
            "usable_cores": topology.usable_cores,
            "usable_cpus": topology.usable_cpus,
            "threads_per_core": topology.threads_per_core,
        },
        "elapsed_s": summary.elapsed_s,
        "interrupted": summary.interrupted,
        "note": summary.note,
        "min_agreement": summary.min_agreement,
        "dropped": summary.dropped,
        "skipped_recipes": summary.skipped,
        "llama_extra_buffers": summary.extra_buffers,
        "winner": summary.winner,
        "baseline": summary.baseline,
        "counts": {state.value: summary.count(state) for state in TrialState},
    }
    directory.write_json(directory.summary, data)
    if summary.winner is not None:  # from the same data, not read back from disk
        atomic_write(
            directory.best_env, render(data, fingerprint=topology.fingerprint(), fmt="env")
        )
    return data["uses_smt_siblings"]
