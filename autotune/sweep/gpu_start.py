"""The GPU start: on a GPU host, each GPU backend measured where its speed is.

Per backend whose fastest layout computes on a GPU: that layout in its cheapest weights at the
widest batch the memory planner and the time a trial may take allow (where a GPU's speed is:
the recipes' batches 4-8 leave it launch-bound), then halved while halving is faster, then one
process fewer and one more, each at the widest batch that then fits, and on along the
processes in the direction that was faster, twice as far each step while that is faster still
(`_Ranks`), a layout that lost to a wider batch measured again at one (like for like). A
backend whose only trial stopped early starts from that trial. Until that is over the backend
is not dropped (`pending`). One of the sweep's
steps (`autotune.sweep.steps.Steps`); the simulated runs behind it: docs/sweep.md, step 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autotune.config import TrialConfig
from autotune.space import config_key
from autotune.study import TrialRecord
from backends import backend_class

__all__ = ["GpuStart"]

_OVER = "over"
_RANKS = ("workers", "stages")  # the knobs that count a layout's processes
# A backend under this share of the leader at a batch no wider does not walk (`_behind`).
_WALK_BAR = 0.25


@dataclass
class _Ranks:
    """A backend's walk along its processes: the fastest of the walk so far (``best``), the
    layouts queued and not judged yet (``keys``), the step's direction and length."""

    best: TrialRecord
    keys: list[str]
    direction: int = 0  # 0: one fewer and one more are queued, the direction not known yet
    stride: int = 1
    retried: list[int] = field(default_factory=list)  # processes queued again, wider


