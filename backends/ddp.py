"""The ``ddp`` backend: ``workers`` data-parallel ranks started by torchrun (seeds 002, 003).

Each rank loads the whole HF model with ``threads_per_worker`` threads (on a GPU host, its own
GPU), takes its contiguous share of the prompts (`torch_rank.shard`: even split, remainder to
the first ranks), runs the hf backend's batching code on it, and sends its completions to rank
0, which puts them back in input order. Inference needs no gradient all-reduce, so "DDP" here
is the layout — one full model per rank under torch.distributed — not the wrapper class.
"""

from __future__ import annotations

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from backends.base import Completion
from backends.torchrun import RankGroupBackend, collective_timeout_s

__all__ = ["DDPBackend", "DDPRank", "check_gpus_per_rank"]


def check_gpus_per_rank(config: TrialConfig, ranks: int, topology) -> None:
    """On a GPU host every rank needs a GPU of its own (gpus // ranks >= 1)."""
    gpus = len(getattr(topology, "gpus", ()) or ())
    if gpus and ranks > gpus:
        raise ConfigError(
            f"{config.backend}: {ranks} ranks but {gpus} GPUs; each rank needs its own GPU"
        )


class DDPBackend(RankGroupBackend):
    """Data-parallel ranks under torchrun, one hf engine each, gathered in input order."""

    name = "ddp"

    @classmethod
    def validate(cls, config, topology) -> None:
        super().validate(config, topology)
        if config.quant is not None:
            raise ConfigError("quant is for the llamacpp backend; ddp takes dtype")
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
