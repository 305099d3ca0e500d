"""`Sweep`: one sweep, as the loop over its parts.

`Sweep.run` opens the study (`autotune.sweep.start`), queues the fixed layouts, then loops:
each time nothing is queued the steps propose (`autotune.sweep.steps.Steps`), a candidate is
asked of the queue or the sampler, and `_search` turns it into a run, a recorded reason not to
run it (the space refuses it), or no record at all (measured already, too long for the time
left). Runs happen in their own process with a deadline (`autotune.trial.run_in_child`, or an
injected runner) and are recorded by the ledger (`autotune.sweep.ledger.Ledger`). When the
search's share of the budget (`autotune.sweep.budget.Budget`) is spent, the best layouts are
re-measured against the baseline (`autotune.sweep.confirm`) and the outputs written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.agreement import agreement, answer_family, family_reference, is_reference
from autotune.config import TrialConfig
from autotune.failures import FailureClass
from autotune.knobs import Target
from autotune.measure import Pacing
from autotune.memory_plan import MemoryPlanner, memory_limit
from autotune.quality import Quality, ReferenceScores, requantized
from autotune.space import SearchSpace, Unfit, config_key
from autotune.study import Role, StudyDir, TrialRecord, TrialState
from autotune.summary import SweepSummary
from autotune.sweep.budget import REFERENCE_PACING, Budget
from autotune.sweep.confirm import confirm
from autotune.sweep.events import Interrupted, LogRepaired, SearchEnded, TrialStarted
from autotune.sweep.ledger import (
    RESULT_KEYS,
    WORKER,
    Ledger,
    ask,
    previous_records,
    unanswered,
    waiting,
)
from autotune.sweep.options import SweepOptions
from autotune.sweep.outputs import simulated_note, write_outputs
from autotune.sweep.start import (
    enqueue_fixed,
    open_study,
    resume_fixed,
    warm_layouts,
    write_machine,
)
from autotune.sweep.steps import Queue, Steps
from autotune.trial import TrialOutcome, run_in_child

__all__ = ["Sweep", "run_sweep"]

_MAX_IDLE_ASKS = 60  # suggestions in a row that could not run: the space is exhausted
_MAX_UNFIT_ASKS = 20  # suggestions in a row too long for the time left: the search ends


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
        self.shape = shape
        self.runner = runner
        self.tell = on_event or (lambda event: None)
        self.dir = StudyDir(options.reports_dir / options.study)
        verdict = options.extra_buffers
        self.target = Target.of(
            topology, shape, extra_buffers=verdict.offered if verdict else (None,)
        )
        limit = memory_limit(topology, options.memory_limit_bytes)
        self.planner = MemoryPlanner(shape, limit, topology)
        self.space = SearchSpace(self.target, options.backends, options.base, self.planner)
        self.ledger = Ledger(options.pacing.warmup, self.tell)
        self.budget = Budget(options, clock, self.ledger, self.target, topology)
        self.queue = Queue(self.space, [(config, Role.EXTRA, "injected") for config in extra])
        self.steps = Steps(
            space=self.space,
            target=self.target,
            ledger=self.ledger,
            budget=self.budget,
            queue=self.queue,
            tell=self.tell,
            seed=options.seed,
        )

    def run(self) -> SweepSummary:
        """Search, confirm, write summary.json and best.env; returns the summary."""
        # A bad --warm-start fails before anything is written.
        warm = warm_layouts(self.options, self.topology, self.model, self.space)
        study = open_study(self.options, self.dir, self.topology)
        write_machine(self.dir, self.topology, self.model, self.options)
        torn = self.dir.drop_torn_tail()  # a sweep killed mid-write: append after whole lines
        if torn:
            self.tell(LogRepaired(self.dir.trials, torn))
        self.ledger.resume(previous_records(study))
        if self.options.resume:
            resume_fixed(study, self.queue, self.space, self.ledger.records, warm)
        else:  # a new study: the fixed layouts first
            enqueue_fixed(study, self.queue, self.space, warm)
        interrupted, note = False, None
        with self.dir.open_log() as log:
            self.ledger.log = log
            try:
                self._search(study)
            except KeyboardInterrupt:
                interrupted = True
                self.tell(Interrupted())
            records = self.ledger.records
            baseline = next((r for r in records if r.role is Role.BASELINE and r.complete), None)
            winner = None
            if not interrupted:
                try:
                    confirmed = confirm(
                        baseline,
                        records,
                        self.space.backends,
                        pairs=self.options.pairs,
                        pacing=self.budget.sweep_pacing(),  # cut like the search trials
                        time_left_s=self.budget.time_left_s,
                        run_pairs=self._run_pairs,
                        tell=self.tell,
                    )
                    winner, note = confirmed.winner, confirmed.note
                except KeyboardInterrupt:
                    interrupted = True
            if winner is None:
                best = max(self.ledger.measured_trials(), key=lambda r: r.value, default=None)
                winner = best.with_(confirmed=False) if best else None
        summary = SweepSummary(
            study=self.options.study,
            directory=self.dir.path,
            trials=self.ledger.records,
            winner=winner,
            baseline=baseline,
            elapsed_s=self.budget.elapsed_s(),
            interrupted=interrupted,
            note=simulated_note(self.options.simulated, note),
            min_agreement=self.options.min_agreement,
            min_quality=self.options.min_quality.as_flag(),
            dropped=dict(self.space.dropped),
            skipped=dict(self.steps.skipped),
            extra_buffers=verdict.describe() if (verdict := self.options.extra_buffers) else None,
        )
        write_outputs(summary, self.dir, self.topology)
        return summary

    # ------------------------------------------------------------ the search

    def _search(self, study) -> None:
        """The fixed layouts, then, each time nothing is queued, the steps (`Steps.propose`)
        and the sampler fill the search's share of the budget."""
        import optuna

        budget, idle, unfit = self.budget, 0, 0
        done = sum(r.state is not TrialState.PRUNED for r in self.ledger.records)
        while True:
            if self.options.trials is not None and done >= self.options.trials:
                return
            if budget.search_left_s() <= 0 or idle >= _MAX_IDLE_ASKS:
                return
            if unfit >= _MAX_UNFIT_ASKS:
                room, left = budget.room_s(), budget.search_left_s()
                self.tell(
                    SearchEnded(
                        f"no layout asked for fits in the {room:.0f} s a trial may take "
                        f"({left:.0f} s of the search left)"
                    )
                )
                return
            if self.queue.empty(study):
                self.steps.propose(study)
            candidate = self._candidate(study)
            if self._repeated(candidate):
                # Asked for again: no record (it says nothing new; a 10-minute sweep of the
                # 2-vCPU model once ended in 60 of them), and a layout not measured yet that
                # fits the time left is queued in its place, or the search is over.
                study.tell(candidate.trial, state=optuna.trial.TrialState.FAIL)
                idle += 1
                if not self.steps.explore(study):
                    if self.space.exhausted:
                        return  # every layout of the space is measured: on to confirming
                    unfit += 1
                continue
            reason = candidate.refused
            if not reason and self._too_long(candidate):
                # Asked for, never run: no record (a flood of "would not finish" records at
                # the end of the budget said nothing); its narrower neighbour is queued, else
                # another layout that fits, not measured yet: a sampler that keeps asking for
                # long layouts must not end the search with most of its budget left.
                study.tell(candidate.trial, state=optuna.trial.TrialState.FAIL)
                room = budget.room_s()
                cost = budget.cost_s(candidate.config)
                why = f"expected {cost:.1f} s, over the {room:.1f} s a trial may take"
                queued = self.steps.fit(study, candidate.config, why) or self.steps.explore(study)
                unfit = 0 if queued else unfit + 1
                continue
            unfit = 0
            if not reason and (poor := self._under_floor(candidate)):
                # It cannot win and its run would tell nothing new: pruned unrun, and settled
                # (`seen`), so that neither the sampler nor a step asks for it again (no time
                # passes: a search of such layouts alone would never end), another queued.
                self._prune(study, candidate, poor)
                self.ledger.settle(candidate.config, candidate.trial.number)
                idle += 1
                self.steps.explore(study)
                continue
            if reason:
                # The space refused it: recorded (the reason says why), and a refusal tells
                # the sampler nothing (it is told FAIL), so it would ask for the same region
                # again (8-GPU simulation: 60 suggestions in a row over a GPU's memory ended
                # a sweep at an eighth of its budget): its narrower batch, or elsewhere.
                self._prune(study, candidate, reason)
                idle += 1
                fitted = candidate.config is not None and self.steps.fit(
                    study, candidate.config, reason
                )
                if not fitted:
                    self.steps.explore(study)
                continue
            idle = 0
            self._run(study, candidate)
            done += 1

    def _candidate(self, study) -> _Candidate:
        """The next thing to try: an injected config while no fixed layout waits, else the
        sampler's (or the queue's) next trial."""
        injected = bool(self.queue.extra) and not waiting(study)  # before the ask takes one
        trial = ask(study)
        if injected:
            config, role, name = self.queue.extra.pop(0)
            return _Candidate(trial, config, role, name)
        role = Role(trial.user_attrs.get("role", Role.SEARCH.value))
        name = trial.user_attrs.get("name", "")
        try:
            return _Candidate(trial, self.space.suggest(trial), role, name)
        except Unfit as why:
            return _Candidate(trial, why.config, role, name, refused=str(why))

    def _scored_alike(self, candidate: _Candidate) -> TrialRecord | None:
        """The trial whose quality ``candidate`` would score, where one scored it already (the
        same weights and scoring pass, `autotune.sweep.ledger.scoring_key`) against its
        family's reference."""
        config = candidate.config
        if candidate.role is Role.REFERENCE or config is None:
            return None
        if not self._reference_scores(answer_family(config)).exists():
            return None
        return self.ledger.scored_alike(config)

    def _reference_scores(self, family: str) -> Path:
        """Where the reference run of ``family`` keeps its scored answers (`ReferenceScores`)."""
        return self.dir.path / f"reference-{family}.json"

    def _under_floor(self, candidate: _Candidate) -> str | None:
        """Why ``candidate`` cannot win before it runs: its weights scored under
        --min-quality already (`_scored_alike`); None where that is not known."""
        alike = self._scored_alike(candidate)
        if alike is None or (poor := self.options.min_quality.why_below(alike.quality)) is None:
            return None
        return f"{poor}, as trial {alike.number} scored its weights"

    def _repeated(self, candidate: _Candidate) -> bool:
        """Whether the sampler asked for a layout measured already."""
        return (
            candidate.role is Role.SEARCH
            and not candidate.refused
            and config_key(candidate.config) in self.ledger.seen
        )

    def _too_long(self, candidate: _Candidate) -> bool:
        """Whether a sampler's suggestion is expected to take more than `Budget.room_s`."""
        return (
            candidate.role is Role.SEARCH
            and self.budget.cost_s(candidate.config) > self.budget.room_s()
        )

    # ------------------------------------------------------------ one trial

    def _run(self, study, candidate: _Candidate) -> None:
        config, trial = candidate.config, candidate.trial
        references = self.ledger.references
        family = answer_family(config)
        if family not in references and not is_reference(config):
            # Every trial's answers are compared with the reference run of its family (batch
            # 1, the model's own weights, greedy): measure that first, once.
            reference = family_reference(family, self.target, self.options.base)
            self._run(study, _Candidate(ask(study), reference, Role.REFERENCE, "reference"))
            if not waiting(study):  # a drop renames the backend of trials queued before it
                self.steps.drop_dominated()
            dropped = self.space.dropped.get(config.backend)
            if dropped and candidate.role in (Role.SEARCH, Role.RECIPE):
                # Its reference run showed the backend clearly slower: not worth its trial.
                self._prune(study, candidate, f"{config.backend} was dropped: {dropped}")
                return
        scores = self._reference_scores(family)
        # A layout that scores alike with one scored already takes its figures: the same
        # scoring pass again would give the same.
        alike = self._scored_alike(candidate)
        deadline = self.budget.trial_deadline_s(config, candidate.role)
        self.tell(TrialStarted(trial.number, config, candidate.role, candidate.name, deadline))
        if candidate.role is Role.REFERENCE:
            # Only its answers are wanted: one short cold pass, and it is no candidate.
            spec = trial_spec(self.options, config, REFERENCE_PACING)
        else:
            spec = trial_spec(self.options, config, self.budget.trial_pacing(config))
            if candidate.role is Role.SEARCH:
                # Passes beyond its first stop once it is clearly slower than the leader.
                spec["stop_below"] = self.ledger.leader_bar()
            if scores.exists() and alike is None:  # scored against its family's reference
                spec["quality_reference"] = str(scores)
        if family not in references and is_reference(config):
            spec["keep_reference"] = True  # its answers scored by itself: the reference's
        outcome = self.runner(spec, deadline)
        record = TrialRecord(
            number=trial.number,
            state=TrialState.FAIL,
            role=candidate.role,
            name=candidate.name,
            config=config,
            duration_s=round(outcome.duration_s, 3),
            ended_s=round(self.budget.elapsed_s(), 3),
            # Which sweep process ran it: several machines may share one study (--storage).
            worker=WORKER,
        )
        if outcome.complete:
            result = outcome.result
            kept = {k: result.get(k) for k in RESULT_KEYS}
            if alike is not None:  # its figures, not its seconds: this trial spent none
                found = {**(alike.result or {})["quality"], "scoring_s": None}
                kept["quality"] = {**found, "scored_by": alike.number}
            elif kept.get("quality") and (own := requantized(config, self.shape)):
                kept["quality"] = {**kept["quality"], "requantized_from": own}
            record = record.with_(result=kept, samples=result.get("samples"))
            for step, sample in enumerate(record.samples or ()):
                trial.report(sample.figure, step)  # Optuna sees each pass as it was measured
            self.planner.observe(config, result["peak_memory_bytes"])
            self.planner.observe_gpus(config, result.get("peak_gpu_memory_bytes") or {})
            answers = result.get("answers") or {}
            if family not in references and is_reference(config):
                references[family] = answers
                record = record.with_(answers=answers)
                if result.get("reference_scores"):
                    ReferenceScores.from_dict(result["reference_scores"]).save(scores)
            if references.get(family) is not None:
                record = record.with_(agreement=agreement(answers, references[family]))
            missing = unanswered(result)
            if missing:
                # Its tokens/s leaves out the requests it failed, which the user's job
                # contains: it must not win (it would fail those lines in `autotune run`).
                record = record.with_(failure_class=FailureClass.REQUESTS, stderr_tail=missing)
            elif (low := disagrees(record, self.options.min_agreement)) is not None:
                record = record.with_(state=TrialState.PRUNED, reason=low)
            elif (
                poor := self.options.min_quality.why_below(Quality.from_dict(result.get("quality")))
            ) is not None:
                record = record.with_(state=TrialState.PRUNED, reason=poor)
            elif result.get("stopped"):
                record = record.with_(
                    state=TrialState.PRUNED, reason=f"stopped: {result['stopped']}"
                )
            else:
                record = record.with_(state=TrialState.COMPLETE, value=result["tokens_per_s"])
        else:
            if candidate.role is Role.REFERENCE:
                references[family] = None  # agreement stays unknown for this family
            record = record.with_(
                failure_class=outcome.failure_class,
                stderr_tail=outcome.stderr_tail,
                extra=outcome.extra,
            )
        self.ledger.keep(study, trial, record)

    def _prune(self, study, candidate: _Candidate, reason: str) -> None:
        config = candidate.config
        record = TrialRecord(
            number=candidate.trial.number,
            state=TrialState.PRUNED,
            role=candidate.role,
            name=candidate.name,
            config=config,
            reason=reason,
        )
        self.ledger.keep(study, candidate.trial, record)

    def _run_pairs(
        self,
        candidate: TrialConfig,
        baseline: TrialConfig,
        pairs: int,
        deadline_s: float,
        pacing: Pacing,
    ) -> TrialOutcome:
        """The paired re-measurement of ``candidate`` against ``baseline`` (A B A B), each pass
        sized by ``pacing``."""
        spec = trial_spec(self.options, candidate, pacing, paired=baseline.to_dict(), pairs=pairs)
        return self.runner(spec, deadline_s)


def trial_spec(options: SweepOptions, config: TrialConfig, pacing, **extra) -> dict:
    """What a trial's child is given (`autotune.trial`): the config, the workload, the pacing
    (a `Pacing`), and ``extra`` (a pair's baseline, the leader's bar)."""
    return {
        "config": config.to_dict(),
        "workload": options.workload,
        "limit": options.limit,
        "pacing": pacing.to_dict(),
        **extra,
    }


def disagrees(record: TrialRecord, minimum: float | None) -> str | None:
    """Why a measured trial is pruned for its answers (--min-agreement ``minimum``), or None."""
    measured = record.agreement or {}
    identical = measured.get("identical")
    if minimum is None or identical is None or identical >= minimum:
        return None
    return (
        f"answers agree {identical:.0%} with the reference run, under --min-agreement "
        f"{minimum:g} ({measured['compared']} compared)"
    )


def run_sweep(options: SweepOptions, **kwargs) -> SweepSummary:
    """`Sweep(options, **kwargs).run()`."""
    return Sweep(options, **kwargs).run()
