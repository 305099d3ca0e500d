"""The backend registry: the one place that names every backend.

Backends are imported only when asked for, so ``autotune --help`` imports neither torch nor
llama_cpp (a backend's module imports those inside its methods). Everything else asks the
backend's class: what it tunes (`Backend.space`), which config fields it reads, how much
memory a layout needs, how a layout reads in a few words.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from autotune.errors import ConfigError

if TYPE_CHECKING:
    from autotune.config import TrialConfig
    from autotune.models import ModelSpec
    from autotune.topology import Topology
    from backends.base import Backend

__all__ = [
    "BACKENDS",
    "backend_class",
    "check_config",
    "create_backend",
    "describe",
    "fields_read",
    "summaries",
]

# name -> (module, class, one line for --help)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "llamacpp": (
        "backends.llamacpp",
        "LlamaCppBackend",
        "N llama.cpp worker processes, each batching sequences in one context",
    ),
    "hf": (
        "backends.torch.hf",
        "HFBackend",
        "one process, transformers generate on padded batches",
    ),
    "ddp": (
        "backends.torch.ddp",
        "DDPBackend",
        "data-parallel ranks under torchrun, each a whole hf model on its share of the prompts",
    ),
    "pipeline": (
        "backends.torch.pipeline",
        "PipelineBackend",
        "the decoder layers split over ranks under torchrun, micro-batches in flight",
    ),
    "fake": (
        "backends.fake",
        "FakeBackend",
        "no model: timings from the config, faults on request",
    ),
}


def summaries() -> dict[str, str]:
    """name -> one line, for help texts."""
    return {name: entry[2] for name, entry in BACKENDS.items()}


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name`` (imports its module); ConfigError if unknown."""
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    module_name, class_name, _ = BACKENDS[name]
    # sys.modules first: import_module's own lookup costs more than the rest of a call, and a
    # simulated sweep asks millions of times.
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    return getattr(module, class_name)


def fields_read(name: str) -> frozenset[str]:
    """The TrialConfig fields backend ``name`` reads."""
    return backend_class(name).fields_read()


def check_config(config: TrialConfig) -> None:
    """ConfigError unless ``config``'s backend exists and every field it does not read is at
    its default (a quant for hf, stages for llama.cpp: a setting that would silently do
    nothing)."""
    backend_class(config.backend).check_fields(config)


def describe(config: TrialConfig | dict) -> str:
    """A layout in a few words (``llamacpp 2x1 b4 q4_0 pin:spread``), as its backend says it."""
    data = config if isinstance(config, dict) else config.to_dict()
    return backend_class(data["backend"]).describe(data)


def create_backend(config: TrialConfig, model: ModelSpec, topology: Topology) -> Backend:
    """A backend instance for ``config`` (not yet loaded)."""
    cls = backend_class(config.backend)
    cls.validate(config, topology)
    cls.validate_model(config, model, topology)
    return cls(config, model, topology)
