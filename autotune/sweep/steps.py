"""The search's steps between the fixed layouts and the sampler's draws: where the budget goes.

Each time nothing is queued, `Steps.propose` drops the backends dominated by a clear margin,
then queues the first of these that has something to queue: on a GPU host, each GPU
backend's layout where the speed is and its halvings (`GpuStart`), the screen of the leading
backends' weights (`screen`), the close ones again once the batch climbed (`rescreen`), the
next step of a batch climb (`climb`), a recipe that waited for the climbs
(`release_recipe`), the fastest layout's one-knob neighbours and its cores split another
way (`neighbours`, `splits`). Layouts are
ranked by their pooled estimates (`autotune.sweep.surrogate`), not their single passes.
When none has, the sampler (Optuna's TPE) draws. `explore` and `fit` answer a draw that cannot
run (measured already, refused, too long): a layout not measured yet that fits, or the same
layout at a narrower batch. A new policy is a method here and its line in `propose` (one with
state of its own may be a class in its own module, as `GpuStart`).
The reasons for each step, and the runs that measured them: docs/sweep.md.
"""

from __future__ import annotations

import random

from autotune.config import TrialConfig
from autotune.space import Fixed, Unfit, config_key
from autotune.study import Role, TrialRecord
from autotune.sweep.events import BackendDropped
from autotune.sweep.gpu_start import GpuStart
from autotune.sweep.ledger import waiting
from backends import backend_class

__all__ = ["DOMINATED", "Queue", "Steps", "lineage", "splits"]

# A backend whose best, after its batch climb, is under this share of the leader's gets no
# more trials: a clear margin (docs/sweep.md).
DOMINATED = 0.5
# On a CPU host a backend is dropped before its climb when its best is under this share of
# the leader's fastest layout at a batch no wider (docs/sweep.md: torch gained at most x1.9
# on llama.cpp per x4 batch step on 2 vCPUs). On a GPU batching gains far more: not there.
_SCREEN_DOMINATED = 1 / 3
_CLIMB = 2  # positions up the batch list per climbing step: batch x4
# A climbing step under this share of the speed it started from ends the climb: one pass is
# noisy (docs/sweep.md).
_CLIMB_KEEPS = 0.8
_CLIMBED = "climbed"
# Another layout of a backend within this share of the backend's best climbs too, one only
# (a tie inside one pass's noise; docs/sweep.md).
_TIE = 0.9
_LINEAGES = 2  # layouts whose batch climbs, per backend
# A screened value within this share of the screen's fastest is measured again once the batch
# climbed (`rescreen`).
_RESCREEN = 0.6
# Once the leader's neighbours are measured, those of each layout within this share of the
# leader's estimate are, the fastest first, before the sampler draws: one window's noise
# apart, the true fastest may be any of them (simulated 10-minute sweeps, six CPU machines,
# 16 seeds: 96.1% of the optimum picked, 95.4% with the leader's neighbours alone).
_BEAM = 0.9
# A one-knob neighbour the pooled model puts under this share of the leader's estimate is not
# measured: its knob values were measured slower elsewhere (a 2 x 1 batch 32 leader's
# neighbour with one worker, half of a 2-vCPU machine idle, ran 42 s of a 5-minute sweep at
# 48% of the leader; docs/sweep.md).
_PROMISE = 0.8


def lineage(config: TrialConfig) -> tuple[str, str]:
    """A layout but its batch, (its backend, the key of the rest): the trials of one batch
    climb share it."""
    return config.backend, config_key({**config.to_dict(), "batch_size": None})


def splits(space, config: TrialConfig) -> list[TrialConfig]:
    """``config``'s threads split over twice its workers, each with half the threads and
    half the batch, and over half its workers, each with twice the threads and twice the
    batch (a position along the batch list): the same cores running as many requests at
    once, split another way. Those the space holds and the target runs; none for a backend
    without the three knobs. Which split is fastest turns with the batch, and the one-knob
    neighbours reach another a worker at a time: on the simulated desktop (16 CPUs) 8x2 led
    16x1 at batch 1 by one pass's noise (0.735 against 0.722 of the optimum; 0.693 and 0.776
    truly), and the climbs and neighbours stayed on 8 workers (85% of the optimum, 16x1 batch
    32; docs/sweep.md)."""
    names = {knob.name for knob in space.spaces[config.backend].knobs}
    if not {"workers", "threads_per_worker", "batch_size"} <= names:
        return []
    found = []
    for more in (True, False):
        if more and config.threads_per_worker % 2 == 0:
            workers, threads, batch = config.workers * 2, config.threads_per_worker // 2, -1
        elif not more and config.workers % 2 == 0:
            workers, threads, batch = config.workers // 2, config.threads_per_worker * 2, 1
        else:
            continue
        split = space.with_value(config, "workers", workers)
        split = split and space.with_value(split, "threads_per_worker", threads)
        # At batch 1 (or the list's widest) the batch stays: the width moves, the split holds.
        split = split and (space.step(split, "batch_size", batch) or split)
        if split is not None:
            found.append(split)
    return found


