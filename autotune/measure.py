"""One way to measure every backend: load once, warm up, time passes, keep every raw sample.

- Throughput is the steady state of the user's job: each timed pass cycles the workload to
  enough requests that the layout's every slot is refilled again and again (`Pacing`); the
  finishes between the ramp-up (the first wave) and the tail (the last wave) are cut into
  windows, and a pass's figure is the mean of its windows (`autotune.passes`). Every pass
  holds the same requests, so passes compare like for like: the figure is the mean of the
  last passes with its interval, stable when they agree; passes go on (``settle_s``) until
  they do, for the layouts whose first passes are slow. Load time is its own figure.
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
from autotune.errors import BackendError
from autotune.models import ModelSpec
from autotune.passes import (
    BALANCED_PROMPTS,
    MIN_WINDOW,
    STABLE_SPREAD,
    WINDOWS,
    Sample,
    estimate,
    pass_prompts,
    settled,
    window_size,
    windows,
)
from autotune.provenance import provenance
from autotune.quality import ReferenceScores, score_layout, score_reference
from autotune.stats import percentile, relative_spread, summarize
from autotune.topology import Topology
from autotune.workload import Workload
from backends import backend_class, create_backend
from backends.base import Completion

__all__ = [
    "Pacing",
    "RunResult",
    "TreeSampler",
    "benchmark",
    "settles",
    "spent_prompts",
    "tail_from",
    "timed_pass",
    "pair_warmup_waves",
    "warmed_by_ramp",
]


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
    each pass by the layout, `pass_prompts`: a ramp-up wave, ``windows`` windows and a tail,
    so the largest batch is filled again and again. ``warmup``: untimed passes of one wave.
    ``repeats``: timed passes at least. ``settle_s``: more passes, until the last
    `STABLE_PASSES` agree within `STABLE_SPREAD`, while the timed passes have run less than
    this; for every layout, or (``settle_on_cpu`` False) only for those that compute on a GPU,
    whose first passes are the slow ones (`settles`).
    """

    prompts: int | None = None
    warmup: int = 1
    repeats: int = 1
    settle_s: float = 0.0
    settle_on_cpu: bool = True
    windows: int = WINDOWS
    # End each timed pass when its last window closes, stopping what still runs (its tail),
    # where the backend can (`Backend.cuts_tail`). The sweep's trials and pairs do: on 2 vCPUs
    # a one-window pass of a batched layout reads 11-17% lower cut than run to its end, whose
    # window is credited tokens generated in the tail (`experiments/bench_tail.py`,
    # docs/backends.md), and so does `verify`, which checks their figures; `bench`, over three
    # windows, runs it to its end.
    cut_tail: bool = False

    def pass_prompts(self, width: int, ramp: bool = True) -> int:
        """Requests per timed pass for a layout running ``width`` requests at once (``ramp``:
        whether its slots are refilled as they free, see `refills`)."""
        return self.prompts or pass_prompts(width, ramp, self.windows)

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

    @classmethod
    def from_dict(cls, data: dict | None) -> Pacing:
        """The pacing `to_dict` wrote (a result's ``pacing``); the default where none was
        (a record written before results carried it)."""
        return cls(**data) if data else cls()


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
    # Generated tokens/s in the steady state: the mean of the last STABLE_PASSES passes'
    # figures, each the mean of its windows (equal spans, so their tokens over their time), or
    # its whole tokens/s where it is too short for windows. Not the median: a window holding a
    # long prompt's prefill is slow, and the user's job pays for those prompts too.
    tokens_per_s: float
    # Its 95% interval over those passes (None with one pass).
    tokens_per_s_low: float | None
    tokens_per_s_high: float | None
    windows: list[float]  # every window's tokens/s, in order (the passes' if none)
    steady: bool  # tokens_per_s comes from windows (not whole passes with ramp-up and tail)
    pass_tokens_per_s: float  # whole passes, ramp-up and tail included, median
    window_spread: float  # relative spread of the last pass's windows (different prompts)
    pass_spread: float | None  # relative spread of the last STABLE_PASSES passes
    # Those passes (the same requests each) agree within STABLE_SPREAD; None: one pass.
    stable: bool | None
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
    tokens_per_s_summary: dict  # of the last pass's windows
    samples: list[Sample]
    warnings: list[str]
    provenance: dict
    details: dict = field(default_factory=dict)  # what the backend chose (e.g. the layer split)
    # On a GPU host: peak bytes the tree held per GPU index (str keys: JSON) and the mean
    # utilisation of those GPUs over the run (0-1), from nvidia-smi.
    peak_gpu_memory_bytes: dict = field(default_factory=dict)
    gpu_utilisation: float | None = None
    agreement: dict | None = None  # with a reference run, where one was asked for
    stopped: str | None = None  # why it stopped before its pacing was done (`clearly_below`)
    # Per-token agreement with a reference by teacher forcing (`autotune.quality.Quality`),
    # where one was given; a reference run's own scored answers, where asked to keep them.
    quality: dict | None = None
    reference_scores: dict | None = field(default=None, repr=False)
    completions: list[Completion] = field(default_factory=list, repr=False)

    def to_dict(self, completions: bool = False) -> dict:
        """JSON-ready dict; completions only when asked (they can be large)."""
        data = asdict(self)
        data.pop("completions")
        data["samples"] = [sample.to_dict() for sample in self.samples]
        if completions:
            data["completions"] = [c.to_dict() for c in self.completions]
        return data

    def answers(self) -> dict[str, list[int]]:
        """The last pass's generated tokens by request id, for the agreement with a
        reference run (`autotune.agreement`)."""
        return {c.id: list(c.token_ids) for c in self.completions if c.answered}


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


