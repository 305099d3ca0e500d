"""The ``ddp`` backend: ``workers`` data-parallel ranks started by torchrun (seeds 002, 003).

Each rank loads the whole HF model with ``threads_per_worker`` threads (on a GPU host, its own
GPU), takes its contiguous share of the prompts (`backends.torch.rank.shard`: even split,
remainder to the first ranks), runs the hf backend's batching code on it, and sends its
completions to rank 0, which puts them back in input order. Inference needs no gradient
all-reduce, so "DDP" here is the layout — one full model per rank under torch.distributed —
not the wrapper class.
"""

from __future__ import annotations

from autotune.config import PINNING, TrialConfig
from autotune.knobs import BackendSpace, Knob, Target
from autotune.placement import MAX_SHARE
from backends.base import Completion, TokenScores, gpu_threads, threads_knob
from backends.torch.hf import torch_dtypes, torch_memory_bytes, torch_speed_terms
from backends.torch.torchrun import RankGroupBackend, collective_timeout_s

__all__ = ["DDPBackend", "DDPRank", "rank_limit"]


def rank_limit(target: Target, cpu_ranks: int = 0) -> tuple[int, str]:
    """The most ranks a torch layout may start on ``target``, and why: one per usable CPU,
    on a GPU host up to MAX_SHARE per GPU (above one per GPU they share, round robin) and
    ``cpu_ranks`` more on the CPU."""
    if target.gpus:
        most = min(target.cpus, target.gpus * MAX_SHARE + cpu_ranks)
        why = (
            f"{target.gpus} GPUs, up to {MAX_SHARE} ranks each; ranks above {target.gpus} "
            "share GPUs round robin"
        )
        return most, why + (f"; {cpu_ranks} on the CPU" if cpu_ranks else "")
    return target.cpus, f"{target.cpus} usable CPUs"


class DDPBackend(RankGroupBackend):
    """Data-parallel ranks under torchrun, one hf engine each, gathered in input order."""

    name = "ddp"
    reads = frozenset({"workers", "dtype", "pinning", "placement"})
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
        knobs = [
            Knob("workers", tuple(range(2, most + 1)), note=f"ranks: 2 .. {most} ({why})"),
            threads_knob(target.cpus, "workers", (lambda chosen: True) if target.gpus else None),
            Knob("batch_size", target.batch_sizes),
            Knob("dtype", torch_dtypes(target), ordered=False, screen=True, weights=True),
        ]
        if not target.gpus:  # where the GPU computes, CPU pinning changes little
            knobs.append(Knob("pinning", pinning, ordered=False))
        return BackendSpace(cls.name, tuple(knobs))

    @classmethod
    def naive(cls, target: Target) -> dict:
        return {"workers": 2, "threads_per_worker": max(1, target.cpus // 2), "batch_size": 1}

    @classmethod
    def recipes(cls, target: Target) -> list[tuple[str, dict]]:
        """Seed 002 on a node of several GPUs: torchrun with one rank per GPU, batch 16."""
        if target.gpus < 2:
            return []
        return [
            (
                f"seed 002: torchrun, {target.gpus} ranks, one GPU each, batch 16",
                {
                    "workers": target.gpus,
                    "threads_per_worker": gpu_threads(target.cpus, target.gpus),
                    "batch_size": 16,
                    "dtype": "bfloat16",
                },
            )
        ]

    @classmethod
    def predict_memory_bytes(cls, config, shape) -> float:
        # Every rank holds its own copy of the model; the launcher is one more process.
        ranks = config.workers
        data = torch_memory_bytes(config, shape, weight_copies=ranks, kv_copies=ranks)
        return data + (ranks + 1) * cls.process_overhead_bytes

    @classmethod
    def speed_terms(cls, config, shape):
        return torch_speed_terms(config, shape, gpu_launch_s=0.0011)

    @classmethod
    def gpu_process_bytes(cls, config, shape) -> float:
        return torch_memory_bytes(config, shape, weight_copies=1, kv_copies=1)

    @classmethod
    def rank_spec(cls, config: TrialConfig, model_dir: str, topology, pins=None) -> dict:
        """What every rank needs, JSON-ready (also used by the by-hand torchrun mode)."""
        return {
            "kind": "ddp",
            "config": config.to_dict(),
            "model_dir": model_dir,
            "pins": pins,
            "devices": cls.devices(config, topology),
            "timeout_s": collective_timeout_s(),
        }


class DDPRank:
    """One rank's work: its shard through an hf engine, completions gathered on rank 0."""

    def __init__(self, ctx) -> None:
        from backends.torch.hf import TransformersEngine

        self.ctx = ctx
        config = TrialConfig.from_dict(ctx.spec["config"])
        self.batch_size = config.batch_size
        self.engine = TransformersEngine(
            ctx.spec["model_dir"],
            dtype=config.dtype,
            threads=config.threads_per_worker,
            device=ctx.place,
        )

    def generate(self, prompts, settings) -> list[Completion] | None:
        from backends.torch.hf import generate_in_batches
        from backends.torch.rank import recv_object, send_object, shard

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

    def score(self, requests, settings, k: int) -> list[TokenScores] | None:
        """This rank's shard of ``requests`` scored by its engine; all of them on rank 0."""
        from backends.torch.rank import recv_object, send_object, shard

        ctx = self.ctx
        mine = shard(len(requests), ctx.rank, ctx.world)
        done = self.engine.score_all(requests[mine.start : mine.stop], settings, k)
        if ctx.rank != 0:
            send_object(done, 0)
            return None
        parts = [done] + [recv_object(src, ctx) for src in range(1, ctx.world)]
        return [scored for part in parts for scored in part]
