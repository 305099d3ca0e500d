"""The ``ddp`` backend: ``workers`` data-parallel ranks started by torchrun (seeds 002, 003).

Each rank loads the whole HF model with ``threads_per_worker`` threads (on a GPU host, its own
GPU), takes its contiguous share of the prompts (`torch_rank.shard`: even split, remainder to
the first ranks), runs the hf backend's batching code on it, and sends its completions to rank
0, which puts them back in input order. Inference needs no gradient all-reduce, so "DDP" here
is the layout — one full model per rank under torch.distributed — not the wrapper class.
"""

from __future__ import annotations

from collections.abc import Sequence

from autotune.config import TrialConfig
from autotune.errors import BackendError, ConfigError
from autotune.models import hf_dir
from autotune.pinning import cpu_sets
from backends.base import Backend, Completion
from backends.torchrun import RankGroup, collective_timeout_s
from experiments.workload import GenerationSettings, Prompt

__all__ = ["DDPBackend", "DDPRank", "check_gpus_per_rank"]


def check_gpus_per_rank(config: TrialConfig, ranks: int, topology) -> None:
    """On a GPU host every rank needs a GPU of its own (gpus // ranks >= 1)."""
    gpus = len(getattr(topology, "gpus", ()) or ())
    if gpus and ranks > gpus:
        raise ConfigError(
            f"{config.backend}: {ranks} ranks but {gpus} GPUs; each rank needs its own GPU"
        )


class DDPBackend(Backend):
    """Data-parallel ranks under torchrun, one hf engine each, gathered in input order."""

    name = "ddp"

    @classmethod
    def validate(cls, config, topology) -> None:
        super().validate(config, topology)
        if config.quant is not None:
            raise ConfigError("quant is for the llamacpp backend; ddp takes dtype")
        check_gpus_per_rank(config, config.workers, topology)

    @classmethod
    def rank_spec(cls, config: TrialConfig, model_dir: str, pins=None) -> dict:
        """What every rank needs, JSON-ready (also used by the by-hand torchrun mode)."""
        return {
            "kind": "ddp",
            "config": config.to_dict(),
            "model_dir": model_dir,
            "pins": pins,
            "timeout_s": collective_timeout_s(),
        }

    def __init__(self, config, model, topology) -> None:
        super().__init__(config, model, topology)
        self.group: RankGroup | None = None

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids, rank order (empty before load)."""
        return self.group.pids if self.group else []

    @property
    def load_times_s(self) -> list[float]:
        return self.group.load_times_s if self.group else []

    def load(self) -> None:
        pins = cpu_sets(
            self.topology, self.config.workers, self.config.threads_per_worker, self.config.pinning
        )
        spec = self.rank_spec(
            self.config, str(hf_dir(self.model)), [sorted(p) for p in pins] if pins else None
        )
        self.group = RankGroup("ddp", spec, self.config.workers, self.config.threads_per_worker)
        try:
            self.group.start()
        except BaseException:
            self.close()
            raise

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[Completion]:
        if self.group is None:
            raise BackendError("ddp backend: generate() before load()")
        return self.group.request(("generate", tuple(prompts), settings))

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


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
