"""The ``pipeline`` backend: the decoder layers split over ``stages`` ranks (seed 004).

The split is decided here, before any rank starts, from the model's config and the size of
its weights — except for ``--partition compute``, which needs a time profile measured on the
model: stage 0 measures it once per model, dtype, threads and micro-batch size (cached under
the autotune cache) and the others wait for the split. See ``pipeline_stage`` for the stages
and the schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.models import hf_dir
from autotune.pinning import cpu_sets
from backends.base import Completion
from backends.ddp import check_gpus_per_rank
from backends.partition import (
    StageCosts,
    balanced,
    format_boundaries,
    parse_boundaries,
    stage_totals,
    uniform,
)
from backends.torchrun import RankGroupBackend, collective_timeout_s

__all__ = ["PipelineBackend", "memory_costs", "resolve_partition"]

_BYTES = {"float32": 4, "bfloat16": 2}


def _model_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def memory_costs(model_dir: str, config: TrialConfig) -> StageCosts:
    """Bytes each stage would hold: weights (at the run's dtype) and, per layer, the KV cache
    of every micro-batch in flight at ``ctx_per_sequence`` tokens."""
    from safetensors import safe_open

    model = _model_config(model_dir)
    size = _BYTES[config.dtype]
    layers = [0.0] * model["num_hidden_layers"]
    first = last = 0.0
    embed = 0.0
    has_head = False
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                count = 1
                for dim in weights.get_slice(key).get_shape():
                    count *= dim
                parts = key.split(".")
                if parts[:2] == ["model", "layers"]:
                    layers[int(parts[2])] += count * size
                elif key.startswith("model.embed_tokens."):
                    embed += count * size
                elif key.startswith(("model.norm.", "lm_head.")):
                    last += count * size
                    has_head |= key.startswith("lm_head.")
    first += embed
    if not has_head:
        last += embed  # tied embeddings: the last stage keeps its own copy as the head
    heads = model["num_attention_heads"]
    head_dim = model.get("head_dim") or model["hidden_size"] // heads
    kv_heads = model.get("num_key_value_heads") or heads
    in_flight = config.stages + 1
    kv = 2 * kv_heads * head_dim * config.ctx_per_sequence * config.batch_size * in_flight * size
    return StageCosts(tuple(x + kv for x in layers), first, last)


def resolve_partition(
    config: TrialConfig, model_dir: str, memory_cap_bytes: int | None = None
) -> list[range] | None:
    """The stages' layer ranges for ``config``; None for ``compute`` (stage 0 measures it).

    Raises ConfigError for a split that cannot work: more stages than layers, custom
    boundaries that leave a layer out or take one twice, a stage over the memory cap.
    """
    layers = _model_config(model_dir)["num_hidden_layers"]
    if config.stages > layers:
        raise ConfigError(
            f"--stages {config.stages} is more than the model's {layers} decoder layers"
        )
    if config.partition == "uniform":
        return uniform(layers, config.stages)
    if config.partition == "custom":
        return parse_boundaries(config.boundaries, layers, config.stages)
    if config.partition == "compute":
        return None
    costs = memory_costs(model_dir, config)
    ranges = balanced(costs, config.stages)
    if config.stage_memory_gb is not None:
        cap = config.stage_memory_gb * 1e9
    else:
        cap = (memory_cap_bytes or psutil.virtual_memory().available) / config.stages
    for stage, total in enumerate(stage_totals(costs, ranges)):
        if total > cap:
            raise ConfigError(
                f"--partition memory: stage {stage} (layers {format_boundaries([ranges[stage]])}) "
                f"needs {total / 1e9:.2f} GB, over the cap of {cap / 1e9:.2f} GB per stage; use "
                "more stages, a smaller batch or ctx-per-sequence, or a higher --stage-memory-gb"
            )
    return ranges


class PipelineBackend(RankGroupBackend):
    """Stages under torchrun, hidden states passed rank to rank, micro-batches in flight."""

    name = "pipeline"

    @classmethod
    def validate(cls, config, topology) -> None:
        if config.workers != 1:
            raise ConfigError(
                "the pipeline's processes are its stages: set --stages, not --workers "
                f"(got workers {config.workers})"
            )
        cpu_sets(topology, config.stages, config.threads_per_worker, config.pinning)
        if config.quant is not None:
            raise ConfigError("quant is for the llamacpp backend; pipeline takes dtype")
        check_gpus_per_rank(config, config.stages, topology)

    @classmethod
    def validate_model(cls, config, model, topology) -> None:
        resolve_partition(config, str(hf_dir(model)), topology.memory_available_bytes)

    @classmethod
    def rank_spec(
        cls, config: TrialConfig, model_dir: str, pins=None, memory_cap_bytes: int | None = None
    ) -> dict:
        """What every stage needs, JSON-ready (also used by the by-hand torchrun mode)."""
        ranges = resolve_partition(config, model_dir, memory_cap_bytes)
        return {
            "kind": "pipeline",
            "config": config.to_dict(),
            "model_dir": model_dir,
            "pins": pins,
            "ranges": None if ranges is None else [[r.start, r.stop] for r in ranges],
            "timeout_s": collective_timeout_s(),
        }

    def __init__(self, config, model, topology) -> None:
        super().__init__(config, model, topology)
        self.boundaries: str | None = None  # the split the stages run, once loaded
        self.last_stats: dict = {}

    def _spec_extra(self) -> dict:
        return {"memory_cap_bytes": self.topology.memory_available_bytes}

    def load(self) -> None:
        super().load()
        self.boundaries = self.group.info.get("boundaries")  # for compute: as measured

    def _answer(self, payload) -> list[Completion]:
        completions, self.last_stats = payload
        return completions

    def details(self) -> dict:
        return {"boundaries": self.boundaries, **self.last_stats}
