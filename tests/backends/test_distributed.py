"""The torchrun backends (ddp, pipeline) on the tiny random Llama: sharding, splits, the
by-hand torchrun mode, and what happens when a rank dies or hangs.

The equality with hf on the real embedded model is in test_distributed_real.py (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from autotune.config import TrialConfig
from autotune.errors import BackendError, ConfigError
from autotune.workload import GenerationSettings, Prompt
from backends import create_backend
from backends.torch.rank import shard

PROMPTS = tuple(
    Prompt(id=f"q{i}", text=f"Question {i}: what is {i} plus {2 * i}? Say it in words.")
    for i in range(9)
)
SETTINGS = GenerationSettings(max_new_tokens=8)
LONG = tuple(Prompt(id=f"l{i}", text=f"Tell me a long story number {i}.") for i in range(64))


@pytest.fixture(scope="module")
def reference(tiny_gguf, topology):
    """hf's greedy tokens for PROMPTS, one process."""
    config = TrialConfig(backend="hf", threads_per_worker=1, batch_size=2)
    with create_backend(config, tiny_gguf, topology) as backend:
        return [c.token_ids for c in backend.generate(PROMPTS, SETTINGS)]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("count", [0, 1, 5, 9, 10, 13])
def test_shards_cover_every_item_once_in_order(count, world):
    shards = [shard(count, rank, world) for rank in range(world)]
    assert [i for s in shards for i in s] == list(range(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_ddp_spreads_the_remainder_and_keeps_input_order(tiny_gguf, topology, reference):
    config = TrialConfig(backend="ddp", workers=2, threads_per_worker=1, batch_size=2)
    with create_backend(config, tiny_gguf, topology) as backend:
        completions = backend.generate(PROMPTS, SETTINGS)
    assert [c.id for c in completions] == [p.id for p in PROMPTS]
    assert [c.worker_rank for c in completions] == [0] * 5 + [1] * 4  # 9 = 5 + 4
    assert [c.token_ids for c in completions] == reference


@pytest.mark.parametrize(
    "changes",
    [
        # Three ranks, or a timed profile first: 9-11 s each, so they run with the slow tests
        # (the default run measured 5:56 on this VM); no-kv-cache keeps the check in it.
        pytest.param(
            {"stages": 3, "partition": "custom", "boundaries": "0-0,1-2,3-3"},
            marks=pytest.mark.slow,
        ),
        pytest.param({"stages": 2, "partition": "compute"}, marks=pytest.mark.slow),
        {"stages": 2, "kv_cache": False},
    ],
    ids=["uneven-3", "compute-2", "no-kv-cache"],
)
def test_pipeline_matches_hf(tiny_gguf, topology, reference, changes):
    config = TrialConfig(backend="pipeline", threads_per_worker=1, batch_size=2, **changes)
    with create_backend(config, tiny_gguf, topology) as backend:
        completions = backend.generate(PROMPTS, SETTINGS)
        boundaries = backend.details()["boundaries"]
    assert [c.token_ids for c in completions] == reference
    if "boundaries" in changes:
        assert boundaries == changes["boundaries"]
    stages = [s.split("-") for s in boundaries.split(",")]
    assert len(stages) == changes["stages"] and stages[0][0] == "0" and stages[-1][1] == "3"


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"stages": 5}, "more than the model's 4 decoder layers"),
        ({"stages": 2, "partition": "custom", "boundaries": "0-1,3-3"}, "gap"),
        ({"stages": 2, "partition": "memory", "stage_memory_gb": 1e-6}, "over the cap"),
    ],
)
def test_pipeline_refuses_a_split_that_cannot_work(tiny_gguf, topology, changes, word):
    with pytest.raises(ConfigError, match=word):  # refused before any rank starts
        create_backend(TrialConfig(backend="pipeline", **changes), tiny_gguf, topology)


