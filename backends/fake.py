"""The ``fake`` backend: no model, so everything above the backends is tested in seconds.

Outputs are derived from the prompt (deterministic), timings from the config by a small speed
model that behaves like a CPU box: more processes help until the cores run out, threads help
less than processes, batching helps with diminishing returns, SMT adds a little. The generate
call sleeps for the modelled time, so measured tokens/s follow the model.

``fault`` makes it fail on purpose: ``crash`` exits with code 3, ``oom`` kills itself with
SIGKILL as the kernel's OOM killer would, ``hang`` sleeps forever.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from collections.abc import Sequence

from backends.base import Backend, Completion
from experiments.workload import GenerationSettings, Prompt

__all__ = ["FakeBackend", "modelled_tokens_per_s"]

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
        completions = []
        total_tokens = 0
        for index, prompt in enumerate(prompts):
            # Output length depends only on the prompt: the same for every layout.
            count = min(settings.max_new_tokens, 4 + len(prompt.text) % 29)
            tokens = _fake_tokens(prompt.text, count)
            total_tokens += count
            completions.append(
                Completion(
                    id=prompt.id,
                    text=" ".join(f"t{token}" for token in tokens),
                    token_ids=tuple(tokens),
                    prompt_tokens=len(prompt.text.split()),
                    worker_rank=index % self.config.workers,
                    latency_s=count / self.tokens_per_s * self.config.batch_size,
                )
            )
        time.sleep(total_tokens / self.tokens_per_s)
        return completions