def settles(config: TrialConfig, topology: Topology, pacing: Pacing) -> bool:
    """Whether a measurement of ``config`` goes on past its repeats until its passes agree:
    with a ``settle_s``, for every layout, or only for those computing on a GPU (whose first
    passes are slow: kernels compiled, memory pools grown) where ``settle_on_cpu`` is off."""
    if not pacing.settle_s:
        return False
    if pacing.settle_on_cpu:
        return True
    return any(d.is_gpu for d in backend_class(config.backend).placement(config, topology))


def warmed_by_ramp(config: TrialConfig, topology: Topology, pacing: Pacing) -> bool:
    """Whether a sweep's measurement of ``config`` (a search trial, a side of a pair) needs no
    warmup wave: its layout refills its slots, so each pass opens with a ramp-up wave that
    runs every slot before the window is timed, and it does not settle (a GPU layout's first
    passes are slow beyond one wave). On 2 vCPUs the warmup wave was a third of a batch-1
    trial's time after its load and moved its figure less than its noise
    (`experiments/bench_warmup.py`, docs/results/dev-2vcpu-epyc.md); for a wide layout it is
    a third of the requests of its side of a short pair (warmup, ramp-up and window waves)."""
    return refills(config) and not settles(config, topology, pacing)


def pair_warmup_waves(config: TrialConfig, topology: Topology, pacing: Pacing) -> int:
    """Untimed waves ``config``'s side of a paired re-measurement runs after its load: none
    where its passes warm it (`warmed_by_ramp`), else the pacing's, at least one (a pair's
    first pass must not be a cold one on one side only)."""
    return 0 if warmed_by_ramp(config, topology, pacing) else max(1, pacing.warmup)