def _split_name(config: TrialConfig) -> str:
    """How a split names its layout: ``split 16x1 batch 8``."""
    return f"split {config.workers}x{config.threads_per_worker} batch {config.batch_size}"


class Queue:
    """What runs next besides the sampler's draws: Optuna's queue of layouts (asked for in
    order, before the sampler draws), the configs injected as they are (``extra``: (config,
    role, name)), and the other backends' recipes waiting for the climbs (``deferred``)."""

    def __init__(self, space, extra: list) -> None:
        self.space = space
        self.extra = extra
        self.deferred: list[Fixed] = []

    def empty(self, study) -> bool:
        """Nothing injected and nothing queued: the steps or the sampler choose next."""
        return not self.extra and not waiting(study)

    def fixed(self, study, fixed: Fixed) -> None:
        """Queue a fixed layout; one outside the space is injected as it is."""
        attrs = {"role": fixed.role, "name": fixed.name}
        try:
            study.enqueue_trial(self.space.params(fixed.config), user_attrs=attrs)
        except Unfit:
            self.extra.insert(0, (fixed.config, Role(fixed.role), fixed.name))

    def layout(self, study, config: TrialConfig, name: str | None = None) -> None:
        """Queue ``config`` as the sampler's next search trial (``name``: why this one); the
        layout of a waiting recipe runs as that recipe, once (`waiting_recipe`)."""
        recipe = self.waiting_recipe(config)
        if recipe is not None:
            self.fixed(study, recipe)
            return
        attrs = {"role": "search", **({"name": name} if name else {})}
        study.enqueue_trial(self.space.params(config), user_attrs=attrs)

    def waiting_recipe(self, config: TrialConfig) -> Fixed | None:
        """The deferred recipe of ``config``'s very layout, taken off the waiting list (a
        10-minute sweep measured hf batch 8 twice, as a climbing step and later as seed
        000's recipe: 44 s of its 7.5 search minutes)."""
        key = config_key(config)
        for fixed in self.deferred:
            if config_key(fixed.config) == key:
                self.deferred.remove(fixed)
                return fixed
        return None


