"""The interface every backend implements, and the record of one generated request.

A backend is a class that says everything about itself: what it runs (`load`, `generate`,
`close`) and, as class methods that need no model loaded, what it tunes on a machine
(`space`), which config fields it reads, the devices its processes use, the memory a layout
needs, the layout a user gets without tuning (`naive`) and the seeds' hand-made recipes. The
search, the memory planner, the report, the console and the export all ask these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from autotune.config import TrialConfig, env_name, field_default
from autotune.errors import BackendError, ConfigError
from autotune.knobs import BackendSpace, Knob, Target
from autotune.models import ModelSpec
from autotune.pinning import cpu_sets
from autotune.placement import Device, check_placement, default_placement
from autotune.topology import Topology
from autotune.workload import GenerationSettings, Prompt

if TYPE_CHECKING:
    from autotune.models import ModelShape

__all__ = [
    "COMMON_FIELDS",
    "CUDA_CONTEXT_BYTES",
    "GPU_THREADS",
    "Backend",
    "Completion",
    "ScoreRequest",
    "SpeedTerms",
    "TokenScores",
    "gpu_threads",
    "threads_knob",
]

# What every backend reads: the model, the generation settings, threads and batch.
COMMON_FIELDS = frozenset(
    {
        "backend",
        "model",
        "threads_per_worker",
        "batch_size",
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "chat_template",
        "ignore_eos",
    }
)

# The fields `Backend.describe` shows, in order, where not at their default: how each reads
# (a format string, or a function of the value).
_LABELS: dict[str, str | Callable[[Any], str]] = {
    "quant": "{}",
    "dtype": "{}",
    "boundaries": "{}",
    "pinning": "pin:{}",
    "gpu_layers": "ngl:{}",
    "placement": "on:{}",
    "prefill_threads": "prefill:{}",
    "kv_cache": "kv:{}",
    "fault": "fault:{}",
    "extra_buffers": lambda on: "xbuf:" + ("on" if on else "off"),
}


@dataclass(frozen=True)
class SpeedTerms:
    """What `autotune.simulate` models of one layout, as its backend declares it
    (`Backend.speed_terms`): the bytes of weights a process reads per decode step; the
    relative cost of its arithmetic on a CPU (1.0: llama.cpp's q8_0 kernels); the kernel
    launch gap per layer and step on a GPU; whether it computes in fp32 there (no tensor
    cores); each stage's share of the layers where it runs a pipeline (None: data parallel);
    the share of the layers on the GPU where only some are offloaded (None: all, or none)."""

    weight_bytes: float
    cpu_cost: float
    gpu_launch_s: float = 0.001
    fp32_on_gpu: bool = False
    stage_shares: tuple[float, ...] | None = None
    gpu_share: float | None = None


# A CUDA context, cuBLAS workspace and the caching allocator's slack, per process and GPU.
CUDA_CONTEXT_BYTES = 600 * 2**20

# Threads of a process that computes on a GPU: it tokenizes, launches kernels and samples;
# more do not make the GPU faster, so the space does not search them there.
GPU_THREADS = 4


def gpu_threads(cpus: int, processes: int) -> int:
    """The fixed threads per process of a layout that computes on GPUs."""
    return max(1, min(GPU_THREADS, cpus // processes))


def threads_knob(
    cpus: int, processes: str | None, on_gpu: Callable[[dict], bool] | None = None
) -> Knob:
    """Threads per process, 1 .. the usable CPUs, so that processes x threads fit them;
    ``processes`` names the knob chosen before that counts processes (None: one process).
    Where ``on_gpu(chosen)`` says the layout computes on GPUs, one value only (`gpu_threads`)."""

    def count(chosen: dict) -> int:
        return 1 if processes is None else chosen[processes]

    def fits(chosen: dict, threads: int) -> bool:
        if on_gpu is not None and on_gpu(chosen):
            return threads == gpu_threads(cpus, count(chosen))
        return count(chosen) * threads <= cpus

    notes = []
    if processes is not None:
        notes.append(f"{processes} x threads_per_worker <= {cpus} usable CPUs")
    if on_gpu is not None:
        notes.append(f"on a GPU: min({GPU_THREADS}, CPUs / processes), not searched")
    if not notes:
        return Knob("threads_per_worker", tuple(range(1, cpus + 1)))
    return Knob("threads_per_worker", tuple(range(1, cpus + 1)), allow=fits, note="; ".join(notes))


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One request's result. Times are seconds; ``ttft_s`` is None where a backend cannot see
    the first token. ``token_ids`` are the generated tokens, end-of-sequence left out (unless
    the settings ignore it)."""

    id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    worker_rank: int
    latency_s: float
    ttft_s: float | None = None
    error: str | None = None
    # Prompt tokens this request really computed; fewer than prompt_tokens where a cache
    # served part of the prompt (llama.cpp's slots keep the template's shared prefix).
    prefill_tokens: int | None = None
    # When it finished, on time.monotonic()'s clock (one clock for every process of a node),
    # so a measurement can tell the steady state from the ramp-up and the tail.
    finished_at: float | None = None
    # Stopped before its end because its pass's last window had closed (`Backend.generate_pass`):
    # its tokens so far count in the windows they fell in; it has no latency and no answer.
    cut: bool = False

    @property
    def answered(self) -> bool:
        """Whether it has a whole answer: no error, and not cut."""
        return self.error is None and not self.cut

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        data = asdict(self)
        data["token_ids"] = list(self.token_ids)
        return data


@dataclass(frozen=True, kw_only=True)
class ScoreRequest:
    """A prompt and an answer to score by teacher forcing (`Backend.score`): the model reads
    ``text`` (as `generate` formats it) and then ``answer``'s tokens, whatever it would have
    generated, and reports its next-token distribution at each answer position. ``ids``: per
    answer position, the tokens whose log-probabilities are wanted (a reference's top-k)."""

    id: str
    text: str
    answer: tuple[int, ...]
    ids: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True, kw_only=True)
