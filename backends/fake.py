"""The ``fake`` backend: no model, so everything above the backends is tested in seconds.

Outputs are derived from the prompt (deterministic), timings from the config by a small speed
model that behaves like a CPU box: more processes help until the cores run out, threads help
less than processes, batching helps with diminishing returns, SMT adds a little. The generate
call sleeps for the modelled time, so measured tokens/s follow the model.

``fault`` makes it fail on purpose: ``crash`` exits with code 3, ``oom`` kills itself with
SIGKILL as the kernel's OOM killer would, ``hang`` sleeps forever, ``error`` raises the
BackendError a backend raises when it cannot generate.

`SimulatedTrials` runs whole trials without a process or a sleep: it computes each trial's
outcome from the same speed model and moves a `FakeClock` on by the time it would have
taken, so tests of the sweep's budget and bookkeeping are exact and take no time.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from collections.abc import Sequence

from autotune.errors import BackendError
from autotune.knobs import BackendSpace, Knob, Target
from autotune.workload import GenerationSettings, Prompt
from backends.base import Backend, Completion, threads_knob

__all__ = ["FakeBackend", "FakeClock", "SimulatedTrials", "modelled_tokens_per_s"]

# Tokens/s of one worker with one thread at batch 1; high so tests stay fast.
BASE_TOKENS_PER_S = 4000.0


def modelled_tokens_per_s(
    workers: int, threads_per_worker: int, batch_size: int, usable_cpus: int, physical_cores: int
) -> float:
    """The fake machine's throughput for a layout."""
    threads = workers * threads_per_worker
    busy = min(threads, usable_cpus)
    # processes scale almost linearly; threads inside a process at 60% efficiency
    parallel = min(workers, busy) + 0.6 * max(0, busy - min(workers, busy))
    smt_bonus = 1.0 + 0.15 * max(0, busy - physical_cores) / max(1, physical_cores)
    oversubscribed = max(1.0, threads / usable_cpus) ** 0.5  # contention past the cores
    return BASE_TOKENS_PER_S * parallel * smt_bonus * (1 + math.log2(batch_size)) / oversubscribed


def _fake_tokens(text: str, count: int) -> list[int]:
    digest = hashlib.sha256(text.encode()).digest()
    return [digest[i % len(digest)] * 7 + i for i in range(count)]


