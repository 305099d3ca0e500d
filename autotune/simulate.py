"""Simulated machines: a speed model of LLM inference on a machine you may not have.

`MachineModel` turns a layout (`TrialConfig`) into tokens/s on a machine described by its
``autotune detect --json`` (`autotune.machine_file.load_machine`), for a model of a given shape.
`autotune sweep --machine F` runs every trial on it (`SimulatedTrials`, on a `FakeClock`), so a
30-minute sweep of a 32-thread server or an 8-GPU node takes seconds, and
``experiments/bench_search.py`` compares the search with the exhaustive grid on it. Without a
machine model, `SimulatedTrials` runs the fake backend's layouts: tests of the sweep's budget
and bookkeeping are exact and take no time.

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
- **What a layout is.** Each backend declares its layout's terms (`Backend.speed_terms`): the
  weights it reads, its arithmetic's cost on a CPU, its launch gap on a GPU, a pipeline's
  stage shares, llama.cpp's offloaded share; nothing here names a backend.
- **GPUs.** A process on a GPU pays a kernel-launch cost per layer and step (its speed terms':
  eager transformers is launch-bound on small models, 2 080-2 840 tokens/s at batch 48 for a
  1 B model on the lent H100), then max(weights and KV over the GPU's bandwidth, flops over
  its compute). Processes sharing a GPU overlap their launch gaps but split its bandwidth and
  compute. A pipeline runs at its slowest stage; llama.cpp with some layers offloaded pays
  the CPU layers' time and the GPU layers' time in turn.
- **Noise.** One measurement is the modelled figure times a log-normal draw (`NOISE` for a
  pass of `WINDOWS` windows, more for fewer: each window holds other prompts, so a pass of one
  window is a noisier figure, sd x sqrt(WINDOWS / windows)), and now and then (`SLOW_PASS`) a
  pass 25% slow, as a neighbour's burst makes one on a real box.

Calibration: on the development VM's 2 vCPUs the embedded model measured 36 tokens/s at 1
worker x 1 thread, 63 at 1 x 2 or 2 x 1, 68-72 at 1 x 2 batch 16 (README); the model gives
figures of that order there. Elsewhere it is a model, not a measurement.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from autotune.config import TrialConfig
from autotune.failures import FailureClass, classify
from autotune.models import ModelShape
from autotune.passes import WINDOWS, estimate
from autotune.topology import Topology
from backends.fake import (
    FAULT_EXITS,
    FakeBackend,
    fake_answer,
    fake_answer_length,
    modelled_tokens_per_s,
)

__all__ = ["FakeClock", "MachineModel", "SimulatedTrials"]

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
        """The model of the machine in ``path`` (`autotune.machine_file.load_machine`)."""
        from autotune.machine_file import machine_file

        topology, data = machine_file(path)
        return cls.of(topology, shape, data)

    def simulation(self, seed: int | None = None) -> dict:
        """What a `autotune.sweep.Sweep` takes to run on this model instead of measuring:
        its ``clock`` (simulated) and ``runner`` (`SimulatedTrials`)."""
        clock = FakeClock()
        return {"clock": clock, "runner": SimulatedTrials(clock, self.topology, self, seed)}

    # ------------------------------------------------------------ the figures

    def tokens_per_s(self, config: TrialConfig) -> float:
        """Generated tokens/s of ``config`` in the steady state, without noise."""
        from backends import backend_class

        backend = backend_class(config.backend)
        devices = backend.placement(config, self.topology)
        terms = backend.speed_terms(config, self.shape)
        if any(device.is_gpu for device in devices):
            return self._gpu_rate(config, terms, devices)
        return self._cpu_rate(config, terms)

    def measured(self, config: TrialConfig, rng: random.Random, windows: int = WINDOWS) -> float:
        """One measurement of ``config``, a pass of ``windows`` windows: the modelled figure
        with a real machine's noise."""
        noise = NOISE * math.sqrt(WINDOWS / max(1, windows))
        figure = self.tokens_per_s(config) * math.exp(rng.gauss(0.0, noise))
        return figure * 0.75 if rng.random() < SLOW_PASS else figure

    def load_s(self, config: TrialConfig) -> float:
        """Seconds to start the layout's processes and read the weights (in parallel)."""
        from backends import backend_class

        return (
            0.5 + backend_class(config.backend).speed_terms(config, self.shape).weight_bytes / 2e9
        )

    # ------------------------------------------------------------ CPU

    def _flops_per_token(self, terms) -> float:
        return 2.0 * self.shape.parameters * terms.cpu_cost * (1 + PREFILL_SHARE)

    def _kv_bytes(self, batch: int) -> float:
        return batch * CONTEXT_TOKENS * self.shape.kv_bytes_per_token(2)

    def _cpu_rate(self, config: TrialConfig, terms) -> float:
        """Processes x threads on the host's cores, sharing its memory bandwidth. A pipeline's
        stages each run their share of the layers, one after the other per token
        (micro-batches overlap them): its figure is its slowest stage's."""
        if terms.stage_shares:
            shares = terms.stage_shares
            step = max(self._cpu_step_s(config, terms, len(shares), s) for s in shares)
            return config.batch_size / (step + _LINK_S / 4)
        step = self._cpu_step_s(config, terms, config.workers, 1.0)
        return config.workers * config.batch_size / step

    def _cpu_step_s(self, config: TrialConfig, terms, processes: int, share: float) -> float:
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
        memory_s = (terms.weight_bytes + self._kv_bytes(batch)) * share / bandwidth
        compute_s = batch * self._flops_per_token(terms) * share / compute
        step = max(memory_s, compute_s) + 0.15 * min(memory_s, compute_s)
        return step + STEP_OVERHEAD_S * (1 + 0.1 * threads)

    # ------------------------------------------------------------ GPU

    def _gpu_figures(self, gpu: int) -> tuple[float, float]:
        name = self.topology.gpus[gpu].name if gpu < len(self.topology.gpus) else ""
        return next((f for key, f in _GPUS.items() if key in name), _OTHER_GPU)

    def _gpu_step_s(self, config, terms, device, sharers: int, layers_share: float) -> float:
        """One decode step of a process on ``device`` computing ``layers_share`` of the
        layers, its GPU shared by ``sharers`` processes."""
        bandwidth, tflops = self._gpu_figures(device.gpus[0])
        if terms.fp32_on_gpu:
            tflops /= 6  # no bf16 tensor cores
        batch = config.batch_size
        launch = terms.gpu_launch_s * self.shape.layers * layers_share
        weights = terms.weight_bytes * layers_share
        memory_s = (weights + self._kv_bytes(batch) * layers_share) / (bandwidth * 1e9)
        compute_s = batch * 2.0 * self.shape.parameters * layers_share / (tflops * 1e12)
        # Sharers overlap their launch gaps; bandwidth and compute are split between them.
        busy = max(memory_s, compute_s) * sharers * (1 + _GPU_SHARE_LOSS * (sharers - 1))
        return max(launch, busy) + 0.2 * min(launch, busy) + GPU_SEQUENCE_S * batch

    def _gpu_rate(self, config: TrialConfig, terms, devices) -> float:
        users: dict[int, int] = {}
        for device in devices:
            for gpu in device.gpus:
                users[gpu] = users.get(gpu, 0) + 1

        def sharers(device) -> int:
            return max((users[g] for g in device.gpus), default=1)

        batch = config.batch_size
        if terms.stage_shares:
            steps = [
                self._gpu_step_s(config, terms, d, sharers(d), share)
                if d.is_gpu
                else self._cpu_step_s(config, terms, 1, share)
                for d, share in zip(devices, terms.stage_shares, strict=True)
            ]
            return batch / (max(steps) + _LINK_S)
        if terms.gpu_share is not None:  # some layers offloaded: GPU and CPU time in turn
            offloaded, total = terms.gpu_share, 0.0
            for device in devices:
                step = self._gpu_step_s(config, terms, device, sharers(device), offloaded)
                step += self._cpu_step_s(config, terms, len(devices), 1 - offloaded)
                total += batch / step
            return total
        return sum(batch / self._gpu_step_s(config, terms, d, sharers(d), 1.0) for d in devices)


