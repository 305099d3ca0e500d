"""The search space: every backend's declared knobs on one target machine, and what joins them.

`SearchSpace` asks each backend for its `BackendSpace` (`Backend.space`) and knows nothing of
any backend by name. It turns an Optuna trial into a TrialConfig (`suggest`), a config back
into Optuna parameters (`params`, to enqueue fixed layouts), and says why a config must not
run here (`refusal`: the backend's own validation on this machine, then the memory planner).
The sweep and `autotune plan` use this one object, so what the plan shows is what the sweep
searches, and a config the space refuses is never launched.

Parameters are named per backend (``llamacpp.workers``, ``hf.batch_size`` ...), so each
backend's sub-space is learned on its own. Ordered knobs are sampled as a position in their
value list (``llamacpp.batch_size`` = 3 is batch 8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.knobs import BackendSpace, Target
from autotune.memory_plan import MemoryPlanner
from backends import backend_class, describe

__all__ = ["Fixed", "SearchSpace", "Unfit", "config_key"]


def config_key(config: TrialConfig | dict) -> str:
    """One string per distinct config (to find what was measured already)."""
    if isinstance(config, dict):
        return json.dumps(config, sort_keys=True)
    return config.key


_MISSING = object()
_ENUMERATE_UP_TO = 5000  # layouts; a larger space is explored by random draws only
_PRICED = 256  # layouts a `random_config` call prices at most, in a random order


def _nearest(values: tuple, allowed: tuple, value):
    """The value of ``allowed`` nearest ``value`` by position in the knob's ``values``."""
    at = values.index(value)
    return min(allowed, key=lambda v: (abs(values.index(v) - at), values.index(v)))


def _category_name(name: str, values, offered) -> str:
    """The Optuna parameter for a category ``name`` of ``values`` when only ``offered`` are
    choices now: ``name``, or with the choices in it where they are fewer (an Optuna
    categorical parameter keeps one list of choices for the whole study)."""
    if tuple(offered) == tuple(values):
        return name
    return f"{name}[{','.join(str(v) for v in offered)}]"


def _param_name(backend: str, knob, allowed: tuple) -> str:
    """The Optuna parameter of ``knob``: ``backend.knob`` (an ordered knob is sampled as a
    position, so its name never changes)."""
    name = f"{backend}.{knob.name}"
    return name if knob.ordered else _category_name(name, knob.values, allowed)


class Unfit(Exception):
    """The suggested config cannot run on the target; the message says why. ``config`` is
    the config refused, where one was built."""

    def __init__(self, reason: str, config: TrialConfig | None = None) -> None:
        super().__init__(reason)
        self.config = config


@dataclass(frozen=True)
class Fixed:
    """A layout measured as it is (the baseline, a seed's recipe)."""

    name: str
    role: str  # "baseline", "recipe" or "warm" (a `autotune.study.Role` value)
    config: TrialConfig


