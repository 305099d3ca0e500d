"""The CLI as a user runs it: output, exit codes, one-line errors, lazy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_help_and_detect_import_no_heavy_library(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "from autotune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['detect', '--json']) == 0\n"
        "    assert main(['workload', '--json']) == 0\n"
        "heavy = ('torch', 'transformers', 'llama_cpp', 'optuna', 'pandas')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_detect_json_on_this_machine(cli):
    result = cli("detect", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["logical_cpus"] == os.cpu_count()
    assert data["usable_cpus"] == len(os.sched_getaffinity(0))
    assert data["memory_total_bytes"] > data["memory_available_bytes"] > 0
    for key in (
        "physical_cores",
        "threads_per_core",
        "smt_siblings",
        "sockets",
        "numa_nodes",
        "cpu_model",
        "cpu_flags",
        "gpus",
    ):
        assert key in data


def test_detect_table(cli):
    result = cli("detect")
    assert result.returncode == 0, result.stderr
    assert "Physical cores" in result.stdout and "Usable CPUs" in result.stdout


def test_detect_roofline_json(cli):
    result = cli("detect", "--roofline", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in (
        "memory_bandwidth_gb_s",
        "gemm_gflops",
        "bound_batch1_tokens_per_s",
        "bound_compute_tokens_per_s",
    ):
        assert data[key] > 0, key
    assert data["model"].startswith("SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["detect", "--roofline", "--model", "/no/such.gguf"],
            "--model /no/such.gguf: no such file",
        ),
        (["detect", "--bogus"], "unrecognized arguments: --bogus"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["workload", "/no/such.jsonl"], "workload /no/such.jsonl: no such file"),
    ],
)
def test_usage_errors_are_one_line_exit_2(cli, args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_workload_bad_lines_warn_or_fail_with_strict(cli, tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"questionID": "1", "question": "Hi?"}\n{"questionID": "2"\n')
    loose = cli("workload", str(path), "--json")
    assert loose.returncode == 0, loose.stderr
    assert json.loads(loose.stdout)["bad_lines"] == 1
    assert f"{path}:2: malformed JSON" in loose.stderr
    strict = cli("workload", str(path), "--strict")
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines() == [
        f"autotune workload: error: {path}:2: malformed JSON (Expecting ',' delimiter) (--strict)"
    ]


def test_model_json_describes_the_embedded_default(cli, tmp_path):
    result = cli("model", "--json", env={"AUTOTUNE_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["embedded"] is True and data["weight_type"] == "Q4_1"
    assert str(tmp_path) in data["hf_cache"] and "missing" in data["hf_cache"]


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["bench", "--backend", "fake", "--seed", "-1"], "seed must be a whole number >= 0"),
        (["sweep", "--seed", "-1", "--budget", "1m", "--reports", "R"], "--seed must be >= 0"),
        (["plan", "--seed", "-3"], "--seed must be >= 0"),
        (["sweep", "--study", "../x", "--budget", "1m", "--reports", "R"], "not a path"),
        (["sweep", "--warm-start", "a/b", "--budget", "1m", "--reports", "R"], "not a path"),
        (["export", "--study", "..", "--reports", "R"], "not a path"),
        (["report", "--study", "/tmp/x", "--reports", "R"], "not a path"),
    ],
)
def test_bad_seeds_and_study_paths_are_one_line_exit_2(cli, tmp_path, args, word):
    result = cli(*(str(tmp_path / "R") if a == "R" else a for a in args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and word in result.stderr, result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "R").exists()


def test_a_negative_seed_in_the_env_is_refused_before_any_run(cli, tmp_path):
    env = tmp_path / "best.env"
    env.write_text("AUTOTUNE_BACKEND=fake\nAUTOTUNE_SEED=-5\n")
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n')
    result = cli("run", "--env", str(env), "--input", str(data), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "seed must be a whole number >= 0" in result.stderr
    assert result.stderr.count("\n") == 1
