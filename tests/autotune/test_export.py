"""`autotune export`: only the variables the winner's backend reads, and the measured figures
in the header and in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotune.config import TrialConfig
from autotune.export import parse_header, render
from autotune.study import Role, TrialRecord, TrialState
from autotune.summary import SweepSummary


def summary_of(config: TrialConfig, paired: dict | None = None, details: dict | None = None):
    baseline = TrialRecord(
        number=0,
        state=TrialState.COMPLETE,
        role=Role.BASELINE,
        config=TrialConfig(),
        value=20.0,
    )
    winner = TrialRecord(
        number=7,
        state=TrialState.COMPLETE,
        config=config,
        value=80.0,
        result={"details": details or {}},
        paired=paired,
        confirmed=paired is not None,
    )
    return SweepSummary(
        study="x",
        directory=Path("x"),
        trials=[baseline, winner],
        winner=winner,
        baseline=baseline,
        elapsed_s=60.0,
    )


def env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))


def test_a_llamacpp_winner_exports_only_what_llamacpp_reads():
    config = TrialConfig(backend="llamacpp", workers=2, batch_size=4, quant="q4_0")
    env = env_lines(render(summary_of(config), fingerprint="abc", fmt="env"))
    assert env["PARALLEL_WORKERS"] == "2" and env["MODEL_QUANT"] == "q4_0"
    for absent in ("AUTOTUNE_FAULT", "PIPELINE_STAGES", "PIPELINE_PARTITION", "TORCH_DTYPE"):
        assert absent not in env
    assert "MODEL_PATH" not in env, "the embedded default is not a path into a venv"
    assert TrialConfig.from_env(env) == config


def test_a_pipeline_winner_exports_its_measured_split_and_no_quant():
    config = TrialConfig(backend="pipeline", stages=2, partition="compute", model="/m/x.gguf")
    summary = summary_of(config, details={"boundaries": "0-16,17-29"})
    env = env_lines(render(summary, fingerprint=None, fmt="env"))
    assert env["PIPELINE_STAGES"] == env["PARALLEL_WORKERS"] == "2"
    assert env["PIPELINE_PARTITION"] == "custom" and env["PIPELINE_BOUNDARIES"] == "0-16,17-29"
    assert env["MODEL_PATH"] == "/m/x.gguf", "a model the user named is exported"
    assert "MODEL_QUANT" not in env and "CPU_PINNING" in env
    assert TrialConfig.from_env(env).boundaries == "0-16,17-29"


def test_json_carries_the_figures_of_the_header():
    paired = {"speedup": 3.9, "pairs": 3, "ci_low": 3.1, "ci_high": 4.8, "ratios": [4, 3.8, 3.9]}
    summary = summary_of(TrialConfig(workers=2), paired=paired)
    data = json.loads(render(summary, fingerprint="abc", fmt="json"))
    assert data["variables"]["PARALLEL_WORKERS"] == "2"
    assert (data["tokens_per_s"], data["speedup"], data["pairs"]) == (80.0, 3.9, 3)
    assert (data["ci_low"], data["ci_high"], data["confirmed"]) == (3.1, 4.8, True)
    assert data["machine_fingerprint"] == "abc" and "torch" in data["versions"]
    header = [
        line.lstrip("# ")
        for line in render(summary, fingerprint="abc", fmt="env").splitlines()
        if line.startswith("#")
    ]
    assert parse_header(header) == {
        "fingerprint": "abc",
        "tokens_per_s": 80.0,
        "speedup": 3.9,
        "ci": (3.1, 4.8),
    }


def test_an_unconfirmed_winner_says_so():
    data = json.loads(render(summary_of(TrialConfig()), fingerprint=None, fmt="json"))
    assert data["confirmed"] is False and data["speedup"] == pytest.approx(4.0)
    text = render(summary_of(TrialConfig()), fingerprint=None, fmt="env")
    assert "x4.00 (single runs, not confirmed)" in text
