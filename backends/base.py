"""The interface every backend implements, and the record of one generated request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

from autotune.config import TrialConfig
from autotune.models import ModelSpec
from autotune.pinning import cpu_sets
from autotune.topology import Topology
from experiments.workload import GenerationSettings, Prompt

__all__ = ["Backend", "Completion"]


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One request's result. Times are seconds; ``ttft_s`` is None where a backend cannot see
    the first token. ``token_ids`` are the generated tokens, end-of-sequence left out."""

    id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    worker_rank: int
    latency_s: float
    ttft_s: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        data = asdict(self)
        data["token_ids"] = list(self.token_ids)
        return data


class Backend(ABC):
    """Loads a model once, generates whole workloads, and closes.

    Lifecycle, in this order: the constructor (cheap, no side effects), `load` once, `generate`
    any number of times, `close` (idempotent; always ends every child process). As a context
    manager it loads on enter and closes on exit.
    """

    name: ClassVar[str]

    def __init__(self, config: TrialConfig, model: ModelSpec, topology: Topology) -> None:
        self.config = config
        self.model = model
        self.topology = topology

    @classmethod
    def validate(cls, config: TrialConfig, topology: Topology) -> None:
        """Raise ConfigError if this backend cannot run ``config`` on this machine.

        Called before the backend is built. The default checks that a pinning policy has the
        CPUs it needs.
        """
        cpu_sets(topology, config.workers, config.threads_per_worker, config.pinning)

    @classmethod
    def validate_model(cls, config: TrialConfig, model: ModelSpec, topology: Topology) -> None:
        """Raise ConfigError if ``config`` cannot run on ``model`` (e.g. a layer split that
        does not fit its layers); called after `validate`, before anything starts."""
        return  # most backends need no check that depends on the model

    @abstractmethod
    def load(self) -> None:
        """Load the model (in every worker); called once, before any `generate`."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[Completion]:
        """Generate for every prompt; results in input order, one per prompt."""

    def details(self) -> dict:
        """What this backend chose or saw that the config does not say (JSON-ready); e.g. the
        pipeline's layer split. Empty by default."""
        return {}

    def close(self) -> None:  # noqa: B027 - a backend without children has nothing to close
        """Release the model and end every child process; safe to call twice."""

    def __enter__(self) -> Backend:
        self.load()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
