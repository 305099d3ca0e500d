"""What a backend declares about itself: the knobs it tunes on a given machine.

A backend's `space` (see `backends.base.Backend.space`) returns a `BackendSpace`: its knobs,
each a list of values fitted to the machine, in the order they are chosen. A knob may apply
only when earlier choices allow it (``only_if``: pinning only with several workers) and may
keep only the values that fit earlier choices (``allow``: threads per worker within the usable
CPUs left by the workers). The search (`autotune.space`), `autotune plan` and the sweep all
read this one declaration; nothing outside a backend's module says what it tunes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.topology import Topology

__all__ = ["BackendSpace", "Knob", "Target"]


@dataclass(frozen=True)
class Target:
    """What a search space depends on: the machine (possibly another one, from its
    ``autotune detect --json``), the model's decoder layers, the largest batch to try
    (default: 64 on a CPU host, 512 on a GPU host, where the GPU memory planner bounds it),
    a GGUF's own weight type (``own_quant``: the quant knob's None already is it), and the
    values of llama.cpp's ``extra_buffers`` that run here (``extra_buffers``, from
    `backends.llamacpp.probe`: (True, False) where both run, (False,) where they trap, (None,)
    where nothing was probed: llama.cpp's default, resolved when a worker loads)."""

    topology: Topology
    layers: int
    batch_cap: int | None = None
    own_quant: str | None = None
    extra_buffers: tuple = (None,)

    @classmethod
    def of(
        cls, topology: Topology, shape, batch_cap: int | None = None, extra_buffers: tuple = (None,)
    ) -> Target:
        """The target of a model of ``shape`` (`autotune.models.ModelShape`)."""
        return cls(topology, shape.layers, batch_cap, shape.weight_type, extra_buffers)

    @property
    def cpus(self) -> int:
        """CPUs a layout may use: the usable CPUs (affinity and cgroup quota)."""
        return self.topology.usable_cpus

    @property
    def gpus(self) -> int:
        return len(self.topology.gpus)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Powers of two from 1 up to ``batch_cap``."""
        cap = self.batch_cap or (512 if self.gpus else 64)
        sizes, size = [], 1
        while size <= cap:
            sizes.append(size)
            size *= 2
        return tuple(sizes)


@dataclass(frozen=True)
class Knob:
    """One tunable of a backend and the values it may take on the target.

    ``name`` is a `TrialConfig` field, unless the backend's `Backend.config_changes` turns it
    into fields (the pipeline's ``boundary_shift``). ``ordered`` knobs are sampled as a
    position in ``values`` (neighbours are alike: 4 threads is close to 5); the others as
    categories. ``only_if(chosen)`` says whether the knob applies given the earlier choices;
    ``allow(chosen, value)`` keeps the values that fit them. ``note`` says both in words.
    ``screen``: on a CPU host the sweep measures every value of this knob on its backend's
    fastest layout before climbing from it (the weights: a weight type or a dtype, whose
    speeds no neighbour predicts and one of which may be far faster than the file's own).
    """

    name: str
    values: tuple
    ordered: bool = True
    only_if: Callable[[dict], bool] | None = None
    allow: Callable[[dict, Any], bool] | None = None
    note: str = ""
    screen: bool = False
    # Whether its values change the weights the model computes with (a weight type, a dtype):
    # such layouts are a different model, scored against the source weights (--min-quality).
    weights: bool = False

    def applies(self, chosen: dict) -> bool:
        """Whether this knob is chosen at all after ``chosen``."""
        return self.only_if is None or self.only_if(chosen)

    def allowed(self, chosen: dict) -> tuple:
        """The values that fit the earlier choices."""
        if self.allow is None:
            return self.values
        return tuple(v for v in self.values if self.allow(chosen, v))

    def to_dict(self) -> dict:
        """JSON-ready: name, values, ordered, note, screen, weights."""
        return {
            "name": self.name,
            "values": list(self.values),
            "ordered": self.ordered,
            "note": self.note,
            "screen": self.screen,
            "weights": self.weights,
        }


@dataclass(frozen=True)
class BackendSpace:
    """A backend's knobs on one target, or why the backend is left out there."""

    backend: str
    knobs: tuple[Knob, ...] = ()
    excluded: str | None = None

    @property
    def constraints(self) -> list[str]:
        """What joins the knobs, in words: the notes of the knobs that depend on others."""
        return [k.note for k in self.knobs if k.note and (k.allow or k.only_if)]

    def assignments(self):
        """Every combination of knob values the space allows (a generator of dicts)."""

        def walk(index: int, chosen: dict):
            if index == len(self.knobs):
                yield dict(chosen)
                return
            knob = self.knobs[index]
            if not knob.applies(chosen):
                yield from walk(index + 1, chosen)
                return
            for value in knob.allowed(chosen):
                chosen[knob.name] = value
                yield from walk(index + 1, chosen)
                del chosen[knob.name]

        if self.excluded is None:
            yield from walk(0, {})

    def size(self) -> int:
        """How many combinations the space holds."""
        return sum(1 for _ in self.assignments())
