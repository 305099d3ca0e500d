"""The backend registry: the one place that names every backend.

Backends are imported only when created, so ``autotune --help`` imports neither torch nor
llama_cpp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autotune.config import TrialConfig
    from autotune.models import ModelSpec
    from autotune.topology import Topology
    from backends.base import Backend

__all__ = ["BACKENDS", "backend_class", "create_backend"]

# name -> (module, class, one line for --help)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "llamacpp": (
        "backends.llamacpp",
        "LlamaCppBackend",
        "N llama.cpp worker processes, each batching sequences in one context",
    ),
    "hf": ("backends.hf", "HFBackend", "one process, transformers generate on padded batches"),
    "ddp": (
        "backends.ddp",
        "DDPBackend",
        "data-parallel ranks under torchrun, each a whole hf model on its share of the prompts",
    ),
    "pipeline": (
        "backends.pipeline",
        "PipelineBackend",
        "the decoder layers split over ranks under torchrun, micro-batches in flight",
    ),
    "fake": (
        "backends.fake",
        "FakeBackend",
        "no model: timings from the config, faults on request",
    ),
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name`` (imports its module)."""
    module_name, class_name, _ = BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def create_backend(config: TrialConfig, model: ModelSpec, topology: Topology) -> Backend:
    """A backend instance for ``config`` (not yet loaded)."""
    cls = backend_class(config.backend)
    cls.validate(config, topology)
    cls.validate_model(config, model, topology)
    return cls(config, model, topology)
