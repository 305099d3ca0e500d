"""On the real embedded model, ddp and the pipeline give exactly hf's greedy tokens (slow).

The two layouts the issue names are run through `autotune bench --output`, as a user would.
"""

from __future__ import annotations

import json

import pytest

from autotune.config import TrialConfig
from autotune.models import ModelSpec
from autotune.workload import TINY_WORKLOAD, GenerationSettings, load_workload
from backends import create_backend

pytestmark = pytest.mark.slow

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts():
    return load_workload(TINY_WORKLOAD).prompts


@pytest.fixture(scope="module")
def hf_tokens(prompts, topology):
    config = TrialConfig(backend="hf", threads_per_worker=1, batch_size=2)
    with create_backend(config, ModelSpec.resolve(), topology) as backend:
        completions = backend.generate(prompts, GenerationSettings(max_new_tokens=NEW_TOKENS))
    assert sum(len(c.token_ids) for c in completions) > 3 * len(prompts), "it really generates"
    return {c.id: c.token_ids for c in completions}


@pytest.mark.parametrize(
    "flags",
    [
        ["--backend", "ddp", "--workers", "2", "--threads", "1"],
        ["--backend", "pipeline", "--stages", "2", "--partition", "compute"],
    ],
    ids=["ddp-2", "pipeline-2-compute"],
)
def test_bench_matches_hf_greedy_tokens(cli, tmp_path, hf_tokens, flags):
    output = tmp_path / "out.jsonl"
    result = cli(
        "bench",
        *flags,
        "--workload",
        str(TINY_WORKLOAD),
        "--batch-size",
        "2",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--prompts",
        "6",  # each prompt once (a pass is otherwise sized for windows, prompts cycled)
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--output",
        str(output),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    produced = {line["id"]: tuple(line["token_ids"]) for line in map(json.loads, output.open())}
    assert produced == hf_tokens


@pytest.mark.parametrize(
    "layout",
    [
        {"stages": 2},
        {"stages": 3},
        {"stages": 3, "partition": "custom", "boundaries": "0-3,4-21,22-29"},
    ],
    ids=["uniform-2", "uniform-3", "uneven-3"],
)
def test_pipeline_matches_hf_greedy_tokens(prompts, topology, hf_tokens, layout):
    config = TrialConfig(backend="pipeline", threads_per_worker=1, batch_size=2, **layout)
    with create_backend(config, ModelSpec.resolve(), topology) as backend:
        completions = backend.generate(prompts, GenerationSettings(max_new_tokens=NEW_TOKENS))
    assert {c.id: c.token_ids for c in completions} == hf_tokens
