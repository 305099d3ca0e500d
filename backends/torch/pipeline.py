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
from autotune.knobs import BackendSpace, Knob, Target
from autotune.models import hf_dir
from autotune.placement import MAX_SHARE, Device, default_placement, format_placement
from backends.base import Completion, gpu_threads, threads_knob
from backends.torch.ddp import rank_limit
from backends.torch.hf import DTYPE_BYTES, torch_dtypes, torch_memory_bytes, torch_speed_terms
from backends.torch.partition import (
    StageCosts,
    balanced,
    format_boundaries,
    parse_boundaries,
    stage_totals,
    uniform,
)
from backends.torch.torchrun import RankGroupBackend, collective_timeout_s

__all__ = ["PipelineBackend", "gpu_placement", "memory_costs", "resolve_partition", "stage_caps"]

_MAX_STAGES = 8  # beyond this a micro-batch spends more time travelling than computing
_SHIFTS = tuple(range(-3, 4))


def _model_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def memory_costs(model_dir: str, config: TrialConfig) -> StageCosts:
    """Bytes each stage would hold: weights (at the run's dtype) and, per layer, the KV cache
    of every micro-batch in flight at ``ctx_per_sequence`` tokens."""
    from safetensors import safe_open

    model = _model_config(model_dir)
    size = DTYPE_BYTES[config.dtype]
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
    config: TrialConfig, model_dir: str, caps: list[float] | None = None
) -> list[range] | None:
    """The stages' layer ranges for ``config``; None for ``compute`` (stage 0 measures it).
    ``caps``: each stage's memory in bytes for ``--partition memory`` (`stage_caps`).

    Raises ConfigError for a split that cannot work: more stages than layers, custom
    boundaries that leave a layer out or take one twice, a stage over its memory cap.
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
        caps = [config.stage_memory_gb * 1e9] * config.stages
    elif caps is None:
        caps = [psutil.virtual_memory().available / config.stages] * config.stages
    for stage, total in enumerate(stage_totals(costs, ranges)):
        if total > caps[stage]:
            raise ConfigError(
                f"--partition memory: stage {stage} (layers {format_boundaries([ranges[stage]])}) "
                f"needs {total / 1e9:.2f} GB, over the cap of {caps[stage] / 1e9:.2f} GB of its "
                "device; use more stages, a smaller batch or ctx-per-sequence, or a higher "
                "--stage-memory-gb"
            )
    return ranges


def stage_caps(devices, topology) -> list[float]:
    """Each stage's memory: its GPU's (90%), shared by the stages on that GPU, or the host's
    available memory shared by the CPU stages."""
    gpu_bytes = {gpu.index: gpu.memory_bytes for gpu in topology.gpus}
    on_cpu = sum(1 for d in devices if not d.is_gpu)
    caps = []
    for device in devices:
        if device.is_gpu:
            sharing = sum(1 for d in devices if d.gpus == device.gpus)
            caps.append(0.9 * gpu_bytes.get(device.gpus[0], 0) / sharing)
        else:
            caps.append(topology.memory_available_bytes / on_cpu)
    return caps


def gpu_placement(gpus: int, stages: int, cpu_stages: int) -> str | None:
    """The placement of a pipeline with its last ``cpu_stages`` on the CPU and the others one
    per GPU (round robin, sharing, past the last GPU); None where that is the default."""
    devices = default_placement(gpus, stages - cpu_stages, blocks=False) + (Device(),) * cpu_stages
    return None if cpu_stages == 0 else format_placement(devices)


def _shifted(layers: int, stages: int, shift: int) -> list[range]:
    """The uniform split with every cut moved by ``shift`` layers, each stage keeping one."""
    cuts = [r.stop for r in uniform(layers, stages)[:-1]]
    moved: list[int] = []
    for index, cut in enumerate(cuts):
        low = (moved[-1] if moved else 0) + 1
        high = layers - (len(cuts) - index)
        moved.append(min(max(cut + shift, low), high))
    edges = [0, *moved, layers]
    return [range(a, b) for a, b in zip(edges, edges[1:], strict=False)]


class PipelineBackend(RankGroupBackend):
    """Stages under torchrun, hidden states passed rank to rank, micro-batches in flight."""

    name = "pipeline"
    reads = frozenset(
        {
            "stages",
            "partition",
            "boundaries",
            "stage_memory_gb",
            "kv_cache",
            "dtype",
            "ctx_per_sequence",
            "pinning",
            "placement",
        }
    )
    first_guess_load_s = 15.0
    first_guess_tokens_per_s = 20.0
    answer_family = "torch"
    baseline_rank = 3

    @classmethod
    def space(cls, target: Target) -> BackendSpace:
        gpus = target.gpus
        ranks, why = rank_limit(target, cpu_ranks=1)  # on a GPU host one stage may be the CPU
        most = min(ranks, target.layers, _MAX_STAGES)
        if most < 2:
            return BackendSpace(cls.name, excluded=f"needs 2 stages; {why} allow {ranks}")
        knobs = [
            Knob(
                "stages",
                tuple(range(2, most + 1)),
                note=f"2 .. min({why}, {target.layers} layers, {_MAX_STAGES})",
            )
        ]
        on_gpu = None
        if gpus:
            knobs.append(
                Knob(
                    "cpu_stages",
                    (0, 1),
                    allow=lambda chosen, cpu: 1 <= chosen["stages"] - cpu <= gpus * MAX_SHARE,
                    note="cpu_stages: the last stages on the CPU (seed 004: cuda:0,cuda:1,cpu), "
                    "the others one per GPU",
                )
            )
            on_gpu = lambda chosen: chosen["cpu_stages"] == 0  # noqa: E731
        knobs += [
            threads_knob(target.cpus, "stages", on_gpu),
            Knob("batch_size", target.batch_sizes, note="micro-batch"),
            Knob("dtype", torch_dtypes(target), ordered=False, screen=True, weights=True),
            Knob(
                "partition",
                ("uniform", "compute", "shifted"),
                ordered=False,
                # validate refuses compute over GPU + CPU stages (it times stage 0's device)
                allow=lambda chosen, partition: (
                    partition != "compute" or not chosen.get("cpu_stages")
                ),
                note="shifted: the uniform split with every cut moved by boundary_shift; "
                "compute only when every stage is on a GPU or every one on the CPU",
            ),
            Knob(
                "boundary_shift",
                _SHIFTS,
                only_if=lambda chosen: chosen["partition"] == "shifted",
                note="boundary_shift (layers) only when partition is shifted",
            ),
        ]
        return BackendSpace(cls.name, tuple(knobs))

    @classmethod
    def config_changes(cls, chosen: dict, target: Target) -> dict:
        changes = {k: v for k, v in chosen.items() if k not in ("boundary_shift", "cpu_stages")}
        if chosen.get("cpu_stages"):
            changes["placement"] = gpu_placement(
                target.gpus, chosen["stages"], chosen["cpu_stages"]
            )
        if chosen.get("partition") == "shifted":
            ranges = _shifted(target.layers, chosen["stages"], chosen["boundary_shift"])
            changes.update(partition="custom", boundaries=format_boundaries(ranges))
        return changes

    @classmethod
    def knob_values(cls, config, target: Target) -> dict:
        values = config.to_dict()
        if target.gpus:
            del values["placement"]  # a point of the space only as cpu_stages
            for cpu in (0, 1):
                if config.placement == gpu_placement(target.gpus, config.stages, cpu):
                    values["cpu_stages"] = cpu
        if config.partition == "custom":
            del values["partition"]  # a point of the space only as a shifted uniform split
            for shift in _SHIFTS:
                ranges = _shifted(target.layers, config.stages, shift)
                if format_boundaries(ranges) == config.boundaries:
                    values.update(partition="shifted", boundary_shift=shift)
                    break
        return values

    @classmethod
    def naive(cls, target: Target) -> dict:
        return {"stages": 2, "threads_per_worker": max(1, target.cpus // 2), "batch_size": 1}

    @classmethod
    def recipes(cls, target: Target) -> list[tuple[str, dict]]:
        """Seed 004 on a GPU host: the layers split in two, over two GPUs (cuda:0,cuda:1) or,
        with one, over the GPU and the CPU (cuda:0,cpu)."""
        if not target.gpus or target.layers < 2:
            return []
        cpu_stages = 0 if target.gpus >= 2 else 1
        devices = "cuda:0,cuda:1" if target.gpus >= 2 else "cuda:0,cpu"
        threads = max(1, target.cpus // 2) if cpu_stages else gpu_threads(target.cpus, 2)
        return [
            (
                f"seed 004: the layers split over {devices}",
                {
                    "stages": 2,
                    "placement": gpu_placement(target.gpus, 2, cpu_stages),
                    "threads_per_worker": threads,
                    "batch_size": 8,
                    "dtype": "bfloat16",
                },
            )
        ]

    @classmethod
    def predict_memory_bytes(cls, config, shape) -> float:
        # The weights once over all stages (the tied head on the last one too, plus loading
        # buffers: x1.3); a KV cache per micro-batch in flight (stages + 1).
        data = torch_memory_bytes(config, shape, weight_copies=1.3, kv_copies=config.stages + 1)
        return data + (config.stages + 1) * cls.process_overhead_bytes

    @classmethod
    def speed_terms(cls, config, shape):
        # Each stage's share of the layers: its boundaries where given, else a uniform split
        # (the speed model does not run the memory or compute partitions' profiles).
        layers = shape.layers
        if config.partition == "custom" and config.boundaries:
            ranges = parse_boundaries(config.boundaries, layers, config.stages)
        else:
            ranges = uniform(layers, config.stages)
        shares = tuple(len(r) / layers for r in ranges)
        return torch_speed_terms(config, shape, gpu_launch_s=0.0012, stage_shares=shares)

    @classmethod
    def gpu_process_bytes(cls, config, shape) -> float:
        # Its share of the layers: of the weights (x1.3 as above) and of every cache.
        share = 1 / config.stages
        in_flight = config.stages + 1
        return torch_memory_bytes(
            config, shape, weight_copies=1.3 * share, kv_copies=in_flight * share
        )

    @classmethod
    def describe(cls, config: dict) -> str:
        text = super().describe(config)
        if not config.get("boundaries"):
            text += f" {config.get('partition', 'uniform')}"
        return text

    @classmethod
    def default_devices(cls, config, gpus: int):
        # A stage computes on one device: one GPU each (round robin where fewer).
        return default_placement(gpus, config.stages, blocks=False)

    @classmethod
    def validate(cls, config, topology) -> None:
        if config.workers != 1:
            raise ConfigError(
                "the pipeline's processes are its stages: set --stages, not --workers "
                f"(got workers {config.workers})"
            )
        super().validate(config, topology)

    @classmethod
    def check_devices(cls, config, devices, topology) -> None:
        if any(len(d.gpus) > 1 for d in devices):
            raise ConfigError(
                f"placement {config.placement}: a pipeline stage computes on one device; "
                "give one GPU (or cpu) per stage"
            )
        kinds = {d.is_gpu for d in devices}
        if config.partition == "compute" and len(kinds) > 1:
            raise ConfigError(
                "--partition compute times the layers on stage 0's device only; with stages "
                f"on GPUs and the CPU ({format_placement(devices)}) use uniform, memory or custom"
            )

    @classmethod
    def validate_model(cls, config, model, topology) -> None:
        caps = stage_caps(cls.placement(config, topology), topology)
        resolve_partition(config, str(hf_dir(model)), caps)

    @classmethod
    def rank_spec(cls, config: TrialConfig, model_dir: str, topology, pins=None) -> dict:
        """What every stage needs, JSON-ready (also used by the by-hand torchrun mode)."""
        caps = stage_caps(cls.placement(config, topology), topology)
        ranges = resolve_partition(config, model_dir, caps)
        return {
            "kind": "pipeline",
            "config": config.to_dict(),
            "model_dir": model_dir,
            "pins": pins,
            "devices": cls.devices(config, topology),
            "ranges": None if ranges is None else [[r.start, r.stop] for r in ranges],
            "timeout_s": collective_timeout_s(),
        }

    def __init__(self, config, model, topology) -> None:
        super().__init__(config, model, topology)
        self.boundaries: str | None = None  # the split the stages run, once loaded
        self.last_stats: dict = {}

    def load(self) -> None:
        super().load()
        self.boundaries = self.group.info.get("boundaries")  # for compute: as measured

    def _answer(self, payload) -> list[Completion]:
        completions, self.last_stats = payload
        return completions

    def details(self) -> dict:
        return {"boundaries": self.boundaries, **self.last_stats}