def timed_pass(
    backend, workload: Workload, config: TrialConfig, usable_cpus: int, cut: bool = False
):
    """One timed pass of ``workload``: (its `Sample`, its completions); with ``cut``, it ends
    when its last window closes (`Pacing.cut_tail`)."""
    width, ramp = width_of(config), refills(config)
    cpu_before = tree_cpu_seconds()
    start = time.monotonic()
    cut_after = tail_from(len(workload.prompts), width, ramp) if cut else None
    completions = backend.generate_pass(workload.prompts, config.generation, cut_after)
    wall_s = time.monotonic() - start
    cpu_s = tree_cpu_seconds() - cpu_before
    # Requests cut with the pass's tail count their tokens; they have no latency or finish.
    ran = [c for c in completions if c.error is None]
    tokens = sum(len(c.token_ids) for c in ran)
    prefill = sum(_prefill_tokens(c) for c in ran)
    ttfts = [c.ttft_s for c in ran if c.answered and c.ttft_s is not None]
    sample = Sample(
        wall_s=wall_s,
        generated_tokens=tokens,
        prefill_tokens=prefill,
        tokens_per_s=tokens / wall_s,
        windows=tuple(windows(completions, width, ramp)),
        prefill_tokens_per_s=prefill / wall_s,
        requests_per_s=sum(not c.cut for c in completions) / wall_s,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        cpu_utilisation=cpu_s / (wall_s * usable_cpus),
    )
    return sample, completions


def tail_from(count: int, width: int, ramp: bool) -> int | None:
    """After how many finishes a pass of ``count`` requests has closed its last window, what
    runs after it being its tail (`autotune.passes.windows`: the steady state ends at the
    ``width``-th last finish, when the queue is empty): for a layout that refills its slots,
    in a pass with a window. None where the whole pass is measured."""
    if not ramp or (count - 2 * width) // window_size(width) < 1:
        return None
    return count - width


def spent_prompts(config: TrialConfig, pacing: Pacing, count: int | None = None) -> int:
    """The requests a timed pass of ``config`` (``count`` of them, else as ``pacing`` sizes
    it) spends its time on: all of them, or, where the pass is cut (``pacing.cut_tail`` and a
    backend that cuts, `Backend.cuts_tail`), those up to its last window (`tail_from`). What
    the sweep prices a pass by: a cut pass of a batched layout takes 11-15% less time."""
    width, ramp = width_of(config), refills(config)
    if count is None:
        count = pacing.pass_prompts(width, ramp)
    if pacing.cut_tail and backend_class(config.backend).cuts_tail:
        return tail_from(count, width, ramp) or count
    return count