class TokenScores:
    """A scored answer: per answer position, the model's own top-k tokens and their
    log-probabilities (most likely first), and the log-probabilities of the tokens asked for
    (`ScoreRequest.ids`; None where none were)."""

    id: str
    top_ids: tuple[tuple[int, ...], ...]
    top_logprobs: tuple[tuple[float, ...], ...]
    logprobs: tuple[tuple[float, ...], ...] | None = None

    @classmethod
    def of(cls, id: str, scored: tuple) -> TokenScores:
        """From an engine's ``(top ids, their log-probabilities, asked log-probabilities or
        None)``, one row per position (as `top_k_scores` gives them, gathered)."""
        top_ids, top_logprobs, asked = scored
        return cls(
            id=id,
            top_ids=tuple(tuple(row) for row in top_ids),
            top_logprobs=tuple(tuple(row) for row in top_logprobs),
            logprobs=None if asked is None else tuple(tuple(row) for row in asked),
        )

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "id": self.id,
            "top_ids": [list(row) for row in self.top_ids],
            "top_logprobs": [list(row) for row in self.top_logprobs],
            "logprobs": None if self.logprobs is None else [list(r) for r in self.logprobs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> TokenScores:
        """Inverse of `to_dict`."""
        logprobs = data.get("logprobs")
        return cls(
            id=data["id"],
            top_ids=tuple(tuple(row) for row in data["top_ids"]),
            top_logprobs=tuple(tuple(row) for row in data["top_logprobs"]),
            logprobs=None if logprobs is None else tuple(tuple(row) for row in logprobs),
        )


def top_k_scores(logits, k: int, ids: Sequence[int] | None) -> tuple[tuple, tuple, tuple | None]:
    """One position's (top-k ids, their log-probabilities, the log-probabilities of ``ids``)
    from its raw ``logits`` (a 1-D numpy array): a log-softmax in float64."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    shifted = row - row.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = np.argpartition(-logprobs, k - 1)[:k] if k < len(row) else np.arange(len(row))
    top = top[np.argsort(-logprobs[top], kind="stable")]
    asked = None if ids is None else tuple(float(logprobs[i]) for i in ids)
    return tuple(int(i) for i in top), tuple(float(logprobs[i]) for i in top), asked


class Backend(ABC):
    """Loads a model once, generates whole workloads, and closes.

    Lifecycle, in this order: the constructor (cheap, no side effects), `load` once, `generate`
    any number of times, `close` (idempotent; always ends every child process). As a context
    manager it loads on enter and closes on exit.
    """

    name: ClassVar[str]
    # TrialConfig fields this backend reads beyond COMMON_FIELDS.
    reads: ClassVar[frozenset[str]] = frozenset()
    # What a sweep expects of a trial before any was measured: load seconds and generated
    # tokens/s (its cost grows with the tokens the layout's passes generate).
    first_guess_load_s: ClassVar[float] = 10.0
    first_guess_tokens_per_s: ClassVar[float] = 25.0
    # Whether a slot that frees is refilled at once (continuous batching), so a measured pass
    # has a ramp-up and a tail to leave out; False for static batches (`autotune.measure`).
    continuous_batching: ClassVar[bool] = True
    # Whether `generate_pass` stops the requests still running once its pass's last window has
    # closed, rather than running its tail to the end.
    cuts_tail: ClassVar[bool] = False
    # TrialConfig fields its `score` does not read: layouts that differ only in these score
    # alike, so a sweep scores one of them and the others carry its figures (`scoring_key`).
    unscored: ClassVar[frozenset[str]] = frozenset()
    # Layouts of one answer family compute with the same weights and library, so one batch-1
    # greedy run is the reference for all their answers (`autotune.agreement`).
    answer_family: ClassVar[str]
    # Where several backends are searched, the naive baseline is the `naive` layout of the
    # one with the lowest rank (`baseline_priority`): the tool a user would reach for without
    # tuning.
    baseline_rank: ClassVar[int] = 10
    # Resident memory of one process before the model (interpreter, libraries): a first
    # guess, which the memory planner corrects with each trial's measured peak.
    process_overhead_bytes: ClassVar[int] = 380 * 2**20

    # ------------------------------------------------------------ declarations

    @classmethod
    def fields_read(cls) -> frozenset[str]:
        """Every TrialConfig field this backend reads."""
        return COMMON_FIELDS | cls.reads

    @classmethod
    def check_fields(cls, config: TrialConfig) -> None:
        """ConfigError for a field this backend does not read that is not at its default."""
        for name in sorted(set(TrialConfig.__dataclass_fields__) - cls.fields_read()):
            value = getattr(config, name)
            if value != field_default(name):
                variable = env_name(name) or "PARALLEL_WORKERS"
                raise ConfigError(
                    f"{name} ({variable}) is not a setting of the {cls.name} backend, got "
                    f"{value!r}; it reads {', '.join(sorted(cls.reads)) or 'no others'}"
                )

    @classmethod
    def space(cls, target: Target) -> BackendSpace:
        """The knobs this backend tunes on ``target``, or why it is left out there."""
        return BackendSpace(cls.name, excluded="not searched (a backend for tests)")

    @classmethod
    def config_changes(cls, chosen: dict, target: Target) -> dict:
        """TrialConfig fields for knob values ``chosen`` from `space` (by default the knob
        names are the fields)."""
        return dict(chosen)

    @classmethod
    def knob_values(cls, config: TrialConfig, target: Target) -> dict:
        """The inverse of `config_changes`: the knob values that give ``config`` (a name
        missing from the result means ``config`` is no point of the space)."""
        return config.to_dict()

    @classmethod
    def baseline_priority(cls, target: Target) -> int:
        """This backend's `baseline_rank` on ``target`` (lowest: the naive baseline)."""
        return cls.baseline_rank

    @classmethod
    def naive(cls, target: Target) -> dict:
        """The layout a user gets from this backend without tuning, as TrialConfig fields."""
        return {"threads_per_worker": target.cpus, "batch_size": 1}

    @classmethod
    def recipes(cls, target: Target) -> list[tuple[str, dict]]:
        """The seeds' hand-made layouts for this backend on ``target``: (name, fields)."""
        return []

    @classmethod
    def placement(cls, config: TrialConfig, topology: Topology) -> tuple[Device, ...]:
        """The device of each of the layout's processes (`autotune.placement`): the config's
        ``placement``, else `default_devices`; the CPU for a backend that does not read it.
        ConfigError for a placement the machine cannot give."""
        gpus = len(topology.gpus)
        if "placement" not in cls.fields_read():
            return (Device(),) * config.processes
        if config.placement is not None:
            return check_placement(config.placement, config.processes, gpus)
        return cls.default_devices(config, gpus)

    @classmethod
    def default_devices(cls, config: TrialConfig, gpus: int) -> tuple[Device, ...]:
        """Where the processes go when the config does not say: seed 003's split of the GPUs
        (`autotune.placement.default_placement`), the CPU where there is none."""
        return default_placement(gpus, config.processes)

    @classmethod
    def devices(cls, config: TrialConfig, topology: Topology) -> list[str]:
        """The device each of the layout's processes computes on (``cpu``, ``cuda:0``,
        ``cuda:0+1``)."""
        return [str(device) for device in cls.placement(config, topology)]

    @classmethod
    def predict_memory_bytes(cls, config: TrialConfig, shape: ModelShape) -> float:
        """Peak bytes of the layout's processes (weights, KV cache, runtime), before any
        correction by measurement."""
        return config.processes * cls.process_overhead_bytes

    @classmethod
    def predict_gpu_bytes(cls, config: TrialConfig, shape: ModelShape, devices) -> dict:
        """Peak bytes per GPU index of the layout's processes on ``devices`` (`placement`),
        before any correction: each process's `gpu_process_bytes` spread over its GPUs, and
        a CUDA context on each."""
        data = cls.gpu_process_bytes(config, shape)
        per_gpu: dict[int, float] = {}
        for device in devices:
            for gpu in device.gpus:
                per_gpu[gpu] = per_gpu.get(gpu, 0.0) + data / len(device.gpus) + CUDA_CONTEXT_BYTES
        return per_gpu

    @classmethod
    def speed_terms(cls, config: TrialConfig, shape: ModelShape) -> SpeedTerms:
        """What `autotune.simulate`'s speed model needs of a layout of this backend, so the
        simulator names no backend; a backend without them cannot be simulated."""
        raise NotImplementedError(f"backend {cls.name} declares no speed terms")

    @classmethod
    def gpu_process_bytes(cls, config: TrialConfig, shape: ModelShape) -> float:
        """Bytes one process computing on GPUs keeps there (weights, KV cache); none by
        default."""
        return 0.0

    @classmethod
    def describe(cls, config: dict) -> str:
        """A layout in a few words: ``llamacpp 2x1 b4 q4_0 pin:spread``. Shows the fields this
        backend reads that are not at their defaults."""
        processes = config.get("workers", 1) * config.get("stages", 1)
        text = f"{cls.name} {processes}x{config['threads_per_worker']} b{config['batch_size']}"
        for name, label in _LABELS.items():
            value = config.get(name, field_default(name))
            if name in cls.reads and value != field_default(name):
                text += " " + (label.format(value) if isinstance(label, str) else label(value))
        return text

    # ------------------------------------------------------------ instances

    def __init__(self, config: TrialConfig, model: ModelSpec, topology: Topology) -> None:
        self.config = config
        self.model = model
        self.topology = topology

    @property
    def pids(self) -> list[int]:
        """The pids of the processes the backend started (workers, ranks), once loaded; empty
        for a backend that computes in the caller's process."""
        return []

    @classmethod
    def validate(cls, config: TrialConfig, topology: Topology) -> None:
        """Raise ConfigError if this backend cannot run ``config`` on this machine.

        Called before the backend is built. The default checks the fields it reads, that a
        pinning policy has the CPUs it needs and that the placement's GPUs exist, then asks
        `check_devices`.
        """
        cls.check_fields(config)
        cpu_sets(topology, config.processes, config.threads_per_worker, config.pinning)
        cls.check_devices(config, cls.placement(config, topology), topology)

    @classmethod
    def check_devices(cls, config: TrialConfig, devices, topology: Topology) -> None:
        """Raise ConfigError where this backend cannot run on ``devices`` (its `placement`);
        any placement by default."""
        return

    @classmethod
    def validate_model(cls, config: TrialConfig, model: ModelSpec, topology: Topology) -> None:
        """Raise ConfigError if ``config`` cannot run on ``model`` (e.g. a layer split that
        does not fit its layers); called after `validate`, before anything starts."""
        return  # most backends need no check that depends on the model

    @abstractmethod
    def load(self) -> None:
        """Load the model (in every worker); called once, before any `generate`."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[Completion]:
        """Generate for every prompt; results in input order, one per prompt."""

    def generate_pass(
        self, prompts: Sequence[Prompt], settings: GenerationSettings, cut_after: int | None
    ) -> list[Completion]:
        """`generate` for a timed pass: where ``cut_after`` is given and the backend can stop
        requests it is running (`cuts_tail`), the requests still running once ``cut_after``
        have finished are stopped and come back ``cut`` (the pass's last window closed there:
        the tail after it is measured by nothing). By default the pass runs to its end."""
        return self.generate(prompts, settings)

    def score(
        self, requests: Sequence[ScoreRequest], settings: GenerationSettings, k: int
    ) -> list[TokenScores]:
        """Score each request's answer by teacher forcing with this layout (its weights, its
        batch), one `TokenScores` each with the top ``k`` tokens of every position; results in
        input order. A backend that cannot says so (BackendError): its quality is not
        measured, never guessed."""
        raise BackendError(f"{self.name} does not score answers (teacher forcing)")

    def details(self) -> dict:
        """What this backend chose or saw that the config does not say (JSON-ready); e.g. the
        pipeline's layer split. Empty by default."""
        return {}

    def close(self) -> None:  # noqa: B027 - a backend without children has nothing to close
        """Release the model and end every child process; safe to call twice."""

    def __enter__(self) -> Backend:
        self.load()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