class Steps:
    """The policies of one sweep and their state. ``budget`` prices a layout
    (`autotune.sweep.budget.Budget`), ``ledger`` holds what was measured, ``queue`` is where
    they put what runs next, ``tell`` the sweep's event sink."""

    def __init__(self, *, space, target, ledger, budget, queue: Queue, tell, seed=None) -> None:
        self.space = space
        self.target = target
        self.ledger = ledger
        self.budget = budget
        self.queue = queue
        self.tell = tell
        # Per layout climbing the batch axis (`lineage`: its config but the batch): (tokens/s
        # the step started from, the key of the wider layout queued), or _CLIMBED once over.
        self.climbs: dict[tuple[str, str], tuple[float, str] | str] = {}
        self.screened: set[str] = set()  # backends whose screened knobs were measured
        # Per backend screened and not screened again yet, the layout its screen started from.
        self.screens: dict[str, TrialRecord] = {}
        self.visited: set[str] = set()  # keys of the layouts whose neighbours were queued
        self.skipped: dict[str, str] = {}  # recipe name -> why it was not run
        self.gpu = GpuStart(space=space, target=target, ledger=ledger, budget=budget, queue=queue)
        self.rng = random.Random(seed)  # the exploration after a duplicate

    def propose(self, study) -> None:
        """The steps in their order, until one queues something (none may)."""
        # Drop first: dropping a backend renames the sampler's backend parameter, and a trial
        # queued before that would lose its backend (the sampler would pick).
        self.drop_dominated()
        (
            self.gpu.propose(study, self._bests())
            or self.screen(study)
            or self.rescreen(study)
            or self.climb(study)
            or self.release_recipe(study)
            or self.neighbours(study)
        )

    # ------------------------------------------------------------ the steps

    def screen(self, study) -> bool:
        """On a CPU host, queue once per backend its fastest layout at every other value of
        its screened knobs (`Knob.screen`: the weight type or dtype, llama.cpp's extra
        buffers), the fastest backend first; returns whether any was queued. A backend under
        `DOMINATED` of the leader is not screened. The climbs then start from the fastest
        weights. Not on a GPU host, where the recipes' small batches are launch-bound and a
        screen would pick a dtype by noise (docs/sweep.md)."""
        if self.target.gpus:
            return False
        bests = sorted(self._bests().values(), key=self.ledger.estimate, reverse=True)
        for best in bests:
            if best.backend in self.screened or best.value < DOMINATED * bests[0].value:
                continue
            self.screened.add(best.backend)
            self.screens[best.backend] = best
            config, queued = best.config, False
            for knob in self.space.spaces[best.backend].knobs:
                if knob.screen:
                    variants = self.space.variants(config, knob.name)
                    queued |= self._queue_moves(study, "screen", best, knob.name, variants)
            if queued:
                return True
        return False

    def rescreen(self, study) -> bool:
        """On a CPU host, once per backend, as soon as its fastest layout is at a wider batch
        than its screen's: the screened knobs' values that came within `_RESCREEN` of the
        screen's fastest, measured again at the fastest layout, at the narrowest batch its
        climb measured past the screen's; returns whether any was queued. Which weights are
        fastest turns with the batch: on the simulated 16-core server (32x1, compact
        pinning) q4_0 is fastest at batch 1 (87.6% of the optimum, q8_0 81.5%) and q8_0 from
        batch 2 on (a batch shares one dequantisation among its sequences), and a climb of
        the batch-1 winner stayed below 95% of the optimum."""
        if self.target.gpus:
            return False
        estimate, bests = self.ledger.estimate, self._bests()
        for backend, origin in list(self.screens.items()):
            best = bests.get(backend)
            if best is None or best.config.batch_size <= origin.config.batch_size:
                continue
            del self.screens[backend]
            # At the narrowest batch its climb measured past the screen's: the weights' order
            # has turned by then, and a pass there costs a fraction of one at the widest (a
            # real 5-minute sweep on 2 vCPUs rescreened at batch 16: 3 trials, 60 s of its
            # 223 s search, where a batch-4 trial took 6-8 s).
            line = lineage(best.config)
            at = min(
                (
                    r
                    for r in self.ledger.measured_trials()
                    if lineage(r.config) == line
                    and origin.config.batch_size < r.config.batch_size <= best.config.batch_size
                ),
                key=lambda r: r.config.batch_size,
            )
            values = backend_class(backend).knob_values
            queued = False
            for knob in self.space.spaces[backend].knobs:
                if not knob.screen:
                    continue
                screened = [origin] + [
                    measured
                    for variant in self.space.variants(origin.config, knob.name)
                    if (measured := self.ledger.measured(config_key(variant))) and measured.complete
                ]
                bar = _RESCREEN * max(estimate(r) for r in screened)
                mine = values(at.config, self.target).get(knob.name)
                # In the screen's order (a set's would change with the process's hash seed).
                again = [
                    value
                    for r in screened
                    if estimate(r) >= bar
                    and (value := values(r.config, self.target).get(knob.name)) != mine
                ]
                moved = [self.space.with_value(at.config, knob.name, v) for v in again]
                queued |= self._queue_moves(study, "rescreen", at, knob.name, moved)
            if queued:
                return True
        return False

    def climb(self, study) -> bool:
        """Queue the next step of a batch climb; returns whether one was queued. From each
        backend's fastest layout (the fastest backend first) and a near tie of it (`_origins`;
        while the backend has climbed fewer than `_LINEAGES` layouts, but the fastest layout
        of all always), the same layout at batch x4 (x2 where that does not fit `room_s`),
        and on from there while a step keeps `_CLIMB_KEEPS` of the speed it started from.
        Batch moves tokens/s the most, and a sampler drawing it at random spends a short
        budget before trying a wide one."""
        leader = self._leader()
        for origin in self._origins():
            line = lineage(origin.config)
            state = self.climbs.get(line)
            if isinstance(state, str):  # _CLIMBED
                continue
            if state is None:
                # A layout climbs while its backend has climbed fewer lineages; the fastest of
                # all always does (a 10-minute sweep of the simulated 16-core server found 32x1
                # q8_0 by the rescreen after two climbs and never climbed it: 96% of the
                # optimum where batch 16 was 99%). Not another backend's fastest: on the H200
                # host each llama.cpp recipe in turn was, and climbed, at x0.05 hf's speed.
                started = sum(backend == origin.backend for backend, _ in self.climbs)
                if started >= _LINEAGES and origin is not leader:
                    continue
            else:
                started_at, key = state
                step = self.ledger.measured(key)
                if step is None or not step.complete or step.value < _CLIMB_KEEPS * started_at:
                    self.climbs[line] = _CLIMBED
                    continue
                origin = step
            config, room = origin.config, self.budget.room_s()
            for positions in (_CLIMB, 1):
                wider = self.space.step(config, "batch_size", positions)
                if wider is not None and self.budget.affordable(wider, room):
                    name = f"climb: trial {origin.number}'s layout at batch {wider.batch_size}"
                    self.queue.layout(study, wider, name)
                    self.climbs[line] = (origin.value, config_key(wider))
                    return True
            self.climbs[line] = _CLIMBED
        return False

    def release_recipe(self, study) -> bool:
        """Queue the next waiting recipe that fits the search's time left (those that do not,
        and those of a dropped backend, are named in the summary); returns whether one was."""
        while self.queue.deferred:
            fixed = self.queue.deferred.pop(0)
            dropped = self.space.dropped.get(fixed.config.backend)
            if dropped:
                self.skipped[fixed.name] = f"{fixed.config.backend} was dropped: {dropped}"
                continue
            expected, left = self.budget.cost_s(fixed.config), self.budget.search_left_s()
            if expected <= left:
                self.queue.fixed(study, fixed)
                return True
            self.skipped[fixed.name] = f"expected {expected:.0f} s with {left:.0f} s left"
        return False

    def neighbours(self, study) -> bool:
        """On a CPU host, queue the neighbours of the fastest layout measured so far, once per
        layout; returns whether any was queued. A neighbour differs in one knob: an ordered
        one a position either way (workers 24 -> 23 and 25; `SearchSpace.step`), another one
        every other value (pinning); never the batch (the climb's) or the screened knobs (the
        screen's); and its `splits`, the same cores over twice or half the workers. Where a
        neighbour is faster, its own neighbours come next: a hill climb, before the sampler's
        draws; once the leader's are measured, those of each layout within `_BEAM` of it, the
        fastest first. Not on a GPU host (docs/sweep.md)."""
        if self.target.gpus:
            return False
        leader, estimate = self._leader(), self.ledger.estimate
        if leader is None:
            return False
        near = sorted(
            (
                r
                for r in self.ledger.measured_trials()
                if r.backend in self.space.backends and estimate(r) >= _BEAM * estimate(leader)
            ),
            key=estimate,
            reverse=True,
        )
        for best in [leader] + near:
            if config_key(best.config) in self.visited:
                continue
            self.visited.add(config_key(best.config))
            config, queued = best.config, False
            bar = _PROMISE * estimate(leader)
            for knob in self.space.spaces[best.backend].knobs:
                if knob.name == "batch_size" or knob.screen:
                    continue
                if knob.ordered:
                    moved = [self.space.step(config, knob.name, step) for step in (-1, 1)]
                else:
                    moved = self.space.variants(config, knob.name)
                moved = self._promising(moved, bar)
                queued |= self._queue_moves(study, "neighbour", best, knob.name, moved)
            # Splits are measured whatever the model says: the same cores over other workers
            # is where an additive model misses (16 x 1 fast, 15 x 1 and 8 x 2 not).
            queued |= self._queue_named(
                study, "neighbour", best, splits(self.space, config), _split_name
            )
            if queued:
                return True
        return False

    def drop_dominated(self) -> None:
        """Drop each backend whose climb is over and whose best is under `DOMINATED` of the
        leader's, and on a CPU host one whose best is under `_SCREEN_DOMINATED` of the
        leading backend's fastest layout at a batch no wider, climbed or not: it gets no
        more trials (the reason goes to the summary). A backend with no trial yet but its
        family's reference run (batch 1) counts that run as its best: on 2 vCPUs hf's
        reference ran at x0.14 llama.cpp's batch 1, and its recipe then cost 17 s to say
        the same (docs/sweep.md)."""
        bests = self._bests()
        if not bests:
            return
        leader = max(bests.values(), key=lambda r: r.value)
        for record in self.ledger.reference_runs():
            if record.backend in self.space.backends:
                bests.setdefault(record.backend, record)
        if len(bests) < 2:
            return
        for backend, best in bests.items():
            if backend == leader.backend or self.gpu.pending(best):
                continue
            climbed = self.climbs.get(lineage(best.config)) == _CLIMBED
            if climbed and best.value < DOMINATED * leader.value:
                rival, share, where = leader, DOMINATED, ""
            else:
                fastest = self.ledger.fastest_within
                rival = None if self.target.gpus else fastest(leader.backend, best)
                if rival is None or best.value >= _SCREEN_DOMINATED * rival.value:
                    continue
                share, where = _SCREEN_DOMINATED, f" at batch {best.config.batch_size} or less"
            reason = (
                f"its best, {best.value:.1f} tokens/s (trial {best.number}), is "
                f"x{best.value / rival.value:.2f} {rival.backend}'s {rival.value:.1f} "
                f"(trial {rival.number}){where}, under x{share:.2f}"
            )
            self.space.drop(backend, reason)
            self.tell(BackendDropped(backend, reason))

    # ------------------------------------------------------------ a draw that cannot run

    def explore(self, study) -> bool:
        """After the sampler asked for a config measured already (or one the space refused,
        or one too long), queue a random one not yet measured that fits `room_s`; returns
        whether one was. The ask is hidden from TPE (it is not a slow region), so without new
        information TPE would ask for the same point again and again."""
        room = self.budget.room_s()
        config = self.space.random_config(
            self.rng,
            avoid=set(self.ledger.seen),
            fits=lambda c: self.budget.affordable(c, room),
        )
        if config is not None:
            self.queue.layout(study, config)
        return config is not None

    def fit(self, study, config: TrialConfig, why: str) -> bool:
        """Queue the widest narrower batch of ``config``'s layout that the space allows, is
        not measured yet and fits the time left (``why``: why ``config`` itself did not run);
        False where none does."""
        room = self.budget.room_s()
        for positions in range(1, len(self.target.batch_sizes)):
            narrower = self.space.step(config, "batch_size", -positions)
            if narrower is not None and self.budget.affordable(narrower, room):
                name = f"fitted: asked for batch {config.batch_size}, {why}"
                self.queue.layout(study, narrower, name)
                return True
        return False

    # ------------------------------------------------------------ helpers

    def _bests(self) -> dict[str, TrialRecord]:
        return self.ledger.bests(self.space.backends)

    def _leader(self) -> TrialRecord | None:
        """The fastest layout of all the searched backends', by the pooled estimates."""
        return max(self._bests().values(), key=self.ledger.estimate, default=None)

    def _origins(self) -> list[TrialRecord]:
        """Where batch climbs start, the fastest backend first: each backend's fastest layout,
        then its fastest other layout (`lineage`) if that is within `_TIE` of it."""
        estimate = self.ledger.estimate
        fastest: dict[tuple[str, str], TrialRecord] = {}  # per lineage, its fastest trial
        for record in self.ledger.measured_trials():
            line = lineage(record.config)
            if line not in fastest or estimate(record) > estimate(fastest[line]):
                fastest[line] = record
        origins = []
        for best in sorted(self._bests().values(), key=estimate, reverse=True):
            own = lineage(best.config)
            others = [r for key, r in fastest.items() if key[0] == best.backend and key != own]
            rival = max(others, key=estimate, default=None)
            tie = rival and estimate(rival) >= _TIE * estimate(best)
            origins += [best, rival] if tie else [best]
        return origins

    def _promising(self, moved: list, bar: float) -> list:
        """Of ``moved`` (layouts, or None), those the pooled model does not put under
        ``bar`` tokens/s (`Ledger.predicted`)."""
        kept = []
        for config in moved:
            found = None if config is None else self.ledger.predicted(config)
            kept.append(config if found is None or found >= bar else None)
        return kept

    def _queue_moves(self, study, why: str, origin: TrialRecord, knob_name: str, moved) -> bool:
        """Queue each of ``moved`` (``origin``'s layout with its knob ``knob_name`` changed;
        None: no such layout) that fits `room_s`, named ``why: trial N's layout with KNOB
        VALUE``; returns whether any was queued."""

        def named(config: TrialConfig) -> str:
            value = backend_class(config.backend).knob_values(config, self.target)
            return f"layout with {knob_name} {value.get(knob_name)}"

        return self._queue_named(study, why, origin, moved, named)

    def _queue_named(self, study, why: str, origin: TrialRecord, moved, named) -> bool:
        """Queue each of ``moved`` (layouts near ``origin``'s; None: no such layout) that fits
        `room_s`, named ``why: trial N's`` and ``named(config)``; returns whether any was
        queued."""
        room, queued = self.budget.room_s(), False
        for config in moved:
            if config is not None and self.budget.affordable(config, room):
                name = f"{why}: trial {origin.number}'s {named(config)}"
                self.queue.layout(study, config, name)
                queued = True
        return queued
