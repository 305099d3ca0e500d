"""The ``ddp`` backend: ``workers`` data-parallel ranks started by torchrun (seeds 002, 003).

Each rank loads the whole HF model with ``threads_per_worker`` threads (on a GPU host, its own
GPU), takes its contiguous share of the prompts (`torch_rank.shard`: even split, remainder to
the first ranks), runs the hf backend's batching code on it, and sends its completions to rank
0, which puts them back in input order. Inference needs no gradient all-reduce, so "DDP" here
is the layout — one full model per rank under torch.distributed — not the wrapper class.
"""

from __future__ import annotations

from autotune.config import PINNING, TrialConfig
from autotune.errors import ConfigError
from autotune.knobs import BackendSpace, Knob, Target
from backends.base import Completion, threads_knob
from backends.hf import torch_dtypes, torch_memory_bytes
from backends.torchrun import RankGroupBackend, collective_timeout_s

__all__ = ["DDPBackend", "DDPRank", "check_gpus_per_rank", "rank_limit"]


def check_gpus_per_rank(config: TrialConfig, ranks: int, topology) -> None:
    """On a GPU host every rank needs a GPU of its own (gpus // ranks >= 1)."""
    gpus = len(getattr(topology, "gpus", ()) or ())
    if gpus and ranks > gpus:
        raise ConfigError(
            f"{config.backend}: {ranks} ranks but {gpus} GPUs; each rank needs its own GPU"
        )


def rank_limit(target: Target) -> tuple[int, str]:
    """The most ranks a torch layout may start on ``target``, and why: one per usable CPU, or
    on a GPU host one per GPU (each rank needs its own)."""
    if target.gpus:
        return min(target.cpus, target.gpus), f"one GPU per rank ({target.gpus} GPUs)"
    return target.cpus, f"{target.cpus} usable CPUs"


class DDPBackend(RankGroupBackend):
    """Data-parallel ranks under torchrun, one hf engine each, gathered in input order."""

    name = "ddp"
    reads = frozenset({"workers", "dtype", "pinning"})
    first_guess_load_s = 15.0
    first_guess_tokens_per_s = 25.0
    answer_family = "torch"
    continuous_batching = False  # static batches: each starts from empty
    baseline_rank = 2

    @classmethod
    def space(cls, target: Target) -> BackendSpace:
        most, why = rank_limit(target)
        if most < 2:  # ddp with one rank is hf
            return BackendSpace(cls.name, excluded=f"needs 2 ranks; {why} allow {most}")
        pinning = PINNING if target.topology.threads_per_core > 1 else ("none", "spread")
        return BackendSpace(
            cls.name,
            (
                Knob("workers", tuple(range(2, most + 1)), note=f"ranks: 2 .. {most} ({why})"),
                threads_knob(target.cpus, "workers"),
                Knob("batch_size", target.batch_sizes),
                Knob("dtype", torch_dtypes(target), ordered=False),
                Knob("pinning", pinning, ordered=False),
            ),
        )

    @classmethod
    def naive(cls, target: Target) -> dict:
        return {"workers": 2, "threads_per_worker": max(1, target.cpus // 2), "batch_size": 1}

    @classmethod
    def predict_memory_bytes(cls, config, shape) -> float:
        # Every rank holds its own copy of the model; the launcher is one more process.
        ranks = config.workers
        data = torch_memory_bytes(config, shape, weight_copies=ranks, kv_copies=ranks)
        return data + (ranks + 1) * cls.process_overhead_bytes

    @classmethod
    def validate(cls, config, topology) -> None:
        super().validate(config, topology)
        check_gpus_per_rank(config, config.workers, topology)

    @classmethod
    def rank_spec(cls, config: TrialConfig, model_dir: str, pins=None, **extra) -> dict:
        """What every rank needs, JSON-ready (also used by the by-hand torchrun mode)."""
        return {
            "kind": "ddp",
            "config": config.to_dict(),
            "model_dir": model_dir,
            "pins": pins,
            "timeout_s": collective_timeout_s(),
        }


class DDPRank:
    """One rank's work: its shard through an hf engine, completions gathered on rank 0."""

    def __init__(self, ctx) -> None:
        from backends.hf import TransformersEngine

        self.ctx = ctx
        config = TrialConfig.from_dict(ctx.spec["config"])
        self.batch_size = config.batch_size
        self.engine = TransformersEngine(
            ctx.spec["model_dir"],
            dtype=config.dtype,
            threads=config.threads_per_worker,
            device=ctx.device,
        )

    def generate(self, prompts, settings) -> list[Completion] | None:
        from backends.hf import generate_in_batches
        from backends.torch_rank import recv_object, send_object, shard

        ctx = self.ctx
        mine = shard(len(prompts), ctx.rank, ctx.world)
        done = generate_in_batches(
            self.engine, prompts[mine.start : mine.stop], settings, self.batch_size, ctx.rank
        )
        if ctx.rank != 0:
            send_object(done, 0)
            return None
        # Rank by rank, so a timeout says which rank never answered.
        parts = [done] + [recv_object(src, ctx) for src in range(1, ctx.world)]
        return [completion for part in parts for completion in part]
