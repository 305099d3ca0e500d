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
    # width 8 (2 workers x batch 4): a pass is 2 waves + 3 windows = 40 of the 6 prompts, cycled
    assert data["prompts"] == 40 and len(rows) == 40
    first = sorted(row["id"] for row in rows[:6])
    assert first == ["t1", "t2", "t3", "t4", "t5", "t6"] and rows[6]["id"].endswith("~1")
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


def test_agreement_is_reproduced_from_two_output_files(cli, tmp_path, tiny_gguf):
    from autotune.agreement import agreement

    common = [
        "bench",
        "--backend",
        "llamacpp",
        "--model",
        str(tiny_gguf.path),
        "--workload",
        str(TINY_WORKLOAD),
        "--max-new-tokens",
        "8",
        "--repeats",
        "1",
    ]
    batched, single = tmp_path / "b8.jsonl", tmp_path / "b1.jsonl"
    result = cli(*common, "--batch-size", "8", "--agreement", "--json", "--output", str(batched))
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)["agreement"]
    # measured as bench measures its reference: cold, one pass
    assert (
        cli(*common, "--batch-size", "1", "--warmup", "0", "--output", str(single)).returncode == 0
    )

    def rows(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    assert agreement(rows(batched), rows(single)) == reported
    # the reference pass: 2 + 3 x 4 = 14 requests (the 6 prompts cycled), all in the batched one
    assert reported["compared"] == 14 and 0.0 <= reported["identical"] <= 1.0


def test_agreement_counts_identical_sequences_and_first_differences():
    from autotune.agreement import agreement

    ours = [
        {"id": "a", "token_ids": [1, 2, 3]},
        {"id": "b", "token_ids": [1, 9, 9]},
        {"id": "c", "token_ids": [5]},
        {"id": "d", "token_ids": [], "error": "too long"},
    ]
    theirs = [
        {"id": "a", "token_ids": [1, 2, 3]},
        {"id": "b", "token_ids": [1, 2, 3]},
        {"id": "c", "token_ids": [6, 7]},
        {"id": "d", "token_ids": [4]},
    ]
    assert agreement(ours, theirs) == {
        "compared": 3,
        "identical": 1 / 3,
        "mean_first_difference": 0.5,  # b differs at 1, c at 0
    }
