"""`autotune bench` as a user runs it."""

from __future__ import annotations

import json

import pytest

from autotune.workload import TINY_WORKLOAD


def test_bench_fake_json_and_output(cli, tmp_path):
    output = tmp_path / "requests.jsonl"
    result = cli(
        "bench",
        "--backend",
        "fake",
        "--workers",
        "2",
        "--batch-size",
        "4",
        "--workload",
        str(TINY_WORKLOAD),
        "--repeats",
        "2",
        "--json",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in (
        "tokens_per_s",
        "requests_per_s",
        "latency_p50_s",
        "latency_p95_s",
        "load_time_s",
        "peak_memory_bytes",
        "samples",
    ):
        assert key in data, key
    assert len(data["samples"]) == 2 and data["config"]["workers"] == 2
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["t1", "t2", "t3", "t4", "t5", "t6"]
    assert all(row["text"] and row["token_ids"] for row in rows)


@pytest.mark.llamacpp
def test_bench_llamacpp_table(cli, tiny_gguf):
    result = cli(
        "bench",
        "--backend",
        "llamacpp",
        "--model",
        str(tiny_gguf.path),
        "--workers",
        "2",
        "--threads",
        "1",
        "--workload",
        str(TINY_WORKLOAD),
        "--max-new-tokens",
        "4",
        "--repeats",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "Tokens/s" in result.stdout and "Peak memory" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "abc"], "argument --workers: invalid int value: 'abc'"),
        (["--backend", "hf", "--workers", "2"], "the hf backend is one process"),
        (["--quant", "q9"], "quant must be one of"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--output", "/no/such/dir/out.jsonl"], "--output /no/such/dir/out.jsonl"),
        (["--workload", "/no/such.jsonl"], "--workload /no/such.jsonl: no such file"),
        (["--model", "/no/such.gguf"], "--model /no/such.gguf: no such file"),
    ],
)
def test_bench_usage_errors(cli, args, message):
    result = cli("bench", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bench_strict_workload(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"questionID": "1", "question": "ok"}\n{broken\n')
    result = cli("bench", "--backend", "fake", "--workload", str(bad), "--strict")
    assert result.returncode == 2
    assert f"{bad}:2: malformed JSON" in result.stderr


def test_a_failing_backend_is_one_line_exit_1_and_no_output(cli, tmp_path):
    # autotune's own handling of a backend that fails while generating: one line naming it,
    # exit 1 (a failure, not a usage error), no --output file.
    out = tmp_path / "out.jsonl"
    result = cli(
        "bench",
        "--backend",
        "fake",
        "--fault",
        "error",
        "--workload",
        str(TINY_WORKLOAD),
        "--repeats",
        "1",
        "--output",
        str(out),
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "autotune bench: failed: fake backend: generate failed on purpose (--fault error)"
    )
    assert "Traceback" not in result.stderr and not out.exists()
