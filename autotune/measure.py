"""One way to measure every backend: load once, warm up, time passes, keep every raw sample.

- Throughput is the steady state of the user's job: each timed pass cycles the workload to
  enough requests that the layout's every slot is refilled again and again (`Pacing`); the
  finishes between the ramp-up (the first wave) and the tail (the last wave) are cut into
  windows, and the figure is the mean of the last `WINDOWS` windows, with their spread.
  Passes go on (``settle_s``) until those windows agree. Load time is its own figure.
- Beside it: prefill tokens/s (prompt tokens really computed), requests/s, latency, time to
  first token and time per output token, per pass and overall.
- Memory: peak PSS of this process and all its descendants, so N llama.cpp workers mmapping
  one GGUF count its pages once (RSS would count them N times).
- CPU utilisation: CPU seconds of the whole tree / (wall time x usable CPUs).

The memory sampler is a thread that sleeps between samples (``Event.wait``), never a busy
loop: the parent must not take CPU from the workers it measures.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import psutil

from autotune import gpu_usage
from autotune.config import TrialConfig
from autotune.models import ModelSpec
from autotune.provenance import provenance
from autotune.stats import percentile, relative_spread, summarize
from autotune.topology import Topology
from autotune.workload import Workload
from backends import backend_class, create_backend
from backends.base import Completion

__all__ = ["Pacing", "RunResult", "TreeSampler", "benchmark", "timed_pass", "windows"]


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


def tree_memory(processes: list[psutil.Process] | None = None) -> tuple[int, int]:
    """(PSS, RSS) of this process and all its descendants (``processes``, where the caller
    listed them already), in bytes."""
    pss = rss = 0
    for process in _tree() if processes is None else processes:
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

    def __init__(self, interval_s: float = 1.0, gpus: bool = False) -> None:
        self.interval_s = interval_s
        self.peak_pss_bytes = 0
        self.peak_rss_bytes = 0
        # On a GPU host (``gpus``, with nvidia-smi): peak bytes per GPU index the tree held,
        # and each sample's utilisation of those GPUs.
        self.gpus = gpus and gpu_usage.available()
        self.peak_gpu_bytes: dict[int, int] = {}
        self.gpu_busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autotune-memory", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        tree = _tree()
        pss, rss = tree_memory(tree)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        if self.gpus:
            reading = gpu_usage.sample({p.pid for p in tree})
            if reading is not None:
                for gpu, used in reading.memory.items():
                    self.peak_gpu_bytes[gpu] = max(self.peak_gpu_bytes.get(gpu, 0), used)
                if reading.utilisation:
                    self.gpu_busy.append(statistics.fmean(reading.utilisation.values()))

    @property
    def gpu_utilisation(self) -> float | None:
        """Mean utilisation (0-1) of the GPUs the tree used over the samples; None without."""
        return statistics.fmean(self.gpu_busy) / 100 if self.gpu_busy else None

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


@dataclass(frozen=True)
class Pacing:
    """How long a measurement runs, the same for `autotune bench`, every sweep trial and the
    paired re-measurement.

    ``prompts``: requests per timed pass (the workload cycled to that many), or None to size
    each pass by the layout, `pass_prompts`: a ramp-up wave, `WINDOWS` windows and a tail, so
    the largest batch is filled again and again. ``warmup``: untimed passes of one wave.
    ``repeats``: timed passes at least. ``settle_s``: more passes, until the last `WINDOWS`
    windows agree within `STABLE_SPREAD`, while the timed passes have run less than this.
    """

    prompts: int | None = None
    warmup: int = 1
    repeats: int = 1
    settle_s: float = 0.0

    def pass_prompts(self, width: int, ramp: bool = True) -> int:
        """Requests per timed pass for a layout running ``width`` requests at once (``ramp``:
        whether its slots are refilled as they free, see `refills`)."""
        return self.prompts or pass_prompts(width, ramp)

    def pass_of(self, workload: Workload, width: int, ramp: bool = True) -> Workload:
        """The requests of one timed pass: the first `BALANCED_PROMPTS` of ``workload``,
        balanced (every `MIN_WINDOW` consecutive prompts short and long alike, so windows
        compare like with like) and cycled to `pass_prompts`. The same order for every layout,
        so every trial answers the same first prompts (the agreement compares them)."""
        head = workload.head(BALANCED_PROMPTS)
        return head.balanced(MIN_WINDOW).cycled(self.pass_prompts(width, ramp))

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


# A pass draws its prompts from the first this many of the file, whatever the layout (so the
# order, and the prompts every trial answers first, do not depend on it): far more than a CPU
# layout's pass (2 x 64 + 3 x 64 requests at batch 64), and balancing them takes milliseconds
# where balancing a 50k-line file in every trial took seconds (experiments/bench_workload.py).
BALANCED_PROMPTS = 8192
# A window is as long as it takes to finish one wave (at least MIN_WINDOW requests) while
# every slot is busy; a measurement's figure is the mean of its last WINDOWS windows.
WINDOWS = 3
MIN_WINDOW = 4
# The last WINDOWS windows agree when their relative spread is under this.
STABLE_SPREAD = 0.05


def window_size(width: int) -> int:
    """Finishes per window for a layout running ``width`` requests at once: at least one
    wave, so that waves finishing together (static batches, equal lengths) do not split."""
    return max(width, MIN_WINDOW)


def pass_prompts(width: int, ramp: bool = True) -> int:
    """Requests in a pass that holds `WINDOWS` windows, between a ramp-up wave and a tail
    where the layout refills its slots (``ramp``)."""
    return 2 * width * ramp + WINDOWS * window_size(width)


def windows(completions: Sequence[Completion], width: int, ramp: bool = True) -> list[float]:
    """Generated tokens/s of a pass's windows, in order.

    Where the layout refills its slots as they free (``ramp``), the steady state runs from the
    ``width``-th finish (the ramp-up: every slot started at once) to the ``width``-th last
    (then the queue is empty and slots drain: the tail); where it runs static batches, every
    batch starts from empty, so the whole pass is its steady state. It is cut into as many
    equal windows of time as it holds `window_size` finishes. Each request's
    tokens are spread evenly from its first token to its finish, so a window counts the
    tokens generated in it, not those of the requests that happen to end in it (which, with
    answers of different lengths, swings from window to window). Empty when the pass is too
    short for one window, or a backend gave no finish times.
    """
    answered = [c for c in completions if c.error is None]
    if any(c.finished_at is None for c in answered):
        return []
    ends = sorted(c.finished_at for c in answered)
    count = (len(ends) - 2 * width * ramp) // window_size(width)
    if count < 1:
        return []
    if ramp:
        began, ended = ends[width - 1], ends[len(ends) - width - 1]
    else:
        began, ended = min(c.finished_at - c.latency_s for c in answered), ends[-1]
    if ended <= began:
        return []
    spans = [(_first_token_at(c), c.finished_at, len(c.token_ids)) for c in answered]
    step = (ended - began) / count
    rates: list[float] = []
    for index in range(count):
        low, high = began + index * step, began + (index + 1) * step
        rates.append(sum((_tokens_between(span, low, high) for span in spans), 0.0) / step)
    return rates


def _first_token_at(completion: Completion) -> float:
    """When a request's first token came (its start where the backend cannot see that)."""
    started = completion.finished_at - completion.latency_s
    return started + (completion.ttft_s or 0.0)


