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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import psutil

from autotune.config import TrialConfig
from autotune.models import ModelSpec
from autotune.provenance import provenance
from autotune.stats import HIGH_CV, percentile, relative_spread, summarize
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
    # tokens/s with the ramp-up and tail of each pass left out (None: too few requests)
    steady_tokens_per_s: float | None
    window_spread: float  # relative spread of the last (up to 3) passes' tokens/s
    stable: bool  # that spread is under STABLE_SPREAD (with at least 3 passes)
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tpot_p50_s: float | None  # time per output token after the first, median over requests
    prefill_tokens_per_s: float  # prompt tokens really computed / wall time, median
    peak_memory_bytes: int
    peak_rss_bytes: int
    cpu_utilisation: float
    failed_requests: int
    tokens_per_s_summary: dict
    samples: list[dict]
    warnings: list[str]
    provenance: dict
    details: dict = field(default_factory=dict)  # what the backend chose (e.g. the layer split)
    agreement: dict | None = None  # with a reference run, where one was asked for
    completions: list[Completion] = field(default_factory=list, repr=False)

    def to_dict(self, completions: bool = False) -> dict:
        """JSON-ready dict; completions only when asked (they can be large)."""
        data = asdict(self)
        data.pop("completions")
        if completions:
            data["completions"] = [c.to_dict() for c in self.completions]
        return data


# Timed passes agree when the relative spread of their steady tokens/s is under this.
STABLE_SPREAD = 0.05


def steady_tokens_per_s(completions: Sequence[Completion], concurrency: int) -> float | None:
    """Generated tokens/s while every slot was busy: tokens of the requests that finished
    after the first wave (the ramp-up) and up to the last full wave (the tail), over that
    time. None when a pass has too few requests for both (fewer than 3 waves), or a backend
    gave no finish times."""
    done = sorted(
        (c.finished_at, len(c.token_ids))
        for c in completions
        if c.error is None and c.finished_at is not None
    )
    if len(done) < 3 * concurrency or len(done) != len(completions):
        return None
    start, end = done[concurrency - 1][0], done[len(done) - concurrency - 1][0]
    tokens = sum(count for at, count in done if start < at <= end)
    return tokens / (end - start) if end > start else None


def _prefill_tokens(completion: Completion) -> int:
    """Prompt tokens a request really computed (all of them where the backend has no cache)."""
    if completion.prefill_tokens is not None:
        return completion.prefill_tokens
    return completion.prompt_tokens


def benchmark(
    config: TrialConfig,
    workload: Workload,
    model: ModelSpec,
    topology: Topology,
    *,
    repeats: int = 3,
    warmup: int = 1,
    on_progress: Callable[[str], None] | None = None,
    settle_s: float = 0.0,
) -> RunResult:
    """Load ``config``'s backend once, warm it up, then run the workload ``repeats`` times;
    with ``settle_s``, go on with more passes until the last three agree (relative spread of
    their tokens/s under `STABLE_SPREAD`) or ``settle_s`` seconds of passes have run."""
    say = on_progress or (lambda message: None)
    settings = config.generation
    backend = create_backend(config, model, topology)
    samples: list[dict] = []
    latencies: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
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
            timed_from = time.monotonic()
            index = 0
            while index < repeats or (
                settle_s
                and time.monotonic() - timed_from < settle_s
                and not _settled([_rate(s) for s in samples])
            ):
                index += 1
                say(f"timed pass {index}" + (f"/{repeats}" if index <= repeats else ", settling"))
                cpu_before = tree_cpu_seconds()
                start = time.monotonic()
                completions = backend.generate(workload.prompts, settings)
                wall_s = time.monotonic() - start
                cpu_s = tree_cpu_seconds() - cpu_before
                memory.sample()
                answered = [c for c in completions if c.error is None]
                tokens = sum(len(c.token_ids) for c in answered)
                prefill = sum(_prefill_tokens(c) for c in answered)
                samples.append(
                    {
                        "wall_s": wall_s,
                        "generated_tokens": tokens,
                        "prefill_tokens": prefill,
                        "tokens_per_s": tokens / wall_s,
                        "steady_tokens_per_s": steady_tokens_per_s(completions, width),
                        "prefill_tokens_per_s": prefill / wall_s,
                        "requests_per_s": len(completions) / wall_s,
                        "cpu_utilisation": cpu_s / (wall_s * topology.usable_cpus),
                    }
                )
                latencies.extend(c.latency_s for c in answered)
                ttfts.extend(c.ttft_s for c in answered if c.ttft_s is not None)
                tpots.extend(
                    (c.latency_s - c.ttft_s) / (len(c.token_ids) - 1)
                    for c in answered
                    if c.ttft_s is not None and len(c.token_ids) > 1
                )
            details = backend.details()

    throughput = summarize([s["tokens_per_s"] for s in samples])
    failed = [c for c in completions if c.error is not None]
    warnings = []
    last = [_rate(s) for s in samples][-3:]
    spread = relative_spread(last)
    if settle_s and not _settled(last):
        warnings.append(
            f"not stable: the last {len(last)} timed passes spread by {spread:.0%} after "
            f"{settle_s:.0f} s of settling (limit {STABLE_SPREAD:.0%})"
        )
    if throughput.cv > HIGH_CV:
        warnings.append(
            f"tokens/s varied by {throughput.cv:.0%} (CV) over {len(samples)} passes: something "
            "else may be using the CPUs, or the passes are too short to reach a steady state; "
            "rerun with more --prompts or --settle on a quiet machine"
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
        repeats=len(samples),
        load_time_s=load_time_s,
        tokens_per_s=throughput.median,
        requests_per_s=summarize([s["requests_per_s"] for s in samples]).median,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        steady_tokens_per_s=_median_or_none([s["steady_tokens_per_s"] for s in samples]),
        window_spread=spread,
        stable=_settled(last),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        tpot_p50_s=percentile(tpots, 50),
        prefill_tokens_per_s=summarize([s["prefill_tokens_per_s"] for s in samples]).median,
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


def _rate(sample: dict) -> float:
    """A pass's tokens/s: its steady state where it has one."""
    return sample["steady_tokens_per_s"] or sample["tokens_per_s"]


def _settled(rates: Sequence[float]) -> bool:
    return len(rates) >= 3 and relative_spread(rates[-3:]) <= STABLE_SPREAD


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return summarize(present).median if present else None
