"""The ``fake`` backend: no model, so everything above the backends is tested in seconds.

Outputs are derived from the prompt (deterministic; from `DRIFTING_BATCH` on, some answers
change, as batched kernels round differently), timings from the config by a small speed model
that behaves like a CPU box: more processes help until the cores run out, threads help less
than processes, batching helps with diminishing returns, SMT adds a little. Requests flow
through processes x batch slots as under continuous batching, each request's finish time and
latency following from that; the generate call sleeps for the modelled time, so measured
tokens/s follow the model.

``fault`` makes it fail on purpose: ``crash`` exits with code 3, ``oom`` kills itself with
SIGKILL as the kernel's OOM killer would, ``sigill`` with SIGILL as a CPU that traps an
instruction does (`die_by_sigill` is such a process body, for where a llama.cpp worker runs),
``hang`` sleeps forever, ``error`` raises the BackendError a backend raises when it cannot
generate.

`autotune.simulate.SimulatedTrials` runs whole trials of it without a process or a sleep, from
the same speed model (`modelled_tokens_per_s`), on a fake clock.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from autotune.errors import BackendError
from autotune.knobs import BackendSpace, Knob, Target
from autotune.workload import GenerationSettings, Prompt
from backends.base import Backend, Completion, SpeedTerms, threads_knob
from backends.llamacpp.quant import QUANT_COST

__all__ = [
    "FAULT_EXITS",
    "FakeBackend",
    "die_by_sigill",
    "modelled_tokens_per_s",
]

# Tokens/s of one worker with one thread at batch 1; high so tests stay fast.
BASE_TOKENS_PER_S = 4000.0


# How each fault ends a real trial process (exit code, or minus the signal).
FAULT_EXITS = {"crash": 3, "oom": -signal.SIGKILL, "sigill": -signal.SIGILL, "error": 1}


def die_by_sigill(*_args) -> None:
    """Die as a process does whose CPU traps an instruction (SIGILL, the default action). Any
    arguments are ignored, so tests can start it where a llama.cpp worker would run."""
    signal.signal(signal.SIGILL, signal.SIG_DFL)  # faulthandler may have taken it over
    os.kill(os.getpid(), signal.SIGILL)


def die_with_extra_buffers(name: str = "SIGSEGV") -> None:
    """Die by signal ``name`` unless the command line holds ``--no-extra-buffers``, as the
    probe's child did on a VM advertising AMX that traps it by SIGSEGV
    (`backends.llamacpp.probe`); exit 0 with it."""
    if "--no-extra-buffers" in sys.argv:
        return
    number = signal.Signals[name]
    signal.signal(number, signal.SIG_DFL)  # faulthandler may have taken it over
    os.kill(os.getpid(), number)


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


# From this batch size on, the fake's answers to some prompts change, as real kernels chosen
# by the batch's shape round differently: tests of the agreement and --min-agreement need it.
DRIFTING_BATCH = 16


def fake_answer(text: str, count: int, batch_size: int = 1) -> list[int]:
    """The fake's generated tokens for a prompt: derived from its text alone, except that at
    `DRIFTING_BATCH` and above the prompts whose hash is odd differ from the middle token on."""
    digest = hashlib.sha256(text.encode()).digest()
    tokens = [digest[i % len(digest)] * 7 + i for i in range(count)]
    if batch_size >= DRIFTING_BATCH and digest[0] % 2:
        tokens[count // 2 :] = [t + 1 for t in tokens[count // 2 :]]
    return tokens


def fake_answer_length(text: str, settings: GenerationSettings) -> int:
    """Tokens the fake generates for a prompt: depends only on the prompt (the same for every
    layout), exactly max_new_tokens where the settings ignore end-of-sequence."""
    if settings.ignore_eos:
        return settings.max_new_tokens
    return min(settings.max_new_tokens, 4 + len(text) % 29)


class FakeBackend(Backend):
    """A backend with no model: deterministic outputs, modelled timings, faults on request."""

    name = "fake"
    reads = frozenset({"workers", "fault", "ctx_per_sequence"})
    first_guess_load_s = 1.0
    first_guess_tokens_per_s = 1000.0
    answer_family = "fake"
    baseline_rank = 5
    cuts_tail = True
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
    def speed_terms(cls, config, shape) -> SpeedTerms:
        # The model file read as it is, at the cost of its own weight type (as llama.cpp
        # would run it); fp32 on a GPU, its dtype.
        return SpeedTerms(
            weight_bytes=float(shape.file_bytes),
            cpu_cost=QUANT_COST.get(shape.weight_type or "", QUANT_COST["q4_1"]),
            fp32_on_gpu=config.dtype == "float32",
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
        return self.generate_pass(prompts, settings, None)

    def generate_pass(
        self, prompts: Sequence[Prompt], settings: GenerationSettings, cut_after: int | None
    ) -> list[Completion]:
        """As llama.cpp's workers do (`Backend.generate_pass`): with ``cut_after``, what is
        still running at the ``cut_after``-th finish stops there with the tokens it had."""
        fault = self.config.fault
        if fault == "crash":
            os._exit(3)
        if fault == "oom":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "sigill":
            die_by_sigill()
        if fault == "hang":
            while True:
                time.sleep(3600)
        if fault == "error":
            raise BackendError("fake backend: generate failed on purpose (--fault error)")
        completions = []
        started = time.monotonic()
        width = self.config.workers * self.config.batch_size
        slots = [started] * width  # when each slot comes free
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
            count = fake_answer_length(prompt.text, settings)
            tokens = fake_answer(prompt.text, count, self.config.batch_size)
            # Continuous batching over `width` slots, each at 1/width of the modelled rate:
            # a request takes the first slot to come free.
            slot = min(range(width), key=slots.__getitem__)
            begins = slots[slot]
            finished = slots[slot] = begins + count * width / self.tokens_per_s
            completions.append(
                Completion(
                    id=prompt.id,
                    text=_text(tokens),
                    token_ids=tuple(tokens),
                    prompt_tokens=prompt_tokens,
                    worker_rank=index % self.config.workers,
                    latency_s=finished - begins,
                    ttft_s=(finished - begins) / max(1, count),
                    prefill_tokens=prompt_tokens,
                    finished_at=finished,
                )
            )
        finishes = sorted(c.finished_at for c in completions if c.finished_at is not None)
        if cut_after is not None and 0 < cut_after < len(finishes):
            cut_at = finishes[cut_after - 1]
            completions = [_cut(c, cut_at) for c in completions]
            time.sleep(cut_at - started)
        else:
            time.sleep(max(slots) - started)
        return completions


def _text(tokens) -> str:
    """The fake's text of ``tokens``."""
    return " ".join(f"t{token}" for token in tokens)


def _cut(completion: Completion, at: float) -> Completion:
    """``completion`` stopped at ``at`` where it was still running then: the share of its
    tokens generated by then (none where it had not started)."""
    if completion.finished_at is None or completion.finished_at <= at:
        return completion
    began = completion.finished_at - completion.latency_s
    done = max(0.0, min(1.0, (at - began) / completion.latency_s)) if completion.latency_s else 0.0
    kept = completion.token_ids[: int(len(completion.token_ids) * done)]
    return replace(
        completion,
        text=_text(kept),
        token_ids=kept,
        latency_s=max(0.0, at - began),
        finished_at=at,
        cut=True,
    )