def _tokens_between(span: tuple[float, float, int], low: float, high: float) -> float:
    """The share of a request's tokens generated between ``low`` and ``high``, its ``count``
    tokens spread evenly over [first token, finish]."""
    first, finished, count = span
    if finished <= first:  # all at once
        return float(count) if low < finished <= high else 0.0
    overlap = min(high, finished) - max(low, first)
    return count * max(0.0, overlap) / (finished - first)


def steady_tokens_per_s(
    completions: Sequence[Completion], width: int, ramp: bool = True
) -> float | None:
    """Generated tokens/s over all of a pass's windows together (None: no window)."""
    return _whole(windows(completions, width, ramp))


def _whole(rates: Sequence[float]) -> float | None:
    """Windows of equal span taken together: their mean (None: no window)."""
    return statistics.fmean(rates) if rates else None


@dataclass(kw_only=True)
class RunResult:
    """A measured configuration: summary figures, raw samples, provenance, completions."""

    config: dict
    model: str
    workload: str
    prompts: int  # requests per timed pass
    repeats: int  # timed passes run
    pacing: dict
    load_time_s: float
    # Generated tokens/s in the steady state: the mean of the last WINDOWS windows (of every
    # pass's, in order; equal spans, so the mean is their tokens over their time), or of the
    # passes' where they are too short for windows. Not the median: a window holding a long
    # prompt's prefill is slow, and the user's job pays for those prompts too.
    tokens_per_s: float
    windows: list[float]  # every window's tokens/s, in order (the passes' if none)
    steady: bool  # tokens_per_s comes from windows (not whole passes with ramp-up and tail)
    pass_tokens_per_s: float  # whole passes, ramp-up and tail included, median
    window_spread: float  # relative spread of the last WINDOWS windows
    stable: bool  # that spread is under STABLE_SPREAD, over WINDOWS windows
    requests_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tpot_p50_s: float | None  # time per output token after the first, median over requests
    prefill_tokens_per_s: float  # prompt tokens really computed / wall time, median
    peak_memory_bytes: int
    peak_rss_bytes: int
    cpu_utilisation: float
    failed_requests: int
    tokens_per_s_summary: dict  # of the windows the figure comes from
    samples: list[dict]
    warnings: list[str]
    provenance: dict
    details: dict = field(default_factory=dict)  # what the backend chose (e.g. the layer split)
    # On a GPU host: peak bytes the tree held per GPU index (str keys: JSON) and the mean
    # utilisation of those GPUs over the run (0-1), from nvidia-smi.
    peak_gpu_memory_bytes: dict = field(default_factory=dict)
    gpu_utilisation: float | None = None
    agreement: dict | None = None  # with a reference run, where one was asked for
    completions: list[Completion] = field(default_factory=list, repr=False)

    def to_dict(self, completions: bool = False) -> dict:
        """JSON-ready dict; completions only when asked (they can be large)."""
        data = asdict(self)
        data.pop("completions")
        if completions:
            data["completions"] = [c.to_dict() for c in self.completions]
        return data

    def answers(self) -> dict[str, list[int]]:
        """The last pass's generated tokens by request id, for the agreement with a
        reference run (`autotune.agreement`)."""
        return {c.id: list(c.token_ids) for c in self.completions if c.error is None}


