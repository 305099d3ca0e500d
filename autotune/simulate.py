"""Simulated machines: a speed model of LLM inference on a machine you may not have.

`MachineModel` turns a layout (`TrialConfig`) into tokens/s on a machine described by its
``autotune detect --json`` (`autotune.topology.load_machine`), for a model of a given shape.
`autotune sweep --machine F` runs every trial on it (`backends.fake.SimulatedTrials`, a fake
clock), so a 30-minute sweep of a 32-thread server or an 8-GPU node takes seconds, and
``experiments/bench_search.py`` compares the search with the exhaustive grid on it.

The model is rough on purpose, and what it says is stated here, so nobody reads its figures
as measurements:

- **CPU compute.** A process computes each generated token's ``2 x parameters`` flops (times
  a weight type's dequantisation cost, plus the prompt's share) at `CORE_GFLOPS` per busy
  physical core. A core's SMT sibling adds `SMT_GAIN` (10-30% on real servers), not a core.
  Threads inside one process wait for each other at every layer (`THREAD_SYNC` per thread),
  so processes scale better than threads; more threads than CPUs spin and lose a lot;
  unpinned processes migrate a little; ``compact`` pinning puts a process's threads on SMT
  siblings before it uses another core.
- **Memory bandwidth.** Each decode step of a process reads its weights once for the whole
  batch, plus the batch's KV cache. All processes share the machine's bandwidth (the JSON's
  measured ``memory_bandwidth_gb_s`` from ``detect --roofline``, else `GUESSED_GB_S_PER_CORE`
  per physical core, capped per NUMA node); one thread cannot pull more than
  `THREAD_GB_S`. Unpinned processes on a NUMA machine read part of their memory remotely.
- **Batch.** A step costs max(memory, compute) plus a fixed overhead, so batching helps
  while the step is memory- or overhead-bound and flattens once it is compute-bound.
- **GPUs.** A process on a GPU pays a kernel-launch cost per layer and step (`GPU_LAUNCH_S`:
  eager transformers is launch-bound on small models, 2 080-2 840 tokens/s at batch 48 for a
  1 B model on the lent H100), then max(weights and KV over the GPU's bandwidth, flops over
  its compute). Processes sharing a GPU overlap their launch gaps but split its bandwidth and
  compute. A pipeline runs at its slowest stage; llama.cpp with some layers offloaded pays
  the CPU layers' time and the GPU layers' time in turn.
- **Noise.** One measurement is the modelled figure times a log-normal draw (`NOISE`), and
  now and then (`SLOW_PASS`) a pass 25% slow, as a neighbour's burst makes one on a real box.

Calibration: on the development VM's 2 vCPUs the embedded model measured 36 tokens/s at 1
worker x 1 thread, 63 at 1 x 2 or 2 x 1, 68-72 at 1 x 2 batch 16 (README); the model gives
figures of that order there. Elsewhere it is a model, not a measurement.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from autotune.config import TrialConfig
from autotune.memory_plan import ModelShape
from autotune.topology import Topology

__all__ = ["MachineModel"]

CORE_GFLOPS = 16.0  # one physical core, llama.cpp's quantised matrix-vector kernels
SMT_GAIN = 0.2  # what a busy core's second hardware thread adds
THREAD_SYNC = 0.12  # per extra thread in one process: the barrier after every layer
THREAD_GB_S = 12.0  # what one thread can stream from memory
GUESSED_GB_S_PER_CORE = 8.0  # host bandwidth where the machine file measured none
GUESSED_GB_S_PER_NODE = 120.0
STEP_OVERHEAD_S = 0.0004  # per decode step of a CPU process (sampling, scheduling)
PREFILL_SHARE = 0.3  # the prompt's flops, per generated token of the default workload
CONTEXT_TOKENS = 160  # KV cache a sequence holds on average (prompt and answer)
NOISE = 0.05
SLOW_PASS = 0.04

# Bits per weight and the dequantisation cost of each GGUF weight type (None: the file's own).
_QUANT_BITS = {"f16": 16.0, "q8_0": 8.5, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_1": 5.0, "q4_0": 4.5}
_QUANT_COST = {"f16": 1.6, "q8_0": 1.0, "q5_k_m": 1.35, "q4_k_m": 1.25, "q4_1": 1.1, "q4_0": 1.05}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Torch on a CPU runs eager kernels in fp32/bf16: measured on 2 vCPUs at 0.2-0.7x llama.cpp.
_TORCH_CPU = 0.35

GPU_LAUNCH_S = {"llamacpp": 0.00008, "hf": 0.0011, "ddp": 0.0011, "pipeline": 0.0012}
GPU_SEQUENCE_S = 0.00002  # per sequence and step: sampling and bookkeeping on the host
_GPU_SHARE_LOSS = 0.1  # per extra process on a GPU: context switches
_LINK_S = 0.002  # a pipeline boundary through host memory, per step
# Memory bandwidth (GB/s) and dense bf16 TFLOP/s actually reached, by the GPU's name.
_GPUS = {"H200": (4800.0, 400.0), "H100": (3350.0, 300.0), "A100": (2000.0, 150.0)}
_OTHER_GPU = (900.0, 60.0)


@dataclass(frozen=True)
class MachineModel:
    """The speed model of one machine (`topology`) running one model (`shape`)."""

    topology: Topology
    shape: ModelShape
    bandwidth_gb_s: float  # host memory, every NUMA node together
    core_gflops: float = CORE_GFLOPS

    @classmethod
    def of(cls, topology: Topology, shape: ModelShape, data: dict | None = None) -> MachineModel:
        """The model of ``topology``; ``data`` is the machine file's JSON, whose measured
        ``memory_bandwidth_gb_s`` (``detect --roofline``) is used where present."""
        measured = (data or {}).get("memory_bandwidth_gb_s")
        if measured:
            bandwidth = float(measured)
        else:
            nodes = max(1, len(topology.numa_nodes))
            bandwidth = min(
                GUESSED_GB_S_PER_CORE * topology.usable_cores, GUESSED_GB_S_PER_NODE * nodes
            )
        return cls(topology, shape, bandwidth)

    @classmethod
    def load(cls, path: str, shape: ModelShape) -> MachineModel:
        """The model of the machine in ``path`` (`autotune.topology.load_machine`)."""
        from autotune.topology import machine_file

        topology, data = machine_file(path)
        return cls.of(topology, shape, data)

    def simulation(self, seed: int | None = None) -> dict:
        """What a `autotune.sweep.Sweep` takes to run on this model instead of measuring:
        its ``clock`` (simulated) and ``runner`` (`backends.fake.SimulatedTrials`)."""
        from backends.fake import FakeClock, SimulatedTrials

        clock = FakeClock()
        return {"clock": clock, "runner": SimulatedTrials(clock, self.topology, self, seed)}

    # ------------------------------------------------------------ the figures

    def tokens_per_s(self, config: TrialConfig) -> float:
        """Generated tokens/s of ``config`` in the steady state, without noise."""
        from backends import backend_class

        devices = backend_class(config.backend).placement(config, self.topology)
        if any(device.is_gpu for device in devices):
            return self._gpu_rate(config, devices)
        return self._cpu_rate(config)

    def measured(self, config: TrialConfig, rng: random.Random) -> float:
        """One measurement of ``config``: the modelled figure with a real machine's noise."""
        figure = self.tokens_per_s(config) * math.exp(rng.gauss(0.0, NOISE))
        return figure * 0.75 if rng.random() < SLOW_PASS else figure

    def load_s(self, config: TrialConfig) -> float:
        """Seconds to start the layout's processes and read the weights (in parallel)."""
        return 0.5 + self._weight_bytes(config) / 2e9

    # ------------------------------------------------------------ CPU

    def _weight_bytes(self, config: TrialConfig) -> float:
        if config.backend in ("llamacpp", "fake"):
            if config.quant in _QUANT_BITS:
                return self.shape.parameters * _QUANT_BITS[config.quant] / 8
            return float(self.shape.file_bytes)
        return self.shape.parameters * _DTYPE_BYTES.get(config.dtype, 4)

    def _flops_per_token(self, config: TrialConfig) -> float:
        # No --quant: the file's own type (an unknown one costs what q4_1 does).
        cost = (
            _QUANT_COST.get(config.quant or self.shape.weight_type, 1.1)
            if config.backend in ("llamacpp", "fake")
            else 1.0 / _TORCH_CPU
        )
        return 2.0 * self.shape.parameters * cost * (1 + PREFILL_SHARE)

    def _stage_shares(self, config: TrialConfig) -> list[float]:
        """The share of the layers each pipeline stage holds: its boundaries where given,
        else a uniform split."""
        from backends.partition import parse_boundaries, uniform

        layers = self.shape.layers
        if config.partition == "custom" and config.boundaries:
            ranges = parse_boundaries(config.boundaries, layers, config.stages)
        else:
            ranges = uniform(layers, config.stages)
        return [len(r) / layers for r in ranges]

    def _kv_bytes(self, batch: int) -> float:
        return batch * CONTEXT_TOKENS * self.shape.kv_bytes_per_token(2)

    def _cpu_rate(self, config: TrialConfig) -> float:
        """Processes x threads on the host's cores, sharing its memory bandwidth. A pipeline's
        stages each run 1/stages of the layers, one after the other per token (micro-batches
        overlap them): its figure is its slowest stage's."""
        if config.backend == "pipeline":
            shares = self._stage_shares(config)
            step = max(self._cpu_step_s(config, len(shares), share) for share in shares)
            return config.batch_size / (step + _LINK_S / 4)
        step = self._cpu_step_s(config, config.workers, 1.0)
        return config.workers * config.batch_size / step

    def _cpu_step_s(self, config: TrialConfig, processes: int, share: float) -> float:
        """Seconds per decode step of one of ``processes`` CPU processes of ``config``, each
        computing ``share`` of the layers for its batch."""
        topo = self.topology
        threads, batch = config.threads_per_worker, config.batch_size
        total = processes * threads
        cpus, cores = topo.usable_cpus, max(1, topo.usable_cores)
        per_core = max(1, topo.threads_per_core)
        if config.pinning == "compact" and per_core > 1 and total <= cores:
            busy = math.ceil(total / per_core)  # siblings first: fewer cores
            siblings = total - busy
        else:
            busy = min(total, cores)
            siblings = max(0, min(total, cpus) - cores)
        units = busy + SMT_GAIN * siblings
        if total > cpus:  # spinning threads wait for descheduled ones
            units *= (cpus / total) ** 1.5
        sync = 1.0 / (1.0 + THREAD_SYNC * (threads - 1))
        migrate = 0.93 if config.pinning == "none" and processes > 1 else 1.0
        compute = units / processes * sync * migrate * self.core_gflops * 1e9
        nodes = max(1, len(topo.numa_nodes))
        remote = 1 - 1 / nodes
        local = 1.0 if config.pinning != "none" or nodes == 1 else 1 - 0.4 * remote
        bandwidth = min(threads * THREAD_GB_S, self.bandwidth_gb_s * local / processes) * 1e9
        memory_s = (self._weight_bytes(config) + self._kv_bytes(batch)) * share / bandwidth
        compute_s = batch * self._flops_per_token(config) * share / compute
        step = max(memory_s, compute_s) + 0.15 * min(memory_s, compute_s)
        return step + STEP_OVERHEAD_S * (1 + 0.1 * threads)

    # ------------------------------------------------------------ GPU

    def _gpu_figures(self, gpu: int) -> tuple[float, float]:
        name = self.topology.gpus[gpu].name if gpu < len(self.topology.gpus) else ""
        return next((f for key, f in _GPUS.items() if key in name), _OTHER_GPU)

    def _gpu_step_s(self, config, device, sharers: int, layers_share: float) -> float:
        """One decode step of a process on ``device`` computing ``layers_share`` of the
        layers, its GPU shared by ``sharers`` processes."""
        bandwidth, tflops = self._gpu_figures(device.gpus[0])
        if config.dtype == "float32" and config.backend != "llamacpp":
            tflops /= 6  # no bf16 tensor cores
        batch = config.batch_size
        launch = GPU_LAUNCH_S.get(config.backend, 0.001) * self.shape.layers * layers_share
        weights = self._weight_bytes(config) * layers_share
        memory_s = (weights + self._kv_bytes(batch) * layers_share) / (bandwidth * 1e9)
        compute_s = batch * 2.0 * self.shape.parameters * layers_share / (tflops * 1e12)
        # Sharers overlap their launch gaps; bandwidth and compute are split between them.
        busy = max(memory_s, compute_s) * sharers * (1 + _GPU_SHARE_LOSS * (sharers - 1))
        return max(launch, busy) + 0.2 * min(launch, busy) + GPU_SEQUENCE_S * batch

    def _gpu_rate(self, config: TrialConfig, devices) -> float:
        users: dict[int, int] = {}
        for device in devices:
            for gpu in device.gpus:
                users[gpu] = users.get(gpu, 0) + 1

        def sharers(device) -> int:
            return max((users[g] for g in device.gpus), default=1)

        batch = config.batch_size
        if config.backend == "pipeline":
            steps = [
                self._gpu_step_s(config, d, sharers(d), share)
                if d.is_gpu
                else self._cpu_step_s(config, 1, share)
                for d, share in zip(devices, self._stage_shares(config), strict=True)
            ]
            return batch / (max(steps) + _LINK_S)
        if config.backend == "llamacpp" and config.gpu_layers != -1:
            offloaded = min(1.0, config.gpu_layers / max(1, self.shape.layers))
            total = 0.0
            for device in devices:
                step = self._gpu_step_s(config, device, sharers(device), offloaded)
                step += self._cpu_step_s(config, len(devices), 1 - offloaded)
                total += batch / step
            return total
        return sum(batch / self._gpu_step_s(config, d, sharers(d), 1.0) for d in devices)
