"""The GPU start: on a GPU host, each GPU backend measured where its speed is.

Per backend whose fastest layout computes on a GPU: that layout in its cheapest weights at the
widest batch the memory planner and the time a trial may take allow (where a GPU's speed is:
the recipes' batches 4-8 leave it launch-bound), then halved while halving is faster, then one
process fewer and one more, each at the widest batch that then fits. Until that is over the
backend is not dropped (`pending`). One of the sweep's steps (`autotune.sweep.steps.Steps`);
the simulated runs behind it: docs/sweep.md, step 2.
"""

from __future__ import annotations

from autotune.config import TrialConfig
from autotune.space import config_key
from autotune.study import TrialRecord
from backends import backend_class

__all__ = ["GpuStart"]

_OVER = "over"
_RANKS = ("workers", "stages")  # the knobs that count a layout's processes


class GpuStart:
    """The GPU start's state: per backend, (tokens/s of the last step, key of the layout
    queued), or over."""

    def __init__(self, *, space, target, ledger, budget, queue) -> None:
        self.space = space
        self.target = target
        self.ledger = ledger
        self.budget = budget
        self.queue = queue
        self.lines: dict[str, tuple[float, str] | str] = {}

    def propose(self, study, bests: dict[str, TrialRecord]) -> bool:
        """Queue the next step of one GPU backend (``bests``: each backend's fastest trial);
        returns whether one was queued."""
        if not self.target.gpus:
            return False
        for backend, best in bests.items():
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
            assert isinstance(state, tuple)
            last, key = state
            step = self.ledger.measured(key)
            if step is None or not step.complete or step.value <= last:
                self.lines[backend] = _OVER
                if self._ranks(study, best):
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

    def _ranks(self, study, best: TrialRecord) -> bool:
        """After a GPU backend's halving: its fastest layout with one process fewer and one
        more, each at the widest batch that then fits (a GPU's memory trades processes
        against batch, so a one-knob step at the same batch walks into the limit; half and
        twice the processes did worse on both simulated GPU hosts); returns whether any was
        queued."""
        knob = next((k for k in self.space.spaces[best.backend].knobs if k.name in _RANKS), None)
        if knob is None:
            return False
        queued = False
        for positions in (-1, 1):
            moved = self.space.step(best.config.replace(batch_size=1), knob.name, positions)
            start = self._widest(moved) if moved is not None else None
            if start is not None:
                name = f"gpu ranks: trial {best.number}'s layout with {knob.name} "
                self.queue.layout(study, start, name + str(getattr(start, knob.name)))
                queued = True
        return queued

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

    def _widest(self, config: TrialConfig) -> TrialConfig | None:
        """``config`` at the widest batch the space and the planner allow, not measured yet,
        that fits `room_s`; None where none does."""
        room = self.budget.room_s()
        for batch in sorted(self.target.batch_sizes, reverse=True):
            if batch <= config.batch_size:
                return None
            wider = self.space.with_value(config, "batch_size", batch)
            if wider is not None and self.budget.affordable(wider, room):
                return wider
        return None