def test_bad_split_on_the_command_line_is_one_line_and_exit_2(cli, tiny_gguf):
    result = cli(
        "bench",
        "--backend",
        "pipeline",
        "--model",
        str(tiny_gguf.path),
        "--stages",
        "2",
        "--partition",
        "custom",
        "--boundaries",
        "0-1,3-3",
        "--limit",
        "2",
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "gap" in result.stderr


@pytest.mark.parametrize("name", ["ddp", "pipeline"])
def test_a_killed_rank_ends_the_run_with_its_error(name, tiny_gguf, topology):
    layout = {"workers": 2} if name == "ddp" else {"stages": 2}
    config = TrialConfig(backend=name, threads_per_worker=1, batch_size=1, **layout)
    before = children()
    backend = create_backend(config, tiny_gguf, topology)
    backend.load()
    victim = backend.pids[1]
    threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(BackendError) as failure:
        backend.generate(LONG, GenerationSettings(max_new_tokens=64))
    took = time.monotonic() - started
    backend.close()
    assert f"rank 1 (pid {victim})" in str(failure.value)
    assert "SIGKILL" in str(failure.value)
    assert took < 20, took
    assert children() <= before, "no rank outlives the run"


# Slow: each waits out a collective timeout (14 s a backend); the default run stays near 5 min.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "pipeline"])
def test_a_hung_rank_ends_the_run_within_the_collective_timeout(
    name, tiny_gguf, topology, monkeypatch
):
    monkeypatch.setenv("AUTOTUNE_COLLECTIVE_TIMEOUT_S", "4")
    layout = {"workers": 2} if name == "ddp" else {"stages": 2}
    config = TrialConfig(backend=name, threads_per_worker=1, batch_size=1, **layout)
    before = children()
    backend = create_backend(config, tiny_gguf, topology)
    backend.load()
    os.kill(backend.pids[1], signal.SIGSTOP)  # a hang: alive, silent
    started = time.monotonic()
    try:
        with pytest.raises(BackendError, match="rank 1 hung or died"):
            backend.generate(PROMPTS, SETTINGS)
        took = time.monotonic() - started
    finally:
        backend.close()
    assert took < 4 + 10, took
    assert children() <= before, "the stopped rank is killed too"


def test_by_hand_torchrun_mode_writes_every_completion_in_order(tmp_path, tiny_gguf, reference):
    """The multi-node recipe of the README, on one node: a c10d rendezvous endpoint."""
    workload = tmp_path / "prompts.jsonl"
    workload.write_text("".join(json.dumps({"id": p.id, "prompt": p.text}) + "\n" for p in PROMPTS))
    output = tmp_path / "out.jsonl"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0",
        "-m",
        "backends.torch.rank",
        "--backend",
        "ddp",
        "--workers",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--model",
        str(tiny_gguf.path),
        "--workload",
        str(workload),
        "--output",
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == [p.id for p in PROMPTS]
    assert [tuple(line["token_ids"]) for line in lines] == reference
    assert {line["worker_rank"] for line in lines} == {0, 1}


@pytest.mark.slow  # three backends loaded in turn (13 s): the default run stays near 5 minutes
def test_hf_ddp_and_the_pipeline_score_the_same_answers_alike(tiny_gguf, topology, reference):
    """Teacher forcing (`Backend.score`) on the torch backends: the same float32 weights give
    the same distributions, whether one process reads the answer (hf), ranks share the
    requests (ddp) or stages pass each one down (pipeline)."""
    from autotune.quality import compare
    from backends.base import ScoreRequest

    requests = [
        ScoreRequest(id=p.id, text=p.text, answer=tuple(answer))
        for p, answer in zip(PROMPTS[:3], reference, strict=False)
        if answer
    ]
    hf = TrialConfig(backend="hf", threads_per_worker=1)
    with create_backend(hf, tiny_gguf, topology) as backend:
        own = backend.score(requests, SETTINGS, 8)
    assert [len(s.top_ids) for s in own] == [len(r.answer) for r in requests]
    asking = [
        ScoreRequest(id=r.id, text=r.text, answer=r.answer, ids=s.top_ids)
        for r, s in zip(requests, own, strict=True)
    ]
    for config in (
        TrialConfig(backend="ddp", workers=2, threads_per_worker=1),
        TrialConfig(backend="pipeline", stages=2, threads_per_worker=1),
    ):
        with create_backend(config, tiny_gguf, topology) as backend:
            found = compare(own, backend.score(asking, SETTINGS, 1))
        assert found.top1 == 1.0 and found.kld_mean < 1e-6, (config.backend, found)
