"""The ``llamacpp`` backend: ``workers`` processes, each one llama.cpp model loaded once.

Each worker runs ``threads_per_worker`` threads and decodes up to ``batch_size`` sequences
together (continuous batching, see `backends.llamacpp.engine`). Prompts go into one shared
queue so a fast worker takes more; results come back over each worker's pipe as they finish
and are put back in input order (the processes: `backends.llamacpp.pool`).
"""

from __future__ import annotations

from collections.abc import Sequence

from autotune.config import PINNING, QUANTS
from autotune.errors import BackendError, ConfigError
from autotune.knobs import BackendSpace, Knob, Target
from autotune.pinning import cpu_sets
from autotune.placement import MAX_SHARE, default_placement
from autotune.workload import GenerationSettings, Prompt
from backends.base import (
    Backend,
    Completion,
    ScoreRequest,
    SpeedTerms,
    TokenScores,
    gpu_threads,
    threads_knob,
)
from backends.llamacpp.pool import WorkerPool
from backends.llamacpp.probe import resolve_extra_buffers
from backends.llamacpp.quant import QUANT_BITS, QUANT_COST, gguf_variant

__all__ = ["LlamaCppBackend", "engine_settings", "offload_steps"]


def offload_steps(layers: int) -> tuple[int, ...]:
    """n_gpu_layers to try: none, a quarter, half, three quarters, all (-1: the output layer
    too), in that order."""
    steps = sorted({layers * k // 4 for k in (1, 2, 3)} - {0})
    return (0, *steps, -1)


class LlamaCppBackend(Backend):
    """Multi-process llama.cpp with multi-sequence batching inside each worker."""

    name = "llamacpp"
    reads = frozenset(
        {
            "workers",
            "quant",
            "n_batch",
            "ctx_per_sequence",
            "pinning",
            "prefill_threads",
            "gpu_layers",
            "placement",
            "extra_buffers",
        }
    )
    # `score` teacher-forces one sequence at a time in slot 0 of workers that hold the same
    # weights, and each value a thread computes is a whole row's (so neither the thread count
    # nor where threads run changes the sums): these do not enter it. Measured bit-identical
    # on the embedded model after a timed pass, 1x2 b1 / 2x1 b4 / 2x1 b16 / 1x2 b16 / 1x1 b8
    # q4_k_m; the slow tests vary every one of them on the tiny model (test_quality.py).
    unscored = frozenset(
        {"workers", "batch_size", "threads_per_worker", "prefill_threads", "pinning"}
    )
    first_guess_load_s = 2.0
    first_guess_tokens_per_s = 40.0
    answer_family = "llama.cpp"
    baseline_rank = 0  # llama-cpp-python is what people run a GGUF with
    cuts_tail = True
    process_overhead_bytes = 80 * 2**20

    @classmethod
    def space(cls, target: Target) -> BackendSpace:
        cpus = target.cpus
        # compact keeps SMT siblings together; without SMT it is the same as spread.
        pinning = PINNING if target.topology.threads_per_core > 1 else ("none", "spread")
        knobs = [Knob("workers", tuple(range(1, cpus + 1)))]
        on_gpu = None
        if target.gpus and target.topology.llama_gpu_offload:
            most = target.gpus * MAX_SHARE
            knobs.append(
                Knob(
                    "gpu_layers",
                    offload_steps(target.layers),
                    allow=lambda chosen, layers: layers == 0 or chosen["workers"] <= most,
                    note=f"n_gpu_layers (-1: all); offloading workers <= {most} "
                    f"({MAX_SHARE} per GPU), each gpus // workers GPUs (seed 003)",
                )
            )
            on_gpu = lambda chosen: chosen["gpu_layers"] == -1  # noqa: E731
        knobs += [
            threads_knob(cpus, "workers", on_gpu),
            Knob("batch_size", target.batch_sizes),
            Knob(
                "quant",
                (None, *(q for q in QUANTS if q != target.own_quant)),
                ordered=False,
                note="None: the file's own type"
                + (f", {own}" if (own := target.own_quant) else "")
                + (
                    f"; the others requantize a {own} file (a copy of a copy)"
                    if own and own not in ("f16", "bf16", "f32")
                    else ""
                ),
                screen=True,
                weights=True,
            ),
            Knob(
                "pinning",
                pinning,
                ordered=False,
                only_if=lambda chosen: chosen["workers"] > 1,
                note="pinning only when workers > 1",
            ),
        ]
        if len(target.extra_buffers) > 1:  # both run here: the repacked weights are a knob
            knobs.append(
                Knob(
                    "extra_buffers",
                    target.extra_buffers,
                    ordered=False,
                    note="llama.cpp's extra buffer types (AMX, CPU repack): on, off",
                    screen=True,
                )
            )
        return BackendSpace(cls.name, tuple(knobs))

    @classmethod
    def config_changes(cls, chosen: dict, target: Target) -> dict:
        # Where the knob is not searched, every layout runs the one value that runs here
        # (off where the probe found that the extra buffers trap).
        return {"extra_buffers": target.extra_buffers[0], **chosen}

    @classmethod
    def baseline_priority(cls, target: Target) -> int:
        # llama-cpp-python offloads nothing by default: on a GPU host what a user gets
        # without tuning is transformers on the GPU (hf ranks 1).
        return 4 if target.gpus else cls.baseline_rank

    @classmethod
    def default_devices(cls, config, gpus: int):
        if config.gpu_layers == 0:
            return default_placement(0, config.workers)
        return default_placement(gpus, config.workers)

    @classmethod
    def check_devices(cls, config, devices, topology) -> None:
        if config.gpu_layers != 0:
            if not topology.gpus:
                raise ConfigError("--gpu-layers: this machine has no GPU to offload to")
            if not topology.llama_gpu_offload:
                raise ConfigError(
                    "--gpu-layers: the installed llama-cpp-python cannot offload (a CPU "
                    'build); install a CUDA build: CMAKE_ARGS="-DGGML_CUDA=on" pip install '
                    "--force-reinstall --no-cache-dir llama-cpp-python"
                )
            if not all(d.is_gpu for d in devices):
                raise ConfigError(
                    f"placement {config.placement}: with --gpu-layers every worker needs a GPU"
                )
        elif any(d.is_gpu for d in devices):
            raise ConfigError(
                f"placement {config.placement} puts workers on GPUs but --gpu-layers is 0"
            )

    @classmethod
    def naive(cls, target: Target) -> dict:
        # llama-cpp-python's defaults: n_threads = half the CPUs it counts
        # (multiprocessing.cpu_count(), every logical CPU), n_threads_batch = all of them.
        logical = target.topology.logical_cpus
        threads = max(1, min(target.cpus, logical // 2))
        return {
            "workers": 1,
            "threads_per_worker": threads,
            "prefill_threads": logical,
            "batch_size": 1,
            "extra_buffers": target.extra_buffers[0],  # llama.cpp's own default, where it runs
        }

    @classmethod
    def recipes(cls, target: Target) -> list[tuple[str, dict]]:
        """Seed 001: PARALLEL_WORKERS x threads over all usable CPUs (1 x N, 2 x N/2, ...)."""
        found, workers = [], 1
        while workers <= target.cpus:
            threads = target.cpus // workers
            found.append(
                (
                    f"seed 001: {workers} workers x {threads} threads",
                    {
                        "workers": workers,
                        "threads_per_worker": threads,
                        "batch_size": 1,
                        "extra_buffers": target.extra_buffers[0],
                    },
                )
            )
            workers *= 2
        if target.gpus and target.topology.llama_gpu_offload:
            # Seed 003: one worker per GPU, every layer on it.
            found.append(
                (
                    f"seed 003: {target.gpus} workers, one GPU each, all layers offloaded",
                    {
                        "workers": target.gpus,
                        "threads_per_worker": gpu_threads(target.cpus, target.gpus),
                        "gpu_layers": -1,
                        "batch_size": 8,
                        "extra_buffers": target.extra_buffers[0],
                    },
                )
            )
        return found

    @classmethod
    def predict_memory_bytes(cls, config, shape) -> float:
        # The GGUF is mmapped: N workers share its pages, so it counts once.
        weights = _weight_bytes(config, shape)
        kv = shape.kv_bytes_per_token(2) * config.ctx_per_sequence  # f16 cache
        kv *= config.batch_size * config.workers
        return weights + kv + config.workers * cls.process_overhead_bytes

    @classmethod
    def gpu_process_bytes(cls, config, shape) -> float:
        # Each offloading worker holds its own copy of its layers' weights and KV cache.
        if config.gpu_layers == 0:
            return 0.0
        share = 1.0 if config.gpu_layers == -1 else min(1.0, config.gpu_layers / shape.layers)
        kv = shape.kv_bytes_per_token(2) * config.ctx_per_sequence * config.batch_size
        return (_weight_bytes(config, shape) + kv) * share

    @classmethod
    def speed_terms(cls, config, shape) -> SpeedTerms:
        # Its int8 kernels, a type's dequantisation cost on top; short launch gaps on a GPU
        # (its CUDA graphs), where only the offloaded share of the layers runs.
        return SpeedTerms(
            weight_bytes=_weight_bytes(config, shape),
            cpu_cost=QUANT_COST.get(config.quant or shape.weight_type or "", QUANT_COST["q4_1"]),
            gpu_launch_s=0.00008,
            gpu_share=None
            if config.gpu_layers == -1
            else min(1.0, config.gpu_layers / max(1, shape.layers)),
        )

    def __init__(self, config, model, topology) -> None:
        super().__init__(config, model, topology)
        self._pool: WorkerPool | None = None  # the worker processes, from load()
        self._pids: list[int] = []
        self.load_times_s: list[float] = []
        self._extra_buffers: bool | None = None  # what the workers load with (`load`)

    def load(self) -> None:
        path = gguf_variant(self.model, self.config.quant)
        pins = cpu_sets(
            self.topology, self.config.workers, self.config.threads_per_worker, self.config.pinning
        )
        engine_kwargs = engine_settings(self.config)
        # Unset: on, unless this CPU's verdict (probed now where none is cached) says trap.
        engine_kwargs["extra_buffers"] = resolve_extra_buffers(self.config.extra_buffers)
        self._extra_buffers = engine_kwargs["extra_buffers"]
        devices = self.placement(self.config, self.topology)
        self._pool = WorkerPool.start(
            [
                (
                    rank,
                    str(path),
                    engine_kwargs,
                    pins[rank] if pins else None,
                    # A worker sees only its GPUs (seed 003); on a GPU host a CPU worker
                    # sees none, so a CUDA build puts nothing of it on a GPU.
                    devices[rank].visible if self.topology.gpus else None,
                )
                for rank in range(self.config.workers)
            ]
        )
        ready = {}
        for kind, rank, payload in self._pool.messages(expect=self.config.workers):
            if kind != "ready":
                raise BackendError(f"llamacpp worker {rank}: unexpected message {kind!r}")
            ready[rank] = payload
        self._pids = [ready[rank][0] for rank in range(self.config.workers)]
        self.load_times_s = [ready[rank][1] for rank in range(self.config.workers)]

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, rank order (empty before load)."""
        return self._pids

    def details(self) -> dict:
        """Whether the weights went into llama.cpp's extra buffer types (the config may leave
        it to this machine's verdict)."""
        return {"extra_buffers": self._extra_buffers}

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[Completion]:
        return self.generate_pass(prompts, settings, None)

    def generate_pass(
        self, prompts: Sequence[Prompt], settings: GenerationSettings, cut_after: int | None
    ) -> list[Completion]:
        """The prompts through the workers' shared queue; with ``cut_after``, the round is cut
        (`WorkerPool.cut`) as soon as that many have finished."""
        if self._pool is None:
            raise BackendError("llamacpp backend: generate() before load()")
        round_settings = {
            "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "seed": settings.seed,
            "chat_template": settings.chat_template,
            "ignore_eos": settings.ignore_eos,
        }
        self._pool.submit(round_settings, [prompt.text for prompt in prompts])
        results: list[Completion | None] = [None] * len(prompts)
        finished = 0
        for kind, rank, payload in self._pool.messages(expect=self._pool.size):
            if kind != "result":
                continue
            r = payload
            finished += not r.cut
            if cut_after is not None and finished == cut_after:
                self._pool.cut()
            results[r.index] = Completion(
                id=prompts[r.index].id,
                text=r.text,
                token_ids=tuple(r.token_ids),
                prompt_tokens=r.prompt_tokens,
                worker_rank=rank,
                latency_s=r.end_s - r.start_s,
                ttft_s=None if r.first_token_s is None else r.first_token_s - r.start_s,
                error=r.error,
                prefill_tokens=r.prefill_tokens,
                finished_at=r.end_s,
                cut=r.cut,
            )
        missing = [prompts[i].id for i, c in enumerate(results) if c is None]
        if missing:
            raise BackendError(
                f"llamacpp: no result for {len(missing)} prompts ({missing[:3]} ...)"
            )
        return results  # type: ignore[return-value]

    def score(
        self, requests: Sequence[ScoreRequest], settings: GenerationSettings, k: int
    ) -> list[TokenScores]:
        """Teacher forcing, the requests dealt round-robin to the workers (each holds the
        same weights and threads, and they run side by side as in a pass): each prompt and
        answer in one prompt-processing pass (`LlamaEngine.score`)."""
        if self._pool is None:
            raise BackendError("llamacpp backend: score() before load()")
        ranks = range(min(self._pool.size, len(requests)))
        for rank in ranks:
            payload = [
                (r.text, list(r.answer), None if r.ids is None else [list(x) for x in r.ids], k)
                for r in requests[rank :: self._pool.size]
            ]
            self._pool.ask(rank, ("score", payload, {"chat_template": settings.chat_template}))
        found: dict[int, list] = {}
        for kind, rank, scored in self._pool.messages(expect=len(ranks)):
            if kind == "scores":
                found[rank] = scored
        size = self._pool.size
        return [
            TokenScores.of(request.id, found[index % size][index // size])
            for index, request in enumerate(requests)
        ]

    def close(self) -> None:
        """Ask every worker to exit, then make sure. Safe to call twice."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _weight_bytes(config, shape) -> float:
    """The weights a worker reads: the file's, or the --quant variant's at its bits per weight
    (before the variant exists)."""
    if config.quant:
        return shape.parameters * QUANT_BITS[config.quant] / 8
    return float(shape.file_bytes)


def engine_settings(config) -> dict:
    """What each worker's `LlamaEngine` is built with."""
    return {
        "threads": config.threads_per_worker,
        "prefill_threads": config.prefill_threads or config.threads_per_worker,
        "batch_size": config.batch_size,
        "ctx_per_sequence": config.ctx_per_sequence,
        "n_batch": config.n_batch,
        "workers": config.workers,
        "gpu_layers": config.gpu_layers,
        "extra_buffers": config.extra_buffers,
    }