def clearly_below(samples: Sequence[Sample], bar: float, settling: bool = False) -> str | None:
    """Why a measurement can stop now, its layout clearly slower than ``bar`` (the leader's
    lower bound), or None. Its upper bound: the 95% interval's top over its last passes, or,
    after one pass, its fastest window (the pass's figure is their mean, so never above it).
    A ``settling`` layout's first pass (a GPU's, slow while kernels compile and pools grow)
    is left out: a fast layout would be stopped for it."""
    counted = samples[1:] if settling else samples
    if not counted:
        return None
    found = estimate([s.figure for s in counted])
    upper = found.high if found.high is not None else max(counted[-1].windows or (found.mean,))
    if upper >= bar:
        return None
    return (
        f"its upper bound, {upper:.1f} tokens/s after {len(samples)} pass(es), is under the "
        f"leader's lower bound, {bar:.1f}"
    )


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
    stop_below: float | None = None,
    quality_reference: ReferenceScores | None = None,
    keep_reference: bool = False,
) -> RunResult:
    """Load ``config``'s backend once, warm it up, then time passes over ``workload`` (cycled
    to ``pacing``'s pass size) until the pacing says the measurement is done, or (with
    ``stop_below``, the leader's lower bound in a sweep) until the layout is clearly slower
    than that (`clearly_below`: the result says why it ``stopped``). After the timed passes,
    untimed: with ``quality_reference``, the layout's answers are scored against it by
    teacher forcing (`autotune.quality`); with ``keep_reference``, its own answers are scored
    to serve as one."""
    pacing = pacing or Pacing()
    say = on_progress or (lambda message: None)
    width, ramp = width_of(config), refills(config)
    prompts = pacing.pass_of(workload, width, ramp)
    backend = create_backend(config, model, topology)
    samples: list[Sample] = []
    settle = settles(config, topology, pacing)
    latencies: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    completions: list[Completion] = []
    stopped = None
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

            def more() -> bool:  # another pass: the repeats, then settling
                return len(samples) < pacing.repeats or (
                    settle
                    and time.monotonic() - timed_from < pacing.settle_s
                    and not settled([s.figure for s in samples])
                )

            while more():
                number = len(samples) + 1
                say(
                    f"timed pass {number}"
                    + (f"/{pacing.repeats}" if number <= pacing.repeats else ", settling")
                    + f" ({len(prompts)} prompts)"
                )
                sample, completions = timed_pass(
                    backend, prompts, config, topology.usable_cpus, pacing.cut_tail
                )
                memory.sample()
                samples.append(sample)
                answered = [c for c in completions if c.answered]
                latencies.extend(c.latency_s for c in answered)
                ttfts.extend(c.ttft_s for c in answered if c.ttft_s is not None)
                tpots.extend(
                    (c.latency_s - c.ttft_s) / (len(c.token_ids) - 1)
                    for c in answered
                    if c.ttft_s is not None and len(c.token_ids) > 1
                )
                if stop_below is not None and more():
                    if stopped := clearly_below(samples, stop_below, settle):
                        break
            scored = _scored(
                backend, config, prompts, completions, quality_reference, keep_reference
            )
            details = backend.details()

    figures = [s.figure for s in samples]
    found = estimate(figures)
    steady = all(s.windows for s in samples)
    rates = [rate for s in samples for rate in s.windows] or figures
    last = list(samples[-1].windows) or figures[-1:]
    failed = [c for c in completions if c.error is not None]
    quality, reference_scores, unscored = scored
    warnings = [unscored] if unscored else []
    if not steady:
        warnings.append(
            f"no steady state: a pass of {len(prompts)} prompts at {width} at once is too short "
            f"for one window (it needs {pass_prompts(width, ramp, pacing.windows)}); the figure "
            "includes each pass's ramp-up and tail; leave out --prompts/--limit or raise them"
        )
    if found.stable is False:
        warnings.append(
            f"not shown stable: the last {found.passes} passes (the same requests each) spread "
            f"by {found.spread:.0%} (limit {STABLE_SPREAD:.0%})"
            + (f" after {pacing.settle_s:.0f} s of settling" if settle else "")
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
        tokens_per_s=found.mean,
        tokens_per_s_low=found.low,
        tokens_per_s_high=found.high,
        windows=rates,
        steady=steady,
        pass_tokens_per_s=statistics.median(s.tokens_per_s for s in samples),
        window_spread=relative_spread(last),
        pass_spread=found.spread,
        stable=found.stable,
        requests_per_s=statistics.median(s.requests_per_s for s in samples),
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        tpot_p50_s=percentile(tpots, 50),
        prefill_tokens_per_s=statistics.median(s.prefill_tokens_per_s for s in samples),
        peak_memory_bytes=memory.peak_pss_bytes,
        peak_rss_bytes=memory.peak_rss_bytes,
        cpu_utilisation=statistics.median(s.cpu_utilisation for s in samples),
        failed_requests=len(failed),
        tokens_per_s_summary=summarize(last).to_dict(),
        samples=samples,
        warnings=warnings,
        provenance={**provenance(topology), "pid": os.getpid()},
        details=details,
        peak_gpu_memory_bytes={str(g): b for g, b in sorted(memory.peak_gpu_bytes.items())},
        gpu_utilisation=memory.gpu_utilisation,
        stopped=stopped,
        quality=None if quality is None else quality.to_dict(),
        reference_scores=None if reference_scores is None else reference_scores.to_dict(),
        completions=completions,
    )


def _scored(backend, config, prompts: Workload, completions, reference, keep: bool):
    """(its `Quality` against ``reference``, its own `ReferenceScores` where ``keep``, a
    warning where the backend cannot score): nothing is guessed where it cannot."""
    if reference is None and not keep:
        return None, None, None
    try:
        texts = {p.id: p.text for p in prompts.prompts}
        own = score_reference(backend, config.generation, completions, texts) if keep else None
        found = score_layout(backend, config.generation, reference) if reference else None
    except BackendError as error:
        return None, None, f"quality not measured: {error}"
    return found, own, None
