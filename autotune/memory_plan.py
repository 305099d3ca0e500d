"""Predict a trial's peak memory before it starts, and learn from the ones that ran.

The prediction adds, for the layout's processes: the weights (a GGUF is mmapped, so N llama.cpp
workers share its pages and it counts once; every torch process holds its own copy of what it
loads), the KV cache for batch x context, and a runtime overhead per process. After each
trial the measured peak (PSS of the whole tree) corrects the backend's factor, so a model that
guessed low does not guess low twice. A config predicted above the limit is not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from autotune.config import TrialConfig
from autotune.models import ModelSpec, read_gguf_header, weights_summary

__all__ = ["MemoryPlanner", "ModelShape", "model_shape"]

# Bits per weight of llama.cpp's types, for the size of a --quant variant before it exists.
_QUANT_BITS = {"f16": 16.0, "q8_0": 8.5, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_1": 5.0, "q4_0": 4.5}
# Resident memory of one process before the model (interpreter, libraries): first guesses,
# raised by `observe` as soon as a trial of the backend has measured its real peak.
_OVERHEAD = {"llamacpp": 80 * 2**20, "torch": 380 * 2**20, "fake": 40 * 2**20}
_HARNESS = 60 * 2**20  # the trial process itself


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model."""

    file_bytes: int
    parameters: int
    layers: int
    kv_heads: int
    head_dim: int


def model_shape(spec: ModelSpec) -> ModelShape:
    """The model's size and attention shape, from file headers only."""
    summary = weights_summary(spec)
    if spec.format == "gguf":
        metadata, _ = read_gguf_header(spec.path)
        arch = metadata.get("general.architecture", "llama")
        heads = int(metadata.get(f"{arch}.attention.head_count", 1))
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        width = int(metadata.get(f"{arch}.embedding_length", 0))
        layers = int(metadata.get(f"{arch}.block_count", summary.layers or 1))
    else:
        config = json.loads((spec.path / "config.json").read_text())
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        width = config["hidden_size"]
        layers = config["num_hidden_layers"]
    return ModelShape(
        file_bytes=summary.file_bytes,
        parameters=summary.parameters_total,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=width // max(1, heads),
    )


class MemoryPlanner:
    """Predicted peak bytes per config, corrected by what trials measured."""

    def __init__(self, shape: ModelShape, limit_bytes: int) -> None:
        self.shape = shape
        self.limit_bytes = limit_bytes
        self.factors: dict[str, float] = {}  # backend -> measured / predicted, worst seen

    def _raw(self, config: TrialConfig) -> float:
        s = self.shape
        kv_per_sequence = 2 * s.layers * s.kv_heads * s.head_dim * config.ctx_per_sequence
        if config.backend == "fake":
            return _HARNESS + config.workers * _OVERHEAD["fake"]
        if config.backend == "llamacpp":
            weights = s.file_bytes
            if config.quant:
                weights = s.parameters * _QUANT_BITS[config.quant] / 8
            kv = kv_per_sequence * 2 * config.batch_size * config.workers  # f16 cache
            return _HARNESS + weights + kv + config.workers * _OVERHEAD["llamacpp"]
        width = 4 if config.dtype == "float32" else 2
        # transformers holds the weights (the head twice where it is tied and split) and, while
        # generating, the KV cache plus activations; a factor 2 on the cache covers the latter.
        per_copy = s.parameters * width
        kv = kv_per_sequence * width * config.batch_size * 2
        if config.backend == "pipeline":
            processes = config.stages
            weights = per_copy * 1.3  # the tied head on the last stage, plus loading buffers
            kv *= config.stages + 1  # micro-batches in flight
        else:
            processes = config.workers
            weights = per_copy * processes
            kv *= processes
        launcher = _OVERHEAD["torch"] if config.backend in ("ddp", "pipeline") else 0
        return _HARNESS + weights + kv + processes * _OVERHEAD["torch"] + launcher

    def predict(self, config: TrialConfig) -> int:
        """Predicted peak bytes of the trial's process tree."""
        return int(self._raw(config) * self.factors.get(config.backend, 1.0))

    def refusal(self, config: TrialConfig) -> str | None:
        """Why ``config`` must not run (predicted over the limit), or None."""
        predicted = self.predict(config)
        if predicted > self.limit_bytes:
            return (
                f"predicted peak memory {predicted / 2**30:.2f} GiB is over the limit of "
                f"{self.limit_bytes / 2**30:.2f} GiB"
            )
        return None

    def observe(self, config: TrialConfig, measured_bytes: int) -> None:
        """Correct the backend's factor with a trial's measured peak (never below 1)."""
        ratio = measured_bytes / max(1.0, self._raw(config))
        self.factors[config.backend] = max(self.factors.get(config.backend, 1.0), ratio)
