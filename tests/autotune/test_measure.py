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
