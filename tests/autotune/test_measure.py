"""The measuring harness on the fake backend, and PSS accounting of a process tree."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from autotune.config import TrialConfig
from autotune.measure import Pacing, TreeSampler, benchmark, clearly_below, tree_memory
from autotune.workload import DEFAULT_WORKLOAD, TINY_WORKLOAD, load_workload
from backends.fake import modelled_tokens_per_s


def test_benchmark_keeps_raw_samples_and_follows_the_fake_speed(tiny_gguf, topology):
    config = TrialConfig(backend="fake", workers=2, batch_size=4)
    workload = load_workload(TINY_WORKLOAD)
    result = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=3))
    assert len(result.samples) == 3 and result.repeats == 3
    # each pass: the 6 prompts cycled to a ramp-up wave (8), 3 windows of 8 and a tail (8)
    assert result.prompts == 2 * 8 + 3 * 8 and result.steady
    assert len(result.windows) == 9 and all(len(s.windows) == 3 for s in result.samples)
    expected = modelled_tokens_per_s(2, 1, 4, topology.usable_cpus, topology.physical_cores)
    # the fake sleeps for the modelled time; measuring adds a little on top, never removes
    assert 0.7 * expected < result.tokens_per_s <= expected * 1.05
    assert result.pass_tokens_per_s <= expected * 1.01
    assert result.latency_p50_s is not None and result.load_time_s >= 0
    assert result.peak_memory_bytes > 0
    data = result.to_dict()
    for key in (
        "tokens_per_s",
        "windows",
        "window_spread",
        "stable",
        "requests_per_s",
        "latency_p50_s",
        "latency_p95_s",
        "load_time_s",
        "peak_memory_bytes",
        "samples",
        "provenance",
    ):
        assert key in data
    for key in ("prefill_tokens", "tokens_per_s", "prefill_tokens_per_s", "ttft_p50_s"):
        assert all(sample[key] is not None for sample in data["samples"]), key
    assert data["provenance"]["versions"]["autotune"] is not None
    assert "completions" not in data and len(result.completions) == result.prompts


def test_a_pass_too_short_for_a_window_says_so(tiny_gguf, topology):
    config = TrialConfig(backend="fake", batch_size=4)
    result = benchmark(
        config, load_workload(TINY_WORKLOAD), tiny_gguf, topology, Pacing(prompts=6, repeats=2)
    )
    assert not result.steady and result.windows == [s.tokens_per_s for s in result.samples]
    assert any("no steady state" in w and "needs 20" in w for w in result.warnings)


def test_oversubscription_is_warned(tiny_gguf, topology):
    config = TrialConfig(backend="fake", workers=topology.usable_cpus + 1)
    result = benchmark(config, load_workload(TINY_WORKLOAD), tiny_gguf, topology)
    assert any("exceeds" in w for w in result.warnings)


CHILD = """
import mmap, sys, time
with open(sys.argv[1], "rb") as f:
    data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    total = sum(data[i] for i in range(0, len(data), 4096))  # touch every page
    print("ready", flush=True)
    time.sleep(30)