def _prefill_tokens(completion: Completion) -> int:
    """Prompt tokens a request really computed (all of them where the backend has no cache)."""
    if completion.prefill_tokens is not None:
        return completion.prefill_tokens
    return completion.prompt_tokens


def width_of(config: TrialConfig) -> int:
    """Requests a layout runs at once: every process's batch."""
    return max(1, config.processes * config.batch_size)


def refills(config: TrialConfig) -> bool:
    """Whether the layout's backend refills a slot as soon as it frees (continuous batching:
    a pass has a ramp-up and a tail) rather than running static batches."""
    return backend_class(config.backend).continuous_batching


def timed_pass(backend, workload: Workload, config: TrialConfig, usable_cpus: int):
    """One timed pass of ``workload``: (its sample, its completions)."""
    width, ramp = width_of(config), refills(config)
    cpu_before = tree_cpu_seconds()
    start = time.monotonic()
    completions = backend.generate(workload.prompts, config.generation)
    wall_s = time.monotonic() - start
    cpu_s = tree_cpu_seconds() - cpu_before
    answered = [c for c in completions if c.error is None]
    tokens = sum(len(c.token_ids) for c in answered)
    prefill = sum(_prefill_tokens(c) for c in answered)
    ttfts = [c.ttft_s for c in answered if c.ttft_s is not None]
    rates = windows(completions, width, ramp)
    sample = {
        "wall_s": wall_s,
        "generated_tokens": tokens,
        "prefill_tokens": prefill,
        "tokens_per_s": tokens / wall_s,
        "windows": rates,
        "steady_tokens_per_s": _whole(rates),
        "prefill_tokens_per_s": prefill / wall_s,
        "requests_per_s": len(completions) / wall_s,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "cpu_utilisation": cpu_s / (wall_s * usable_cpus),
    }
    return sample, completions


def pass_figure(sample: dict) -> float:
    """A pass's tokens/s: the mean of its windows, or the whole pass where it has none."""
    return sample["steady_tokens_per_s"] or sample["tokens_per_s"]


def series(samples: Sequence[dict]) -> list[float]:
    """The windows of every pass in order; the whole passes' rates where none has windows."""
    found = [rate for s in samples for rate in s["windows"]]
    return found or [s["tokens_per_s"] for s in samples]


def settled(rates: Sequence[float]) -> bool:
    """Whether the last `WINDOWS` rates agree within `STABLE_SPREAD`."""
    return len(rates) >= WINDOWS and relative_spread(rates[-WINDOWS:]) <= STABLE_SPREAD