# ---------------------------------------------------------------- simulated trials


class FakeClock:
    """A monotonic clock that moves only when told: ``clock()`` reads it, ``advance`` moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class SimulatedTrials:
    """Runs a sweep's trial specs (see `autotune.trial.run_in_child`) on the fake backend's
    speed model (`backends.fake.modelled_tokens_per_s`): no process, no sleep; the clock
    moves by each trial's modelled duration.

    Faults behave as the real child's would: ``crash``, ``oom`` and ``sigill`` fail at once
    with their class, ``hang`` runs into its deadline.

    With ``machine`` (a `autotune.simulate.MachineModel`), each figure is that model's for the
    layout, one noisy draw per measurement (``seed``), and loading takes the model's time:
    the fake backend's own toy rates are for tests of the bookkeeping, too fast to say
    anything of a machine.
    """

    LOAD_S = 0.5
    # On a machine model, what a trial costs beyond loading and generating: the child's
    # interpreter and imports (the batch-1 trials of a real 5-minute sweep here took 1.1-3.3 s
    # more than their load and their passes, the warmup wave included:
    # docs/results/dev-2vcpu-epyc.md, issue 25).
    START_S = 1.5

    def __init__(self, clock: FakeClock, topology, machine=None, seed: int | None = None) -> None:
        import random

        self.clock = clock
        self.topology = topology
        self.machine = machine
        self.rng = random.Random(seed)
        self.calls: list[dict] = []

    def _load_s(self, config) -> float:
        return self.machine.load_s(config) if self.machine else self.LOAD_S

    def _start_s(self) -> float:
        return self.START_S if self.machine else 0.0

    def _passes(self, config, pacing) -> int:
        """Timed passes a trial runs: its repeats; where it settles (`measure.settles`: a GPU
        layout on a GPU host by default), a slow first pass and then `STABLE_PASSES` that agree
        (``settle_s`` is taken to hold them)."""
        from autotune.measure import settles
        from autotune.passes import STABLE_PASSES

        if not settles(config, self.topology, pacing):
            return pacing.repeats
        return max(pacing.repeats, 1 + STABLE_PASSES)

    def _timed_passes(self, config, pacing, tokens: float, spec: dict):
        """A trial's timed passes, each its own noisy draw: (their figures, their samples as
        a child reports them, why it stopped early or None). With the spec's ``stop_below``
        (a search trial's leader bar), it stops after a pass whose upper bound is under it,
        as `autotune.measure.benchmark` does."""
        from autotune.measure import clearly_below, settles
        from autotune.passes import Sample

        planned, bar = self._passes(config, pacing), spec.get("stop_below")
        settling = settles(config, self.topology, pacing)
        figures: list[float] = []
        samples: list[Sample] = []
        stopped = None
        while len(figures) < planned:
            rate = self._rate(config, pacing.windows)
            figures.append(rate)
            samples.append(
                Sample(
                    wall_s=tokens / rate,
                    generated_tokens=tokens,
                    prefill_tokens=0,
                    tokens_per_s=rate,
                    windows=(rate,),
                )
            )
            if bar is not None and len(figures) < planned:
                if stopped := clearly_below(samples, bar, settling):
                    break
        return figures, [sample.to_dict() for sample in samples], stopped

    def _peak_bytes(self, config) -> int:
        """The fake's processes; on a machine model, what the planner predicts (a simulated
        trial has no process to measure, and must not correct the planner down)."""
        if self.machine is None:
            return config.workers * FakeBackend.process_overhead_bytes
        from backends import backend_class

        return int(backend_class(config.backend).predict_memory_bytes(config, self.machine.shape))

    def _rate(self, config, windows: int = WINDOWS) -> float:
        if self.machine is not None:
            return self.machine.measured(config, self.rng, windows)
        return modelled_tokens_per_s(
            config.workers,
            config.threads_per_worker,
            config.batch_size,
            self.topology.usable_cpus,
            self.topology.physical_cores,
        )

    def __call__(self, spec: dict, deadline_s: float):
        from autotune.config import TrialConfig
        from autotune.measure import Pacing, pair_warmup_waves, refills, spent_prompts, width_of
        from autotune.stats import summarize
        from autotune.trial import TrialOutcome
        from autotune.workload import load_workload

        self.calls.append(spec)
        config = TrialConfig.from_dict(spec["config"])
        if config.fault == "hang":
            self.clock.advance(deadline_s)
            return TrialOutcome(False, FailureClass.TIMEOUT, duration_s=deadline_s)
        if config.fault in ("crash", "oom", "sigill", "error"):  # error: a traceback, exit 1
            failure = classify(FAULT_EXITS[config.fault], "")
            self.clock.advance(self._load_s(config))
            return TrialOutcome(False, failure, stderr_tail=f"fake {config.fault}")
        pacing = Pacing(**spec["pacing"])
        workload = load_workload(spec.get("workload"))
        if spec.get("limit"):
            workload = workload.head(spec["limit"])

        def one_pass(layout):  # (its prompts, its generated tokens) as a trial sizes them
            prompts = pacing.pass_of(workload, width_of(layout), refills(layout)).prompts
            tokens = sum(fake_answer_length(p.text, layout.generation) for p in prompts)
            # A cut pass spends its time on the requests up to its last window only.
            return prompts, tokens * spent_prompts(layout, pacing, len(prompts)) / len(prompts)

        def warmup_tokens(layout, prompts, waves: int = pacing.warmup) -> int:
            wave = prompts[: width_of(layout)]
            return waves * sum(fake_answer_length(p.text, layout.generation) for p in wave)

        def pair_warmup_tokens(layout, prompts) -> int:
            return warmup_tokens(layout, prompts, pair_warmup_waves(layout, self.topology, pacing))

        prompts, tokens = one_pass(config)
        rate = self._rate(config, pacing.windows)
        if spec.get("paired"):
            baseline = TrialConfig.from_dict(spec["paired"])
            base_prompts, base_tokens = one_pass(baseline)
            rates = {
                "candidate": [
                    rate,
                    *(self._rate(config, pacing.windows) for _ in range(spec["pairs"] - 1)),
                ],
                "baseline": [self._rate(baseline, pacing.windows) for _ in range(spec["pairs"])],
            }
            duration = (
                self._start_s()
                + self._load_s(config)
                + self._load_s(baseline)
                + (pair_warmup_tokens(config, prompts) + spec["pairs"] * tokens)
                / statistics.fmean(rates["candidate"])
                + (pair_warmup_tokens(baseline, base_prompts) + spec["pairs"] * base_tokens)
                / statistics.fmean(rates["baseline"])
            )
            return self._finish(duration, deadline_s, rates)
        load = self._load_s(config)
        figures, samples, stopped = self._timed_passes(config, pacing, tokens, spec)
        found = estimate(figures)
        duration = (
            self._start_s()
            + load
            + warmup_tokens(config, prompts) / figures[0]
            + sum(sample["wall_s"] for sample in samples)
        )
        rate = found.mean
        result = {
            "tokens_per_s": rate,
            "tokens_per_s_low": found.low,
            "tokens_per_s_high": found.high,
            "windows": [rate] * 3,
            "steady": True,
            "pass_tokens_per_s": rate,
            "window_spread": 0.0,
            "pass_spread": found.spread,
            "stable": found.stable,
            "stopped": stopped,
            "prompts": len(prompts),
            "requests_per_s": rate / max(1, tokens / len(prompts)),
            "latency_p50_s": None,
            "latency_p95_s": None,
            "ttft_p50_s": None,
            "load_time_s": load,
            "pacing": spec["pacing"],
            "peak_memory_bytes": self._peak_bytes(config),
            "failed_requests": 0,
            "cpu_utilisation": 1.0,
            "tokens_per_s_summary": summarize([rate] * 3).to_dict(),
            "warnings": [],
            "details": {},
            "samples": samples,
            "answers": {
                p.id: fake_answer(
                    p.text, fake_answer_length(p.text, config.generation), config.batch_size
                )
                for p in prompts
            },
        }
        return self._finish(duration, deadline_s, result)

    def _finish(self, duration: float, deadline_s: float, result: dict):
        from autotune.trial import TrialOutcome

        if duration > deadline_s:
            self.clock.advance(deadline_s)
            return TrialOutcome(False, FailureClass.TIMEOUT, duration_s=deadline_s)
        self.clock.advance(duration)
        return TrialOutcome(True, result=result, duration_s=duration)