class FakeBackend(Backend):
    """A backend with no model: deterministic outputs, modelled timings, faults on request."""

    name = "fake"
    reads = frozenset({"workers", "fault", "ctx_per_sequence"})
    first_guess_s = 5.0
    baseline_rank = 5
    process_overhead_bytes = 40 * 2**20

    @classmethod
    def space(cls, target: Target) -> BackendSpace:
        cpus = target.cpus
        return BackendSpace(
            cls.name,
            (
                Knob("workers", tuple(range(1, cpus + 1))),
                threads_knob(cpus, "workers"),
                Knob("batch_size", target.batch_sizes),
            ),
        )

    @classmethod
    def naive(cls, target: Target) -> dict:
        threads = max(1, min(target.cpus, target.topology.logical_cpus // 2))
        return {"workers": 1, "threads_per_worker": threads, "batch_size": 1}

    def load(self) -> None:
        self.tokens_per_s = modelled_tokens_per_s(
            self.config.workers,
            self.config.threads_per_worker,
            self.config.batch_size,
            self.topology.usable_cpus,
            self.topology.physical_cores,
        )

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[Completion]:
        fault = self.config.fault
        if fault == "crash":
            os._exit(3)
        if fault == "oom":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "hang":
            while True:
                time.sleep(3600)
        if fault == "error":
            raise BackendError("fake backend: generate failed on purpose (--fault error)")
        completions = []
        total_tokens = 0
        started = time.monotonic()
        for index, prompt in enumerate(prompts):
            prompt_tokens = len(prompt.text.split())
            if prompt_tokens + settings.max_new_tokens > self.config.ctx_per_sequence:
                # As llama.cpp's engine does: a request that cannot fit its context fails.
                completions.append(
                    Completion(
                        id=prompt.id,
                        text="",
                        token_ids=(),
                        prompt_tokens=prompt_tokens,
                        worker_rank=index % self.config.workers,
                        latency_s=0.0,
                        error=f"prompt ({prompt_tokens} tokens) + max_new_tokens "
                        f"({settings.max_new_tokens}) exceeds the context of "
                        f"{self.config.ctx_per_sequence} tokens",
                    )
                )
                continue
            # Output length depends only on the prompt: the same for every layout.
            count = min(settings.max_new_tokens, 4 + len(prompt.text) % 29)
            if settings.ignore_eos:
                count = settings.max_new_tokens
            tokens = _fake_tokens(prompt.text, count)
            total_tokens += count
            completions.append(
                Completion(
                    id=prompt.id,
                    text=" ".join(f"t{token}" for token in tokens),
                    token_ids=tuple(tokens),
                    prompt_tokens=prompt_tokens,
                    worker_rank=index % self.config.workers,
                    latency_s=count / self.tokens_per_s * self.config.batch_size,
                    ttft_s=self.config.batch_size / self.tokens_per_s,
                    prefill_tokens=prompt_tokens,
                    # Requests finish one after another at the modelled rate.
                    finished_at=started + total_tokens / self.tokens_per_s,
                )
            )
        time.sleep(total_tokens / self.tokens_per_s)
        return completions


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
    speed model: no process, no sleep; the clock moves by each trial's modelled duration.

    Faults behave as the real child's would: ``crash`` and ``oom`` fail at once with their
    class, ``hang`` runs into its deadline.
    """

    LOAD_S = 0.5

    def __init__(self, clock: FakeClock, topology, prompt_tokens: int = 24) -> None:
        self.clock = clock
        self.topology = topology
        self.prompt_tokens = prompt_tokens  # generated tokens per prompt
        self.calls: list[dict] = []

    def _rate(self, config) -> float:
        return modelled_tokens_per_s(
            config.workers,
            config.threads_per_worker,
            config.batch_size,
            self.topology.usable_cpus,
            self.topology.physical_cores,
        )

    def __call__(self, spec: dict, deadline_s: float):
        from autotune.config import TrialConfig
        from autotune.stats import summarize
        from autotune.trial import TrialOutcome

        self.calls.append(spec)
        config = TrialConfig.from_dict(spec["config"])
        if config.fault == "hang":
            self.clock.advance(deadline_s)
            return TrialOutcome("fail", "timeout", duration_s=deadline_s)
        if config.fault in ("crash", "oom", "error"):  # error: a traceback, exit 1
            failure = "crash" if config.fault == "error" else config.fault
            self.clock.advance(self.LOAD_S)
            return TrialOutcome("fail", failure, stderr_tail=f"fake {config.fault}")
        tokens = spec["limit"] * min(config.max_new_tokens, self.prompt_tokens)
        if spec.get("paired"):
            baseline = TrialConfig.from_dict(spec["paired"])
            rates = {"candidate": [self._rate(config)], "baseline": [self._rate(baseline)]}
            rates = {k: v * spec["pairs"] for k, v in rates.items()}
            duration = 2 * self.LOAD_S + sum(
                tokens / rate for runs in rates.values() for rate in runs
            )
            return self._finish(duration, deadline_s, rates)
        rate = self._rate(config)
        passes = spec["warmup"] + spec["repeats"]
        duration = self.LOAD_S + passes * tokens / rate
        summary = summarize([rate] * spec["repeats"]).to_dict()
        result = {
            "tokens_per_s": rate,
            "requests_per_s": rate / self.prompt_tokens,
            "latency_p50_s": None,
            "latency_p95_s": None,
            "ttft_p50_s": None,
            "load_time_s": self.LOAD_S,
            "peak_memory_bytes": config.workers * FakeBackend.process_overhead_bytes,
            "failed_requests": 0,
            "cpu_utilisation": 1.0,
            "tokens_per_s_summary": summary,
            "warnings": [],
            "details": {},
            "samples": [{"tokens_per_s": rate}] * spec["repeats"],
        }
        return self._finish(duration, deadline_s, result)

    def _finish(self, duration: float, deadline_s: float, result: dict):
        from autotune.trial import TrialOutcome

        if duration > deadline_s:
            self.clock.advance(deadline_s)
            return TrialOutcome("fail", "timeout", duration_s=deadline_s)
        self.clock.advance(duration)
        return TrialOutcome("complete", result=result, duration_s=duration)