def warm_up(backend, workload: Workload, config: TrialConfig, passes: int) -> None:
    """Untimed passes of one wave each: every worker and slot sees a prompt, pages are touched
    and thread pools started before timing."""
    for _ in range(passes):
        backend.generate(workload.prompts[: width_of(config)], config.generation)


def benchmark(
    config: TrialConfig,
    workload: Workload,
    model: ModelSpec,
    topology: Topology,
    pacing: Pacing | None = None,
    *,
    on_progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Load ``config``'s backend once, warm it up, then time passes over ``workload`` (cycled
    to ``pacing``'s pass size) until the pacing says the measurement is done."""
    pacing = pacing or Pacing()
    say = on_progress or (lambda message: None)
    width, ramp = width_of(config), refills(config)
    prompts = pacing.pass_of(workload, width, ramp)
    backend = create_backend(config, model, topology)
    samples: list[dict] = []
    latencies: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    completions: list[Completion] = []
    with TreeSampler(gpus=bool(topology.gpus)) as memory:
        started = time.monotonic()
        say("loading")
        with backend:
            load_time_s = time.monotonic() - started
            memory.sample()
            for index in range(pacing.warmup):
                say(f"warmup {index + 1}/{pacing.warmup}")
                warm_up(backend, prompts, config, 1)
            timed_from = time.monotonic()
            while len(samples) < pacing.repeats or (
                pacing.settle_s
                and time.monotonic() - timed_from < pacing.settle_s
                and not settled(series(samples))
            ):
                number = len(samples) + 1
                say(
                    f"timed pass {number}"
                    + (f"/{pacing.repeats}" if number <= pacing.repeats else ", settling")
                    + f" ({len(prompts)} prompts)"
                )
                sample, completions = timed_pass(backend, prompts, config, topology.usable_cpus)
                memory.sample()
                samples.append(sample)
                answered = [c for c in completions if c.error is None]
                latencies.extend(c.latency_s for c in answered)
                ttfts.extend(c.ttft_s for c in answered if c.ttft_s is not None)
                tpots.extend(
                    (c.latency_s - c.ttft_s) / (len(c.token_ids) - 1)
                    for c in answered
                    if c.ttft_s is not None and len(c.token_ids) > 1
                )
            details = backend.details()

    rates = series(samples)
    steady = any(s["windows"] for s in samples)
    last = rates[-WINDOWS:]
    spread = relative_spread(last)
    failed = [c for c in completions if c.error is not None]
    warnings = []
    if not steady:
        warnings.append(
            f"no steady state: a pass of {len(prompts)} prompts at {width} at once is too short "
            f"for one window (it needs {pass_prompts(width, ramp)}); the figure includes each "
            "pass's ramp-up and tail; leave out --prompts/--limit or raise them"
        )
    if not settled(rates):
        warnings.append(
            f"not shown stable: the last {len(last)} {'windows' if steady else 'passes'} spread "
            f"by {spread:.0%} (limit {STABLE_SPREAD:.0%} over {WINDOWS})"
            + (f" after {pacing.settle_s:.0f} s of settling" if pacing.settle_s else "")
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
        prompts=len(prompts),
        repeats=len(samples),
        pacing=pacing.to_dict(),
        load_time_s=load_time_s,
        tokens_per_s=statistics.fmean(last),
        windows=rates,
        steady=steady,
        pass_tokens_per_s=statistics.median(s["tokens_per_s"] for s in samples),
        window_spread=spread,
        stable=settled(rates),
        requests_per_s=statistics.median(s["requests_per_s"] for s in samples),
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        tpot_p50_s=percentile(tpots, 50),
        prefill_tokens_per_s=statistics.median(s["prefill_tokens_per_s"] for s in samples),
        peak_memory_bytes=memory.peak_pss_bytes,
        peak_rss_bytes=memory.peak_rss_bytes,
        cpu_utilisation=statistics.median(s["cpu_utilisation"] for s in samples),
        failed_requests=len(failed),
        tokens_per_s_summary=summarize(last).to_dict(),
        samples=samples,
        warnings=warnings,
        provenance={**provenance(topology), "pid": os.getpid()},
        details=details,
        peak_gpu_memory_bytes={str(g): b for g, b in sorted(memory.peak_gpu_bytes.items())},
        gpu_utilisation=memory.gpu_utilisation,
        completions=completions,
    )