class SearchSpace:
    """What may be tried on ``target`` for the ``backends`` named, each trial built on ``base``
    (model and generation settings shared by every trial)."""

    def __init__(
        self,
        target: Target,
        backends: list[str],
        base: TrialConfig,
        planner: MemoryPlanner | None = None,
    ) -> None:
        self.target = target
        self.base = base
        self.planner = planner
        self.spaces: dict[str, BackendSpace] = {b: backend_class(b).space(target) for b in backends}
        self.backends = [b for b, space in self.spaces.items() if space.excluded is None]
        self._searched = tuple(self.backends)  # before any `drop`
        self.dropped: dict[str, str] = {}  # backend -> why the search stopped trying it
        self._exhausted = False  # every config measured (see random_config)
        self._size: int | None = None
        self._grids: dict[str, list[tuple[str, TrialConfig]]] = {}  # `_grid`

    def size(self) -> int:
        """Layouts the searched backends' spaces hold (counted once)."""
        if self._size is None:
            self._size = sum(self.spaces[b].size() for b in self.backends)
        return self._size

    @property
    def exhausted(self) -> bool:
        """`random_config` found every config of the space measured."""
        return self._exhausted

    def drop(self, backend: str, reason: str) -> None:
        """Suggest no more layouts of ``backend`` (the sweep found it dominated); `refusal`
        still lets its fixed layouts run."""
        if backend in self.backends:
            self.backends.remove(backend)
            self.dropped[backend] = reason
            self._size = None

    def _backend_param(self) -> str | None:
        """The Optuna parameter that picks the backend, or None where only one is left. Its
        name changes with the backends left (an Optuna parameter keeps its choices for the
        whole study); each backend's own knobs keep their names, so nothing learnt is lost."""
        if len(self.backends) < 2:
            return None
        return _category_name("backend", self._searched, self.backends)

    # ------------------------------------------------------------ configs

    def build(self, backend: str, chosen: dict) -> TrialConfig:
        """The TrialConfig for knob values ``chosen`` of ``backend``."""
        changes = backend_class(backend).config_changes(chosen, self.target)
        return self.base.replace(backend=backend, **changes)

    def suggest(self, trial) -> TrialConfig:
        """A config for an Optuna ``trial``; Unfit when the target cannot run it."""
        if not self.backends:
            raise Unfit("no backend can run on this machine")
        name = self._backend_param()
        backend = trial.suggest_categorical(name, self.backends) if name else self.backends[0]
        chosen: dict = {}
        for knob in self.spaces[backend].knobs:
            if not knob.applies(chosen):
                continue
            allowed = knob.allowed(chosen)
            if not allowed:
                raise Unfit(f"{backend}: no value of {knob.name} fits ({knob.note})")
            name = _param_name(backend, knob, allowed)
            if knob.ordered:
                chosen[knob.name] = allowed[trial.suggest_int(name, 0, len(allowed) - 1)]
            else:
                chosen[knob.name] = trial.suggest_categorical(name, list(allowed))
        config = self.build(backend, chosen)
        reason = self.refusal(config)
        if reason:
            raise Unfit(reason, config)
        return config

    def params(self, config: TrialConfig) -> dict:
        """The Optuna parameters that `suggest` turns into ``config`` (for enqueueing it)."""
        backend = config.backend
        if backend in self.dropped:  # no longer a choice of the sampler
            raise Unfit(f"{backend}: no more trials ({self.dropped[backend]})")
        name = self._backend_param()
        params: dict = {name: backend} if name else {}
        for knob, allowed, value in self._choices(config):
            name = _param_name(backend, knob, allowed)
            params[name] = allowed.index(value) if knob.ordered else value
        return params

    def step(self, config: TrialConfig, knob_name: str, positions: int) -> TrialConfig | None:
        """``config`` with its ordered knob ``knob_name`` moved ``positions`` along its values
        (batch 4 -> 16 for +2), the other knobs kept (`_changed`); None where that leaves the
        list or the target refuses the result."""

        def move(allowed: tuple, value):
            index = allowed.index(value) + positions
            if not 0 <= index < len(allowed):
                raise Unfit(f"{describe(config)}: {knob_name} has no value {positions:+d} away")
            return allowed[index]

        return self._changed(config, knob_name, move)

    def variants(self, config: TrialConfig, knob_name: str) -> list[TrialConfig]:
        """``config`` with each other value its knob ``knob_name`` may take there, the other
        knobs kept (those the target refuses left out)."""
        try:
            choices = {knob.name: (allowed, v) for knob, allowed, v in self._choices(config)}
        except Unfit:
            return []
        allowed, current = choices.get(knob_name, ((), None))
        changed = (self.with_value(config, knob_name, v) for v in allowed if v != current)
        return [config for config in changed if config is not None]

    def with_value(self, config: TrialConfig, knob_name: str, value) -> TrialConfig | None:
        """``config`` with its knob ``knob_name`` at ``value`` (`_changed`); None where that
        is outside the space or refused on the target."""

        def move(allowed: tuple, _value):
            if value not in allowed:
                raise Unfit(f"{describe(config)}: {knob_name} {value!r} is outside the space")
            return value

        return self._changed(config, knob_name, move)

    def _changed(self, config: TrialConfig, knob_name: str, move) -> TrialConfig | None:
        """``config`` with knob ``knob_name``'s value replaced by ``move(allowed, value)``, a
        later ordered knob whose value no longer fits moved to the nearest that does (1 worker
        x 2 threads on 2 CPUs, workers + 1: 2 x 1); None where that is outside the space or
        refused on the target."""
        try:
            choices = self._choices(config, knob_name, move)
        except Unfit:
            return None
        changed = self.build(config.backend, {knob.name: value for knob, _, value in choices})
        return changed if self.refusal(changed) is None else None

    def _choices(self, config: TrialConfig, moved: str | None = None, move=None):
        """(knob, the values allowed it, its value) for each knob of ``config``'s backend that
        applies, the knob ``moved`` given ``move(allowed, value)`` instead (and an ordered knob
        after it the allowed value nearest its own); Unfit where a value is outside the
        space."""
        values = backend_class(config.backend).knob_values(config, self.target)
        chosen: dict = {}
        found = []
        after_move = False
        for knob in self.spaces[config.backend].knobs:
            if not knob.applies(chosen):
                continue
            allowed = knob.allowed(chosen)
            value = values.get(knob.name, _MISSING)
            if value not in allowed:
                if not (after_move and knob.ordered and allowed and value in knob.values):
                    raise Unfit(f"{describe(config)}: {knob.name} {value!r} is outside the space")
                value = _nearest(knob.values, allowed, value)
            if knob.name == moved:
                value = move(allowed, value)
                after_move = True
            chosen[knob.name] = value
            found.append((knob, allowed, value))
        return found

    def random_config(
        self, rng, avoid: set[str], attempts: int = 20, fits=None
    ) -> TrialConfig | None:
        """A config the target can run whose key (`config_key`) is not in ``avoid`` and that
        ``fits(config)`` accepts (where given), drawn knob by knob (``rng``: a random.Random);
        None where none was found. A few draws find one in a large space; a small one is
        enumerated (which also tells when every config is measured, `exhausted`, remembered:
        ``avoid`` only grows)."""
        if self._exhausted:
            return None
        for _ in range(attempts):
            backend = rng.choice(self.backends)
            chosen: dict = {}
            for knob in self.spaces[backend].knobs:
                if knob.applies(chosen):
                    allowed = knob.allowed(chosen)
                    if not allowed:
                        break
                    chosen[knob.name] = rng.choice(allowed)
            else:
                config = self.build(backend, chosen)
                if (
                    config_key(config) not in avoid
                    and self.refusal(config) is None
                    and (fits is None or fits(config))
                ):
                    return config
        if self.size() > _ENUMERATE_UP_TO:
            return None  # unlucky draws in a large space: the sampler goes on
        # The first of the layouts not avoided, in a random order, that the target runs and
        # that fits (a uniform draw among them), pricing at most `_PRICED` of them: near the
        # end of a search few fit, and a 5-minute simulated sweep of the desktop (seed 2) that
        # priced all 4 884 at each of its 332 late asks ran over 15 minutes of real time (12 s
        # now). A search whose asks find none in a row ends (`autotune.sweep.core`), each ask
        # a new draw.
        left = [
            config
            for backend in self.backends
            for key, config in self._grid(backend)
            if key not in avoid
        ]
        rng.shuffle(left)
        runnable, priced = False, 0
        for config in left:
            if self.refusal(config) is not None:
                continue
            runnable = True
            if fits is None or fits(config):
                return config
            priced += 1
            if priced >= _PRICED:
                return None
        self._exhausted = not runnable
        return None

    def layouts(self):
        """Every config of the searched backends' spaces that the target can run (a
        generator: the exhaustive grid)."""
        for backend in self.backends:
            for _, config in self._grid(backend):
                if self.refusal(config) is None:
                    yield config

    def _grid(self, backend: str) -> list[tuple[str, TrialConfig]]:
        """(its key, the config) for every assignment of ``backend``'s knobs, built once: the
        space does not change (what the target refuses may, `refusal`)."""
        if backend not in self._grids:
            self._grids[backend] = [
                (config_key(config), config)
                for config in (self.build(backend, c) for c in self.spaces[backend].assignments())
            ]
        return self._grids[backend]

    def refusal(self, config: TrialConfig) -> str | None:
        """Why ``config`` must not run on the target, or None."""
        space = self.spaces.get(config.backend)
        if space is None:
            return f"backend {config.backend} is not in this search"
        if space.excluded:
            return f"{config.backend}: {space.excluded}"
        try:
            backend_class(config.backend).validate(config, self.target.topology)
        except ConfigError as error:
            return str(error)
        if self.planner is not None:
            return self.planner.refusal(config)
        return None

    # ------------------------------------------------------------ fixed layouts

    def baseline(self) -> Fixed:
        """The naive baseline every speedup is relative to: the `naive` layout of the searched
        backend with the lowest `baseline_priority` (llama.cpp where it is searched on a CPU
        host, hf on the GPU on a GPU host)."""
        backend = min(self.spaces, key=lambda b: backend_class(b).baseline_priority(self.target))
        config = self.base.replace(backend=backend, **backend_class(backend).naive(self.target))
        return Fixed(f"naive baseline: {describe(config)}", "baseline", config)

    def recipes(self) -> list[Fixed]:
        """The seeds' hand-made layouts for the searched backends, fitted to the target."""
        found = []
        for backend in self.backends:
            for name, fields in backend_class(backend).recipes(self.target):
                found.append(Fixed(name, "recipe", self.base.replace(backend=backend, **fields)))
        return found

    # ------------------------------------------------------------ the plan

    def examples(self, count: int, seed: int = 0, attempts: int = 5000) -> list[TrialConfig]:
        """``count`` configs drawn by the sweep's own sampler (TPE, seeded), each one the
        target can run (refused suggestions are drawn again)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        found: list[TrialConfig] = []
        for _ in range(attempts):
            if len(found) >= count:
                break
            trial = study.ask()
            try:
                found.append(self.suggest(trial))
            except Unfit:
                pass
            # Nothing was measured: tell Optuna the trial ended without a value, so the
            # sampler keeps drawing as it does before a sweep's first result.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return found

    def plan(self) -> dict:
        """Per backend: its knobs and their values, the constraints that join them, the size of its
        space, or why it is left out; and the total."""
        backends = {}
        for name, space in self.spaces.items():
            if space.excluded:
                backends[name] = {"excluded": space.excluded}
                continue
            backends[name] = {
                "knobs": [knob.to_dict() for knob in space.knobs],
                "constraints": space.constraints,
                "size": space.size(),
            }
        return {
            "backends": backends,
            "size": sum(b.get("size", 0) for b in backends.values()),
        }
