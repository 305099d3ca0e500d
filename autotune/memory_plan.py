"""Predict a trial's peak memory before it starts, and learn from the ones that ran.

Each backend predicts its layout's bytes (`Backend.predict_memory_bytes`): the weights (a GGUF
is mmapped, so N llama.cpp workers share its pages and it counts once; every torch process
holds its own copy of what it loads), the KV cache for batch x context, and a runtime overhead
per process. The planner adds the trial's own process. After each
trial the measured peak (PSS of the whole tree) corrects the backend's factor, so a model that
guessed low does not guess low twice. A config predicted above the limit is not run.

On a GPU host the same holds per GPU (`Backend.predict_gpu_bytes`: weights at the dtype, KV
cache for batch x context, a CUDA context per process), against 90% of each GPU's memory,
corrected by the peak the tree held there (nvidia-smi, `autotune.gpu_usage`).
"""

from __future__ import annotations

from autotune.config import TrialConfig
from autotune.models import ModelShape
from autotune.topology import Topology
from backends import backend_class

__all__ = ["MemoryPlanner", "memory_limit"]

_HARNESS = 60 * 2**20  # the trial process itself
# The share of the available memory the layouts of a search may use, where --memory-limit
# does not say: the rest is the machine's other work and the planner's error.
_DEFAULT_SHARE = 0.8
_GPU_USABLE = 0.9  # of a GPU's memory: the driver and fragmentation keep the rest


def memory_limit(topology, given: int | None = None) -> int:
    """What a layout may use on ``topology``: ``given`` (--memory-limit), else
    `_DEFAULT_SHARE` of the available memory."""
    return given or int(topology.memory_available_bytes * _DEFAULT_SHARE)


class MemoryPlanner:
    """Predicted peak bytes per config, corrected by what trials measured."""

    def __init__(
        self, shape: ModelShape, limit_bytes: int, topology: Topology | None = None
    ) -> None:
        self.shape = shape
        self.limit_bytes = limit_bytes
        self.topology = topology
        self.gpu_bytes = {g.index: g.memory_bytes for g in topology.gpus} if topology else {}
        self.factors: dict[str, float] = {}  # backend -> measured / predicted, worst seen
        self.gpu_factors: dict[str, float] = {}  # the same for GPU memory

    def _raw(self, config: TrialConfig) -> tuple[float, dict[int, float]]:
        """Uncorrected (host bytes, bytes per GPU index) of ``config``'s process tree."""
        cls = backend_class(config.backend)
        host = _HARNESS + cls.predict_memory_bytes(config, self.shape)
        if not self.gpu_bytes:
            return host, {}
        devices = cls.placement(config, self.topology)
        on_gpu = sum(1 for device in devices if device.is_gpu)
        # What a process keeps on its GPU is not in host memory; never under the processes
        # themselves (llama.cpp counts its mmapped weights once on the host, but each
        # offloading worker holds its own copy on its GPU).
        host = max(
            host - on_gpu * cls.gpu_process_bytes(config, self.shape),
            _HARNESS + config.processes * cls.process_overhead_bytes,
        )
        return host, cls.predict_gpu_bytes(config, self.shape, devices)

    def _corrected(self, config: TrialConfig) -> tuple[int, dict[int, int]]:
        host, gpus = self._raw(config)
        factor = self.gpu_factors.get(config.backend, 1.0)
        return (
            int(host * self.factors.get(config.backend, 1.0)),
            {gpu: int(used * factor) for gpu, used in sorted(gpus.items())},
        )

    def predict(self, config: TrialConfig) -> int:
        """Predicted peak bytes of the trial's process tree in host memory."""
        return self._corrected(config)[0]

    def predict_gpus(self, config: TrialConfig) -> dict[int, int]:
        """Predicted peak bytes per GPU index the layout uses (empty on a CPU host)."""
        return self._corrected(config)[1]

    def refusal(self, config: TrialConfig) -> str | None:
        """Why ``config`` must not run (predicted over the limit, or over a GPU's memory), or
        None."""
        predicted, gpus = self._corrected(config)
        if predicted > self.limit_bytes:
            return (
                f"predicted peak memory {predicted / 2**30:.2f} GiB is over the limit of "
                f"{self.limit_bytes / 2**30:.2f} GiB"
            )
        for gpu, used in gpus.items():
            room = _GPU_USABLE * self.gpu_bytes.get(gpu, 0)
            if used > room:
                return (
                    f"predicted {used / 2**30:.2f} GiB on GPU {gpu} is over its "
                    f"{room / 2**30:.2f} GiB ({_GPU_USABLE:.0%} of its memory)"
                )
        return None

    def observe(self, config: TrialConfig, measured_bytes: int) -> None:
        """Correct the backend's factor with a trial's measured peak (never below 1)."""
        ratio = measured_bytes / max(1.0, self._raw(config)[0])
        self.factors[config.backend] = max(self.factors.get(config.backend, 1.0), ratio)

    def observe_gpus(self, config: TrialConfig, measured: dict) -> None:
        """Correct the backend's GPU factor with a trial's peak per GPU (``{"0": bytes}``):
        the worst GPU's measured / predicted, never below 1."""
        predicted = self._raw(config)[1]
        for gpu, used in measured.items():
            if predicted.get(int(gpu)):
                ratio = used / predicted[int(gpu)]
                self.gpu_factors[config.backend] = max(
                    self.gpu_factors.get(config.backend, 1.0), ratio
                )
