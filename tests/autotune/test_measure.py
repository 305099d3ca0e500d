"""The measuring harness on the fake backend, and PSS accounting of a process tree."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from autotune.config import TrialConfig
from autotune.measure import TreeSampler, benchmark, tree_memory
from autotune.workload import TINY_WORKLOAD, load_workload
from backends.fake import modelled_tokens_per_s


def test_benchmark_keeps_raw_samples_and_follows_the_fake_speed(tiny_gguf, topology):
    config = TrialConfig(backend="fake", workers=2, batch_size=4)
    workload = load_workload(TINY_WORKLOAD)
    result = benchmark(config, workload, tiny_gguf, topology, repeats=3)
    assert len(result.samples) == 3 and result.repeats == 3
    expected = modelled_tokens_per_s(2, 1, 4, topology.usable_cpus, topology.physical_cores)
    # the fake sleeps for the modelled time; measuring adds a little on top, never removes
    assert 0.7 * expected < result.tokens_per_s <= expected * 1.01
    assert result.requests_per_s == pytest.approx(
        result.tokens_per_s * len(workload) / result.samples[0]["generated_tokens"], rel=0.2
    )
    assert result.latency_p50_s is not None and result.load_time_s >= 0
    assert result.peak_memory_bytes > 0
    data = result.to_dict()
    for key in (
        "tokens_per_s",
        "requests_per_s",
        "latency_p50_s",
        "latency_p95_s",
        "load_time_s",
        "peak_memory_bytes",
        "samples",
        "provenance",
    ):
        assert key in data
    assert data["provenance"]["versions"]["autotune"] is not None
    assert "completions" not in data and len(result.completions) == len(workload)


def test_oversubscription_is_warned(tiny_gguf, topology):
    config = TrialConfig(backend="fake", workers=topology.usable_cpus + 1)
    result = benchmark(config, load_workload(TINY_WORKLOAD), tiny_gguf, topology, repeats=1)
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


def _done(at: float, tokens: int = 10, error: str | None = None):
    from backends.base import Completion

    return Completion(
        id=f"r{at}",
        text="",
        token_ids=tuple(range(tokens)),
        prompt_tokens=5,
        worker_rank=0,
        latency_s=1.0,
        finished_at=at,
        error=error,
    )


def test_steady_rate_leaves_out_the_first_and_the_last_wave():
    from autotune.measure import steady_tokens_per_s

    # concurrency 2: the first wave ends at t=1 (2nd finish), the last full wave at t=8
    # (the 2nd-last finish excluded); between them 6 requests of 10 tokens over 7 s.
    times = [0.5, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.5, 30.0]
    completions = [_done(t) for t in times]
    assert steady_tokens_per_s(completions, concurrency=2) == pytest.approx(60 / 7)
    assert steady_tokens_per_s(completions[:5], concurrency=2) is None, "fewer than 3 waves"
    failed = completions[:9] + [_done(30.0, error="too long")]
    assert steady_tokens_per_s(failed, concurrency=2) is None


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
    assert 3 <= len(data["samples"]) and data["prompts"] == 24
    assert data["stable"] is True and data["window_spread"] <= 0.05
    assert all(s["steady_tokens_per_s"] for s in data["samples"])
    assert len({s["prefill_tokens"] for s in data["samples"]}) == 1
