"""One way to measure every backend: load once, warm up, repeat, keep every raw sample.

- Throughput: generated tokens / wall time of the generation phase; load time is its own
  figure. Requests/s, per-request latency p50/p95 and time to first token beside it.
- Memory: peak PSS of this process and all its descendants, so N llama.cpp workers mmapping
  one GGUF count its pages once (RSS would count them N times).
- CPU utilisation: CPU seconds of the whole tree / (wall time x usable CPUs).

The memory sampler is a thread that sleeps between samples (``Event.wait``), never a busy
loop: the parent must not take CPU from the workers it measures.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil

from autotune.config import TrialConfig
from autotune.models import ModelSpec
from autotune.provenance import provenance
from autotune.stats import HIGH_CV, percentile, summarize
from autotune.topology import Topology
from autotune.workload import Workload
from backends import create_backend
from backends.base import Completion

__all__ = ["RunResult", "TreeSampler", "benchmark"]


def _smaps_rollup(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) in bytes from /proc/PID/smaps_rollup, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            text = handle.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("Pss", 0), values.get("Rss", 0)


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    try:
        return [me, *me.children(recursive=True)]
    except psutil.Error:
        return [me]


def tree_memory() -> tuple[int, int]:
    """(PSS, RSS) of this process and all its descendants, in bytes."""
    pss = rss = 0
    for process in _tree():
        rollup = _smaps_rollup(process.pid)
        if rollup is None:  # no smaps_rollup (old kernel, not Linux): RSS is all there is
            try:
                value = process.memory_info().rss
            except psutil.Error:
                continue
            rollup = (value, value)
        pss += rollup[0]
        rss += rollup[1]
    return pss, rss


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants."""
    total = 0.0
    for process in _tree():
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class TreeSampler:
    """Peak PSS/RSS of the process tree, sampled every ``interval_s`` by a sleeping thread.

    One sample costs ~8 ms for a process with torch loaded (the kernel walks every mapping
    under the process's mmap lock), so the period is long and callers add samples between
    phases with `sample()`, outside the timed regions.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.peak_pss_bytes = 0
        self.peak_rss_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autotune-memory", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        pss, rss = tree_memory()
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass(kw_only=True)
class RunResult:
    """A measured configuration: summary figures, raw samples, provenance, completions."""

    config: dict
    model: str
    workload: str
    prompts: int
    repeats: int
    load_time_s: float
    tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p50_s: float | None
    peak_memory_bytes: int
    peak_rss_bytes: int
    cpu_utilisation: float
    failed_requests: int
    tokens_per_s_summary: dict
    samples: list[dict]
    warnings: list[str]
    provenance: dict
    details: dict = field(default_factory=dict)  # what the backend chose (e.g. the layer split)
    completions: list[Completion] = field(default_factory=list, repr=False)

    def to_dict(self, completions: bool = False) -> dict:
        """JSON-ready dict; completions only when asked (they can be large)."""
        data = asdict(self)
        data.pop("completions")
        if completions:
            data["completions"] = [c.to_dict() for c in self.completions]
        return data


def benchmark(
    config: TrialConfig,
    workload: Workload,
    model: ModelSpec,
    topology: Topology,
    *,
    repeats: int = 3,
    warmup: int = 1,
    on_progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Load ``config``'s backend once, warm it up, then run the workload ``repeats`` times."""
    say = on_progress or (lambda message: None)
    settings = config.generation
    backend = create_backend(config, model, topology)
    samples: list[dict] = []
    latencies: list[float] = []
    ttfts: list[float] = []
    completions: list[Completion] = []
    with TreeSampler() as memory:
        started = time.monotonic()
        say("loading")
        with backend:
            load_time_s = time.monotonic() - started
            memory.sample()
            # Warm up on as many prompts as the layout runs at once: every worker and slot
            # sees a prompt, pages are touched and thread pools started before timing.
            width = max(1, config.processes * config.batch_size)
            for index in range(warmup):
                say(f"warmup {index + 1}/{warmup}")
                backend.generate(workload.prompts[:width], settings)
            for index in range(repeats):
                say(f"repeat {index + 1}/{repeats}")
                cpu_before = tree_cpu_seconds()
                start = time.monotonic()
                completions = backend.generate(workload.prompts, settings)
                wall_s = time.monotonic() - start
                cpu_s = tree_cpu_seconds() - cpu_before
                memory.sample()
                tokens = sum(len(c.token_ids) for c in completions)
                samples.append(
                    {
                        "wall_s": wall_s,
                        "generated_tokens": tokens,
                        "tokens_per_s": tokens / wall_s,
                        "requests_per_s": len(completions) / wall_s,
                        "cpu_utilisation": cpu_s / (wall_s * topology.usable_cpus),
                    }
                )
                latencies.extend(c.latency_s for c in completions if c.error is None)
                ttfts.extend(c.ttft_s for c in completions if c.ttft_s is not None)
            details = backend.details()

    throughput = summarize([s["tokens_per_s"] for s in samples])
    failed = [c for c in completions if c.error is not None]
    warnings = []
    if throughput.cv > HIGH_CV:
        warnings.append(
            f"tokens/s varied by {throughput.cv:.0%} (CV) over {repeats} repeats: something else "
            "may be using the CPUs; rerun with more --repeats on a quiet machine"
        )
    if config.total_threads > topology.usable_cpus:
        warnings.append(
            f"processes x threads = {config.total_threads} exceeds the {topology.usable_cpus} "
            "usable CPUs: threads compete for cores"
        )
    if failed:
        warnings.append(f"{len(failed)} requests failed; first: {failed[0].id}: {failed[0].error}")
    return RunResult(
        config=config.to_dict(),
        model=str(model.path),
        workload=workload.name,
        prompts=len(workload.prompts),
        repeats=repeats,
        load_time_s=load_time_s,
        tokens_per_s=throughput.median,
        requests_per_s=summarize([s["requests_per_s"] for s in samples]).median,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50),
        peak_memory_bytes=memory.peak_pss_bytes,
        peak_rss_bytes=memory.peak_rss_bytes,
        cpu_utilisation=summarize([s["cpu_utilisation"] for s in samples]).median,
        failed_requests=len(failed),
        tokens_per_s_summary=throughput.to_dict(),
        samples=samples,
        warnings=warnings,
        provenance={**provenance(topology), "pid": os.getpid()},
        details=details,
        completions=completions,
    )
