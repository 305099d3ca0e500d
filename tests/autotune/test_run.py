"""`autotune run` and `autotune verify`: every input line answered exactly once, through
worker deaths, item failures and restarts; bad input refused before any output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from autotune.config import TrialConfig

REPO = Path(__file__).parent.parent.parent


def write_env(path: Path, config: TrialConfig, header: str = "") -> Path:
    path.write_text(header + "".join(f"{k}={v}\n" for k, v in config.to_env().items()))
    return path


def write_input(path: Path, count: int) -> Path:
    lines = []
    for i in range(count):
        if i % 3 == 0:
            lines.append({"questionID": f"q{i}", "question": f"What is {i} plus {i}?", "tag": i})
        elif i % 3 == 1:
            lines.append({"id": f"p{i}", "prompt": f"Say the number {i} in words."})
        else:
            lines.append({"id": f"m{i}", "main": f"Topic {i}.", "branches": ["Why?", "How?"]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def outputs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_answered_once_with_its_fields(cli, tmp_path):
    env = write_env(tmp_path / "best.env", TrialConfig(backend="fake", workers=2, batch_size=4))
    data = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.jsonl"
    result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert result.returncode == 0, result.stderr
    records = outputs(out)
    inputs = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(records) == len(inputs)
    by_id = {r["id"]: r for r in records}
    for given in inputs:
        record = by_id[str(given.get("id", given.get("questionID")))]
        assert {k: record[k] for k in given} == given, "every input field kept"
        assert record["success"] is True and record["inference_time"] >= 0
        assert isinstance(record["worker_rank"], int)
        if "branches" in given:
            assert isinstance(record["answer"], list) and len(record["answer"]) == 2
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert "success rate" in result.stdout


def test_resume_skips_answered_ids_and_reruns_the_rest(cli, tmp_path):
    env = write_env(tmp_path / "best.env", TrialConfig(backend="fake", batch_size=2))
    data = write_input(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out.jsonl"
    assert cli("run", "--env", str(env), "--input", str(data), "--output", str(out)).returncode == 0
    first = outputs(out)
    # What a crash leaves: part of the lines in the partial file, the last one torn.
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text("".join(json.dumps(r) + "\n" for r in first[:5]) + '{"id": "q9", "ans')
    out.unlink()
    again = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert again.returncode == 0, again.stderr
    records = outputs(out)
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in first)
    assert records[:5] == first[:5], "answered lines are kept, not run again"
    assert "5 lines already answered" in again.stdout
    # A re-run that crashed after copying the answered lines: both files hold them.
    partial.write_text(out.read_text())
    third = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert third.returncode == 0, third.stderr
    ids = [r["id"] for r in outputs(out)]
    assert sorted(ids) == sorted(set(ids)) == sorted(r["id"] for r in first), "each id once"


def test_an_item_that_fails_is_recorded_and_the_rest_go_on(cli, tmp_path, tiny_gguf):
    config = TrialConfig(
        backend="llamacpp",
        batch_size=2,
        ctx_per_sequence=128,
        max_new_tokens=8,
        model=str(tiny_gguf.path),
    )
    env = write_env(tmp_path / "best.env", config)
    data = tmp_path / "in.jsonl"
    lines = [
        {"id": "short1", "prompt": "Hi."},
        {"id": "long", "prompt": "word " * 400},
        {"id": "short2", "prompt": "Hello there."},
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert result.returncode == 0, result.stderr
    by_id = {r["id"]: r for r in outputs(out)}
    assert by_id["long"]["success"] is False and "exceeds" in by_id["long"]["error"]
    assert by_id["short1"]["success"] and by_id["short2"]["success"]


def test_a_killed_worker_loses_nothing(tmp_path, tiny_gguf, isolated_cache):
    config = TrialConfig(
        backend="llamacpp", workers=2, batch_size=2, max_new_tokens=48, model=str(tiny_gguf.path)
    )
    env = write_env(tmp_path / "best.env", config)
    data = write_input(tmp_path / "in.jsonl", 150)
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autotune",
            "run",
            "--env",
            str(env),
            "--input",
            str(data),
            "--output",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "AUTOTUNE_CACHE": str(isolated_cache)},
    )
    partial = tmp_path / "out.jsonl.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not partial.exists() or len(partial.read_text().splitlines()) < 10
    ):
        time.sleep(0.1)
    workers = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]
    assert workers, "the run has worker processes"
    workers[0].send_signal(signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    records = outputs(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 150, "every id once"
    assert all(r["success"] for r in records)
    assert "restarted" in stdout


@pytest.mark.parametrize(
    ("env_lines", "word"),
    [
        ("AUTOTUNE_BACKEND=fake\nPARALLEL_WORKERS=abc\n", "PARALLEL_WORKERS='abc'"),
        ("AUTOTUNE_BACKEND=llamacpp\nMODEL_QUANT=q9_9\n", "quant must be one of"),
        ("AUTOTUNE_BACKEND=fake\nPARALLEL_WORKERS=512\n", "usable"),
        ("this is not a variable\n", "best.env:1"),
        ("AUTOTUNE_BACKEND=fake\nPARALLEL_WORKERS=0\nINFERENCE_NUM_THREADS=2\n", "must be >= 1"),
        (b"AUTOTUNE_BACKEND=fake\nBATCH_SIZE=\xff\xfe\n", "not a text file"),
        ("AUTOTUNE_BACKEND=hf\nMODEL_QUANT=q4_0\n", "quant (MODEL_QUANT) is not a setting"),
    ],
)
def test_bad_env_is_one_line_exit_2_and_no_output(cli, tmp_path, env_lines, word):
    env = tmp_path / "best.env"
    if isinstance(env_lines, bytes):
        env.write_bytes(env_lines)
    else:
        env.write_text(env_lines)
    data = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and word in result.stderr, result.stderr
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_bad_input_line_is_named_and_nothing_is_written(cli, tmp_path):
    env = write_env(tmp_path / "best.env", TrialConfig(backend="fake"))
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": \n')
    out = tmp_path / "out.jsonl"
    result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert result.returncode == 2
    assert "in.jsonl:2" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_verify_compares_with_the_header(cli, tmp_path):
    config = TrialConfig(backend="fake", workers=1, batch_size=4, max_new_tokens=8)
    header = (
        "# machine fingerprint: 000000000000\n# measured: 100000.0 tokens/s (trial 3)\n"
        "# speedup over the naive baseline: x2.00 over 3 A B pairs, 95% CI 1.80-2.20\n"
    )
    env = write_env(tmp_path / "best.env", config, header)
    result = cli("verify", "--env", str(env), "--limit", "4", "--repeats", "1")
    assert result.returncode == 1, "out of the recorded range is a failure"
    assert "Recorded at export (search trial)" in result.stdout and "Measured now" in result.stdout
    assert "fingerprint" in result.stderr and "differs" in result.stderr
    assert "outside the recorded range" in result.stderr  # the fake machine is not 100k tok/s


def test_verify_checks_against_the_paired_figure_and_passes_inside_it(cli, tmp_path):
    config = TrialConfig(backend="fake", workers=1, batch_size=4, max_new_tokens=8)
    measured = cli(
        "bench",
        "--backend",
        "fake",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--limit",
        "4",
        "--repeats",
        "3",
        "--json",
    )
    rate = json.loads(measured.stdout)["tokens_per_s"]
    # The paired figure is what the machine does; the search trial claimed 10x more. The
    # accepted range (the paired runs' spread) is wide: fake passes last milliseconds.
    runs = f"{rate * 0.7:.1f}, {rate:.1f}, {rate * 1.3:.1f}"
    header = (
        f"# measured: {rate * 10:.1f} tokens/s (trial 3); paired runs: {rate:.1f} tokens/s "
        f"(median of {runs})\n# speedup over the naive baseline: x2.00 over 3 A B pairs, "
        "95% CI 1.99-2.01\n"
    )
    env = write_env(tmp_path / "best.env", config, header)
    result = cli(
        "verify", "--env", str(env), "--limit", "4", "--repeats", "3", env={"COLUMNS": "200"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Recorded at export (paired runs)" in result.stdout
    assert "95% prediction interval of the 3 paired runs" in result.stdout
    assert "mean of the last" in result.stdout and "median of" not in result.stdout


def test_verify_measures_as_the_sweeps_pairs_did_cut_at_the_last_window(tmp_path, monkeypatch):
    import autotune.measure
    from autotune.cli import main

    real, paced = autotune.measure.benchmark, []

    def benchmark(config, workload, model, topology, pacing, **options):
        paced.append(pacing)
        return real(config, workload, model, topology, pacing, **options)

    monkeypatch.setattr(autotune.measure, "benchmark", benchmark)
    config = TrialConfig(backend="fake", workers=1, batch_size=4, max_new_tokens=8)
    header = "# measured: 100000.0 tokens/s (trial 3)\n"
    env = write_env(tmp_path / "best.env", config, header)
    assert main(["verify", "--env", str(env), "--limit", "4", "--repeats", "1"]) == 1
    # The figure it checks (a sweep's, its trials and pairs cut) is measured the same way.
    assert [p.cut_tail for p in paced] == [True]


def test_the_accepted_range_comes_from_the_spread_of_the_paired_runs():
    from autotune.console import verify_range
    from autotune.export import parse_header

    # Paired runs 76-84 tokens/s, a tight speedup interval (the baseline moved with them):
    # the interval applied to one figure would accept only 79.6-80.4.
    recorded = parse_header(
        [
            "measured: 90.0 tokens/s (trial 3); paired runs: 80.0 tokens/s (median of 80.0, "
            "84.0, 76.0)",
            "speedup over the naive baseline: x2.00 over 3 A B pairs, 95% CI 1.99-2.01",
        ]
    )
    assert recorded["paired_runs"] == [80.0, 84.0, 76.0]
    accepted = verify_range(recorded)
    assert accepted is not None
    low, high, why = accepted
    assert low < 76 and high > 84 and why == "95% prediction interval of the 3 paired runs"
    assert verify_range({"tokens_per_s": 100.0})[:2] == pytest.approx((85.0, 115.0))


def test_resume_answers_edited_prompts_again_drops_removed_lines_keeps_input_order(cli, tmp_path):
    env = write_env(tmp_path / "best.env", TrialConfig(backend="fake", batch_size=2))
    data = write_input(tmp_path / "in.jsonl", 9)
    out = tmp_path / "out.jsonl"
    assert cli("run", "--env", str(env), "--input", str(data), "--output", str(out)).returncode == 0
    first = {r["id"]: r for r in outputs(out)}
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    lines[1]["prompt"] = "Say something else entirely."  # same id p1, another prompt
    del lines[4]  # p4 leaves the input
    lines.reverse()  # and the order changes
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    again = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert again.returncode == 0, again.stderr
    records = outputs(out)
    ids = [r["id"] for r in records]
    assert ids == [str(line.get("id", line.get("questionID"))) for line in lines], "input order"
    assert "p4" not in ids
    by_id = {r["id"]: r for r in records}
    assert by_id["p1"]["answer"] != first["p1"]["answer"], "an edited prompt is answered again"
    assert by_id["p1"]["prompt"] == "Say something else entirely."
    assert by_id["q0"] == first["q0"], "an unchanged line is kept as it was"
    assert "7 lines already answered" in again.stdout


def test_another_config_answers_every_line_again(cli, tmp_path):
    data = write_input(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.jsonl"
    for tokens in (8, 16):
        env = write_env(tmp_path / "best.env", TrialConfig(backend="fake", max_new_tokens=tokens))
        result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
        assert result.returncode == 0, result.stderr
    assert "already answered" not in result.stdout


@pytest.mark.parametrize("command", ["run", "bench"])
def test_an_output_that_is_a_directory_is_refused_before_any_work(cli, tmp_path, command):
    env = write_env(tmp_path / "best.env", TrialConfig(backend="fake"))
    data = write_input(tmp_path / "in.jsonl", 2)
    args = (
        ["run", "--env", str(env), "--input", str(data)]
        if command == "run"
        else ["bench", "--backend", "fake", "--workload", str(data), "--repeats", "1"]
    )
    result = cli(*args, "--output", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is a directory" in result.stderr


def test_a_branch_line_and_a_plain_line_with_one_id_are_refused(cli, tmp_path):
    # Both would be written as id "a": two input lines, one output line.
    env = write_env(tmp_path / "best.env", TrialConfig(backend="fake"))
    data = tmp_path / "in.jsonl"
    data.write_text(
        '{"id": "a", "main": "Topic.", "branches": ["Why?", "How?"]}\n'
        '{"id": "a", "prompt": "Hello"}\n'
    )
    out = tmp_path / "out.jsonl"
    result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert 'in.jsonl:2: duplicate id "a" (first on line 1)' in result.stderr
    assert result.stderr.count("\n") == 1
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_a_second_run_on_one_output_is_refused_while_the_first_holds_it(cli, tmp_path):
    from autotune.files import exclusive_lock

    env = write_env(tmp_path / "best.env", TrialConfig(backend="fake"))
    data = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    with exclusive_lock(tmp_path / "out.jsonl.lock", "--output out.jsonl"):
        result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
        assert result.returncode == 2, result.stderr
        assert f"pid {os.getpid()}" in result.stderr and result.stderr.count("\n") == 1
        assert not out.exists()
    result = cli("run", "--env", str(env), "--input", str(data), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert len(outputs(out)) == 3 and not (tmp_path / "out.jsonl.lock").exists()