class GpuStart:
    """The GPU start's state: per backend, (tokens/s of the last step, key of the layout
    queued), or over."""

    def __init__(self, *, space, target, ledger, budget, queue) -> None:
        self.space = space
        self.target = target
        self.ledger = ledger
        self.budget = budget
        self.queue = queue
        self.lines: dict[str, tuple[float, str] | _Ranks | str] = {}

    def propose(self, study, bests: dict[str, TrialRecord]) -> bool:
        """Queue the next step of one GPU backend (``bests``: each backend's fastest trial);
        returns whether one was queued."""
        if not self.target.gpus:
            return False
        for backend, best in {**bests, **self._stopped(bests)}.items():
            state = self.lines.get(backend)
            if state == _OVER or not self._on_gpu(best.config):
                continue
            if state is None:
                start = self._widest(self._cheapest(best.config))
                if start is None:
                    self.lines[backend] = _OVER
                    continue
                self.queue.layout(study, start, f"gpu start: trial {best.number}'s layout")
                self.lines[backend] = (0.0, config_key(start))
                return True
            if isinstance(state, _Ranks):
                if not self._behind(best, bests) and self._walk(study, backend, state):
                    return True
                self.lines[backend] = _OVER
                continue
            assert isinstance(state, tuple)
            last, key = state
            step = self.ledger.measured(key)
            if step is None or not step.complete or step.value <= last:
                self.lines[backend] = _OVER
                if not self._behind(best, bests) and self._ranks(study, best):
                    return True
                continue
            half = self.space.step(step.config, "batch_size", -1)
            if half is None or not self.budget.affordable(half, self.budget.room_s()):
                self.lines[backend] = _OVER
                continue
            name = f"gpu halving: trial {step.number}'s layout at batch {half.batch_size}"
            self.queue.layout(study, half, name)
            self.lines[backend] = (step.value, config_key(half))
            return True
        return False

    def _stopped(self, bests: dict[str, TrialRecord]) -> dict[str, TrialRecord]:
        """Per searched backend without a complete trial, its last trial stopped early (it ran
        a pass, clearly slower than the leader): its start comes from there. On the simulated
        H200 host, with the GPU's settling passes, ddp's one draw (2 ranks at batch 32, where a
        GPU is launch-bound) stopped under hf's batch 512, no GPU start followed, and a
        10-minute sweep confirmed hf at a quarter of ddp's 4 ranks at batch 512."""
        stopped = {}
        for record in self.ledger.records:
            if not (record.result or {}).get("stopped"):  # why it stopped, where it did
                continue
            if record.backend not in bests and record.backend in self.space.backends:
                stopped[record.backend] = record
        return stopped

    def _behind(self, best: TrialRecord, bests: dict[str, TrialRecord]) -> bool:
        """Whether ``best``'s backend is under `_WALK_BAR` of the leading backend's fastest
        layout at a batch no wider than ``best``'s: the walk is for a contender. ddp gained
        x2.6 by its walk on the 8-GPU node; on the H200 host the pipeline (x0.16 hf at batch
        32) walked at 25-60 s a step while ddp, not measured yet, got no time, and a 10-minute
        sweep ended at hf's 25% of the optimum. At a batch no wider: a GPU start priced before
        its backend's first trial may be narrow (ddp started at batch 8 there, x0.03 hf's
        batch 512 and x1.7 its batch 8)."""
        leader = max(bests.values(), key=lambda r: r.value)
        if leader.backend == best.backend:
            return False
        rival = self.ledger.fastest_within(leader.backend, best)
        return rival is not None and best.value < _WALK_BAR * rival.value

    def _ranks(self, study, best: TrialRecord) -> bool:
        """After a GPU backend's halving: its fastest layout with one process fewer and one
        more, each at the widest batch that then fits (a GPU's memory trades processes
        against batch, so a one-knob step at the same batch walks into the limit; half and
        twice the processes did worse on both simulated GPU hosts); returns whether any was
        queued. With them, the same processes at a wider batch where one fits now that the
        backend's cost is measured: a simulated H200 host started ddp at batch 32 (priced
        before its first trial), and one process fewer at batch 256 then beat it by its batch
        alone. The walk goes on from there (`_walk`)."""
        keys = [key for positions in (-1, 0, 1) if (key := self._move(study, best, positions))]
        return self._await(study, _Ranks(best, keys)) if keys else False

    def _walk(self, study, backend: str, walk: _Ranks) -> bool:
        """The next step of ``backend``'s walk along its processes, once its queued layouts
        are measured: from the fastest of them, if it beat the walk's best, twice as far in
        its direction; where it did not and the step was longer than one, one process on
        from the best; else the walk is over. Returns whether a layout was queued. On a
        simulated 8x H100 node ddp was fastest at 24 ranks (3 a GPU) at batch 512, and one
        process either side of the recipe's 8 left it at 106 000 tokens/s of 281 000."""
        # The steps propose once the queue is empty: a layout queued and not measured was
        # refused or too long, and never will be.
        measured = [self.ledger.measured(key) for key in walk.keys]
        done = [r for r in measured if r is not None and r.complete]
        faster = max(done, key=lambda r: r.value, default=None)
        self.lines[backend] = _OVER
        knob = self._knob(backend)
        assert knob is not None  # its layouts were queued by `_move`
        if faster is not None and faster.value > walk.best.value:
            moved = getattr(faster.config, knob) - getattr(walk.best.config, knob)
            if not moved:  # its own processes at a wider batch: the walk starts again there
                return self._ranks(study, faster)
            if getattr(faster.config, knob) in walk.retried:
                return False  # a layout left behind by its batch alone won: the walk is over
            direction = walk.direction or (1 if moved > 0 else -1)
            stride = 2 * walk.stride if walk.direction else 2
            best = faster
        elif walk.direction and walk.stride > 1:
            direction, stride, best = walk.direction, 1, walk.best
        else:
            return False
        keys = [key] if (key := self._move(study, best, direction * stride)) else []
        if not keys and stride > 1:
            stride = 1
            keys = [key] if (key := self._move(study, best, direction)) else []
        # Like for like: a layout of this step that lost at a narrower batch than the one
        # that won (the widest batch that fitted its time when it was queued, priced from
        # the backend's narrow first trial) runs again at a wider one where one fits now.
        # On the simulated H200 host ddp's 4 ranks ran at batch 128 beside 3 at 256, lost,
        # and were never measured at 512, where they are x1.33 3 ranks'.
        retried = []
        for record in done:
            if record is not best and record.config.batch_size < best.config.batch_size:
                wider = self._widest(record.config, measured=True)
                if wider is not None and (key := self._queue(study, best, wider, knob)):
                    keys.append(key)
                    retried.append(getattr(record.config, knob))
        if not keys:
            return False
        return self._await(study, _Ranks(best, keys, direction, stride, retried))

    def _await(self, study, walk: _Ranks) -> bool:
        """Wait for ``walk``'s layouts to be measured; where every one of them is measured
        already, its next step now. Returns whether a layout was queued."""
        self.lines[walk.best.backend] = walk
        if all(key in self.ledger.seen for key in walk.keys):
            return self._walk(study, walk.best.backend, walk)
        return True

    def _knob(self, backend: str) -> str | None:
        """The knob that counts ``backend``'s processes (`_RANKS`), if it has one."""
        knobs = self.space.spaces[backend].knobs
        return next((k.name for k in knobs if k.name in _RANKS), None)

    def _move(self, study, best: TrialRecord, positions: int) -> str | None:
        """Queue ``best``'s layout with its processes moved ``positions`` along their values,
        at the widest batch that then fits; returns its key, or None where none fits."""
        knob = self._knob(best.backend)
        if knob is None:
            return None
        moved = self.space.step(best.config.replace(batch_size=1), knob, positions)
        start = self._widest(moved, measured=True) if moved is not None else None
        if start is None or (not positions and start.batch_size <= best.config.batch_size):
            return None  # (not moved: only a wider batch than its own is worth a trial)
        return self._queue(study, best, start, knob)

    def _queue(self, study, best: TrialRecord, start: TrialConfig, knob: str) -> str:
        """Queue ``start`` (a step of the walk from ``best``) unless measured already (then
        judged by its record); returns its key."""
        key = config_key(start)
        if key not in self.ledger.seen:
            name = f"gpu ranks: trial {best.number}'s layout with {knob} {getattr(start, knob)}"
            self.queue.layout(study, start, f"{name} at batch {start.batch_size}")
        return key

    def pending(self, best: TrialRecord) -> bool:
        """Whether ``best``'s backend computes on a GPU and has not yet been measured where
        its speed is (`propose`): it may not be dropped before."""
        return (
            bool(self.target.gpus)
            and self._on_gpu(best.config)
            and self.lines.get(best.backend) != _OVER
        )

    def _on_gpu(self, config: TrialConfig) -> bool:
        """Whether ``config``'s processes compute on a GPU."""
        devices = backend_class(config.backend).placement(config, self.target.topology)
        return any(device.is_gpu for device in devices)

    def _cheapest(self, config: TrialConfig) -> TrialConfig:
        """``config`` in the weights the planner predicts smallest (a GPU's batch is bounded
        by its memory): its own, or another value of its screened knobs (dtype, quant)."""
        candidates = [config]
        for knob in self.space.spaces[config.backend].knobs:
            if knob.screen:
                candidates += self.space.variants(config, knob.name)
        planner = self.space.planner
        if planner is None:
            return config
        return min(candidates, key=lambda c: sum(planner.predict_gpus(c).values()))

    def _widest(self, config: TrialConfig, measured: bool = False) -> TrialConfig | None:
        """``config`` at the widest batch the space and the planner allow, not measured yet
        (or, with ``measured``, measured already), that fits `room_s`; None where none does."""
        room = self.budget.room_s()
        for batch in sorted(self.target.batch_sizes, reverse=True):
            if batch <= config.batch_size:
                return None
            wider = self.space.with_value(config, "batch_size", batch)
            if wider is None:
                continue
            if measured and config_key(wider) in self.ledger.seen:
                return wider
            if self.budget.affordable(wider, room):
                return wider
        return None