"""


def test_pss_counts_shared_file_pages_once(tmp_path):
    size = 64 * 2**20
    shared = tmp_path / "weights.bin"
    shared.write_bytes(bytes([1]) * size)
    before_pss, before_rss = tree_memory()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(shared)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        with TreeSampler(interval_s=0.05) as sampler:
            time.sleep(0.2)
        pss = sampler.peak_pss_bytes - before_pss
        rss = sampler.peak_rss_bytes - before_rss
    finally:
        for child in children:
            child.kill()
            child.wait()
    # two processes map the same 64 MiB: RSS counts it twice, PSS once
    assert rss > 1.8 * size
    assert pss < 1.4 * size


# ---------------------------------------------------------------- steady state (issue 12)


def _done(at: float, tokens: int = 10, error: str | None = None, latency: float = 1.0):
    from backends.base import Completion

    return Completion(
        id=f"r{at}",
        text="",
        token_ids=tuple(range(tokens)),
        prompt_tokens=5,
        worker_rank=0,
        latency_s=latency,
        finished_at=at,
        error=error,
    )


def test_windows_leave_out_the_first_and_the_last_wave():
    from autotune.passes import steady_tokens_per_s, windows

    # Width 2, so a window holds MIN_WINDOW = 4 finishes: 10 finishes make one window. The
    # ramp-up ends at the 2nd finish (t=1), the tail starts at the 2nd-last (t=8); each request
    # generated its 10 tokens evenly over the second before it finished, so [1, 8] holds the
    # tokens of the requests ending at 2, 3, 5, 6, 7 and 8: 60 tokens in 7 s.
    times = [0.5, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.5, 30.0]
    completions = [_done(t) for t in times]
    assert windows(completions, width=2) == pytest.approx([60 / 7])
    assert steady_tokens_per_s(completions, width=2) == pytest.approx(60 / 7)
    assert windows(completions[:7], width=2) == [], "no room for a window"
    assert steady_tokens_per_s(completions[:7], width=2) is None
    # Waves of 8 finishing together, a second apart: 3 windows of one second, 80 tokens each.
    wave = [_done(t) for t in [1.0] * 8 + [2.0] * 8 + [3.0] * 8 + [4.0] * 8 + [5.0] * 8]
    assert windows(wave, width=8) == pytest.approx([80.0, 80.0, 80.0])
    # A window counts the tokens generated in it, not those of the requests ending in it: the
    # long request (40 tokens over [1, 5]) gives 35 to the first window [1, 4.5] and 5 to the
    # second [4.5, 8]; the one ending at 5 splits 5 / 5.
    spread = [_done(1.0), _done(1.0), *[_done(t) for t in (2, 3, 4, 5, 6, 7, 8, 9, 9)]]
    spread.append(_done(5.0, tokens=40, latency=4.0))
    assert windows(spread, width=2) == pytest.approx([70 / 3.5, 40 / 3.5])
    # Static batches (ramp=False) start from empty: no ramp-up or tail to leave out, the whole
    # pass from the first start is cut into windows (3 batches of 4, a second each).
    static = [_done(t) for t in [1.0] * 4 + [2.0] * 4 + [3.0] * 4]
    assert windows(static, width=4, ramp=False) == pytest.approx([40.0, 40.0, 40.0])
    # Failed requests are left out; a backend without finish times has no windows.
    failed = completions + [_done(4.0, error="too long")]
    assert windows(failed, width=2) == pytest.approx([60 / 7])
    from dataclasses import replace

    assert windows([replace(c, finished_at=None) for c in completions], width=2) == []


def test_a_pass_cut_at_its_last_window_measures_the_same_windows_sooner(tiny_gguf, topology):
    from autotune.measure import timed_pass
    from backends import create_backend

    config = TrialConfig(backend="fake", workers=2, batch_size=4)
    prompts = Pacing(windows=1).pass_of(load_workload(TINY_WORKLOAD), 8)  # 8 + 8 + 8
    with create_backend(config, tiny_gguf, topology) as backend:
        full, whole = timed_pass(backend, prompts, config, topology.usable_cpus)
        cut, stopped = timed_pass(backend, prompts, config, topology.usable_cpus, cut=True)
    assert not any(c.cut for c in whole)
    # The window ends at the 16th finish, when the queue is empty; what runs on is the tail:
    # stopped there, marked, with the tokens it had. The window's figure is the same, but for
    # the two passes' own timing on a shared machine (2.4% apart once in CI on a slow day);
    # the tail it must not credit made a batched layout 10-17% too fast (bench_tail.py).
    assert len(full.windows) == len(cut.windows) == 1
    assert cut.windows == pytest.approx(full.windows, rel=0.05)
    assert sum(c.cut for c in stopped) == 8 and not any(c.cut for c in stopped[:8])
    assert all(
        len(c.token_ids) < len(w.token_ids) for c, w in zip(stopped, whole, strict=True) if c.cut
    )

    def span(completions):  # first start to last finish, on the fake's modelled clock
        return max(c.finished_at for c in completions) - min(
            c.finished_at - c.latency_s for c in completions
        )

    # The pass ends a wave sooner: two of its three waves' time (the answers are alike).
    assert span(stopped) < 0.8 * span(whole)


def test_a_cut_pass_is_priced_by_the_requests_up_to_its_last_window():
    from autotune.measure import spent_prompts

    llama = TrialConfig(backend="llamacpp", batch_size=4)
    cut = Pacing(windows=1, cut_tail=True)
    whole = cut.pass_prompts(4)
    assert spent_prompts(llama, cut) == whole - 4, "its tail, the last 4 requests, is cut"
    assert spent_prompts(llama, Pacing(windows=1)) == whole
    # hf runs static batches: no tail to cut, every request is spent.
    hf = TrialConfig(backend="hf", batch_size=4)
    assert spent_prompts(hf, cut) == cut.pass_prompts(4, ramp=False)
    # A pass too short for a window is measured whole.
    assert spent_prompts(llama, cut, count=8) == 8


def test_a_balanced_workload_spreads_long_prompts_over_its_blocks():
    from autotune.workload import load_workload

    workload = load_workload()
    balanced = workload.balanced(4)
    assert sorted(p.id for p in balanced.prompts) == sorted(p.id for p in workload.prompts)

    def spread(prompts, size):  # max / min text per run of `size` consecutive prompts
        runs = [sum(len(p.text) for p in prompts[i : i + size]) for i in range(0, 64, size)]
        return max(runs) / min(runs)

    # the shipped file puts long prompts first: runs of 16 differ by more than 2x; balanced,
    # by less than 1.3x
    assert spread(workload.prompts, 16) > 2.0 and spread(balanced.prompts, 16) < 1.3


def test_pass_sizes_hold_three_windows():
    from autotune.measure import Pacing
    from autotune.passes import pass_prompts

    assert pass_prompts(1) == 2 + 3 * 4  # small layouts: windows of 4 finishes
    assert pass_prompts(16) == 32 + 3 * 16
    assert pass_prompts(4, ramp=False) == 3 * 4  # static batches: 3 windows, nothing else
    assert Pacing(prompts=50).pass_prompts(16) == 50


def test_relative_spread():
    from autotune.stats import relative_spread

    assert relative_spread([100.0, 104.0, 98.0]) == pytest.approx(6 / 100)
    assert relative_spread([5.0]) == 0.0


def test_a_cycled_workload_repeats_prompts_under_new_ids():
    from autotune.workload import TINY_WORKLOAD, load_workload

    tiny = load_workload(TINY_WORKLOAD)
    cycled = tiny.cycled(14)
    assert len(cycled) == 14 and len({p.id for p in cycled.prompts}) == 14
    assert [p.text for p in cycled.prompts[6:12]] == [p.text for p in tiny.prompts]
    assert cycled.prompts[7].id == f"{tiny.prompts[1].id}~1"


def test_bench_settles_until_the_passes_agree(cli):
    import json

    from autotune.workload import TINY_WORKLOAD

    result = cli(
        "bench",
        "--backend",
        "fake",
        "--batch-size",
        "2",
        "--workload",
        str(TINY_WORKLOAD),
        "--prompts",
        "24",
        "--repeats",
        "1",
        "--settle",
        "30s",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["prompts"] == 24 and len(data["windows"]) >= 3  # 5 windows of 4 per pass
    assert data["stable"] is True and data["pass_spread"] <= 0.05 and data["steady"]
    assert data["tokens_per_s_low"] <= data["tokens_per_s"] <= data["tokens_per_s_high"]
    assert all(s["steady_tokens_per_s"] for s in data["samples"])
    assert len({s["prefill_tokens"] for s in data["samples"]}) == 1


def quadratic_balanced(prompts, block):
    """The first `Workload.balanced`, every block scanned for each prompt: the reference kept
    in experiments/bench_workload.py (loaded by path: experiments/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "bench_workload.py"
    spec = importlib.util.spec_from_file_location("bench_workload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [p.id for p in module.quadratic(prompts, block)]


@pytest.mark.parametrize("seed", range(5))
def test_balancing_keeps_the_order_of_the_quadratic_reference(seed):
    import random
    from dataclasses import replace

    from autotune.workload import Prompt, Workload

    rng = random.Random(seed)
    # Many ties (lengths from a short range), blocks left part-full at the end.
    prompts = tuple(
        Prompt(id=str(i), text="x" * rng.randint(1, 12), record={})
        for i in range(rng.randint(1, 300))
    )
    workload = replace(load_workload(DEFAULT_WORKLOAD), prompts=prompts)
    for block in (1, 3, 4, 16):
        assert [p.id for p in Workload.balanced(workload, block).prompts] == quadratic_balanced(
            prompts, block
        )


def test_a_pass_draws_from_the_head_of_a_long_file_the_same_for_every_width():
    from dataclasses import replace

    from autotune.passes import BALANCED_PROMPTS
    from autotune.workload import Prompt

    prompts = tuple(
        Prompt(id=f"p{i}", text="word " * (1 + i % 97), record={})
        for i in range(BALANCED_PROMPTS * 3)
    )
    workload = replace(load_workload(DEFAULT_WORKLOAD), prompts=prompts)
    head = {p.id for p in prompts[:BALANCED_PROMPTS]}
    firsts = []
    for width in (1, 8, 64):
        drawn = Pacing().pass_of(workload, width).prompts
        assert {p.id.split("~")[0] for p in drawn} <= head, "only the file's head is balanced"
        firsts.append([p.id for p in drawn[:8]])
    assert firsts[0] == firsts[1] == firsts[2], "every layout answers the same first prompts"


def _pass(windows):
    from autotune.passes import Sample

    return Sample(
        wall_s=1.0, generated_tokens=1, prefill_tokens=1, tokens_per_s=1.0, windows=windows
    )


def test_passes_whose_windows_repeat_a_pattern_settle_and_drifting_ones_do_not():
    """A workload of mixed lengths: every pass's first window holds the long prompts, so the
    windows of one pass differ by a third, pass after pass (issue 25's trial: 331, 491, 437,
    293, 452, 466, ...). Passes hold the same work, so they are compared with each other."""
    from autotune.passes import estimate, settled
    from autotune.stats import relative_spread

    pattern = [(331.0, 491.0, 437.0), (329.0, 488.0, 441.0), (333.0, 493.0, 435.0)]
    figures = [_pass(w).figure for w in pattern]
    assert relative_spread(pattern[-1]) > 0.3, "the windows of one pass never agree"
    assert settled(figures)
    found = estimate(figures)
    assert found.stable and found.low < found.mean < found.high and found.passes == 2
    drifting = [_pass(tuple(x * 0.9**k for x in w)).figure for k, w in enumerate(pattern)]
    assert not settled(drifting) and estimate(drifting).stable is False
    assert estimate(figures[:1]).stable is None, "one pass: nothing to compare like for like"


def test_bench_settles_on_a_workload_of_mixed_lengths(cli):
    """The default workload (4 to 226 words a prompt) settles within its passes."""
    import json

    result = cli(
        "bench", "--backend", "fake", "--batch-size", "2", "--repeats", "1",
        "--settle", "60s", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["stable"] is True, data["warnings"]
    assert data["repeats"] >= 2


def test_a_cpu_layout_on_a_gpu_host_does_not_settle(tiny_gguf, topology):
    """The sweep's default settling on a GPU host is for the layouts computing on a GPU."""
    from dataclasses import replace

    from autotune.measure import settles
    from autotune.topology import Gpu

    gpu_host = replace(topology, gpus=(Gpu(index=0, name="H200", memory_bytes=141 << 30),))
    pacing = Pacing(settle_s=30.0, settle_on_cpu=False)
    assert not settles(TrialConfig(backend="llamacpp"), gpu_host, pacing)
    assert settles(TrialConfig(backend="hf"), gpu_host, pacing)
    assert not settles(TrialConfig(backend="hf"), topology, pacing)
    assert settles(TrialConfig(backend="llamacpp"), topology, Pacing(settle_s=30.0))


# ---------------------------------------------------------------- issue 25: stopping early


def test_one_pass_is_clearly_below_only_when_its_fastest_window_is():
    assert clearly_below([_pass((90.0, 110.0, 100.0))], 120.0) is not None
    assert clearly_below([_pass((90.0, 110.0, 100.0))], 105.0) is None, "its best window is above"
    two = [_pass((100.0, 100.0, 100.0)), _pass((101.0, 101.0, 101.0))]
    assert "2 pass(es)" in clearly_below(two, 110.0), "two passes: the interval's top"
    assert clearly_below(two, 100.0) is None


def test_a_measurement_stops_after_a_pass_once_clearly_below_the_bar(tiny_gguf, topology):
    config = TrialConfig(backend="fake", batch_size=2)
    workload = load_workload(TINY_WORKLOAD)
    full = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=3))
    assert full.repeats == 3 and full.stopped is None
    stopped = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=3), stop_below=1e9)
    assert stopped.repeats == 1 and "under the leader's lower bound" in stopped.stopped
    kept = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=2), stop_below=1.0)
    assert kept.repeats == 2 and kept.stopped is None, "a layout above the bar finishes"


def test_a_settling_layouts_first_pass_does_not_stop_it():
    """A GPU layout's first pass is slow (kernels compiled, pools grown): stopping on it would
    stop a fast layout. It counts from its second pass."""
    warm, fast = _pass((20.0, 20.0, 20.0)), _pass((100.0, 100.0, 100.0))
    assert clearly_below([warm], 90.0) is not None
    assert clearly_below([warm], 90.0, settling=True) is None, "nothing counted yet"
    assert clearly_below([warm, fast], 90.0, settling=True) is None
    assert clearly_below([warm, _pass((50.0, 50.0, 50.0))], 90.0, settling=True) is not None
