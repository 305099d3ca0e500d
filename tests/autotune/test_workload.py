"""The workload loader: every shape users have, bad lines, strict mode, the shipped workloads."""

from __future__ import annotations

import json

import pytest

from autotune.errors import ConfigError
from autotune.workload import (
    DEFAULT_WORKLOAD,
    TINY_WORKLOAD,
    GenerationSettings,
    load_workload,
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_questions_shape(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"questionID": "a1", "question": "Why?"},
            {"questionID": 7, "question": "How?"},
        ],
    )
    workload = load_workload(path)
    assert [p.id for p in workload.prompts] == ["a1", "7"]
    assert workload.prompts[0].text == "Why?"
    assert workload.shapes == {"questions": 2}


def test_contexts_shape_keeps_other_fields(tmp_path):
    row = {
        "id": "item_1",
        "query": "How to use numpy.array?",
        "context": "Docs...",
        "target_api": "numpy.array",
        "retrieval_time": 0.12,
    }
    workload = load_workload(write_jsonl(tmp_path / "c.jsonl", [row]))
    prompt = workload.prompts[0]
    assert prompt.id == "item_1"
    assert "Docs..." in prompt.text and "How to use numpy.array?" in prompt.text
    assert prompt.record["target_api"] == "numpy.array"
    assert prompt.record["retrieval_time"] == 0.12


def test_parallel_shape_each_branch_follows_main(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"main": "Shared start.", "branches": ["First.", "Second."]},
            {"text": "Only text."},
        ],
    )
    workload = load_workload(path)
    assert [p.id for p in workload.prompts] == ["line1#0", "line1#1", "line2"]
    assert workload.prompts[0].text == "Shared start.\n\nFirst."
    assert workload.prompts[1].text.endswith("Second.")
    assert workload.prompts[1].record["branch_index"] == 1
    assert workload.prompts[2].text == "Only text."


def test_bad_lines_are_counted_and_good_lines_load(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"questionID": "1", "question": "Good?"},
            "{not json",
            {"questionID": "2"},
            {"questionID": "3", "question": "Also good?"},
            {"unrelated": 1},
            {"questionID": "1", "question": "Duplicate id"},
        ],
    )
    workload = load_workload(path)
    assert [p.id for p in workload.prompts] == ["1", "3"]
    reasons = [str(e) for e in workload.errors]
    assert reasons[0].startswith(f"{path}:2: malformed JSON")
    assert reasons[1] == f'{path}:3: missing field "question"'
    assert reasons[2].startswith(f"{path}:5: unknown shape")
    assert reasons[3].startswith(f'{path}:6: duplicate id "1"')


def test_strict_makes_the_first_bad_line_fatal(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"questionID": "1", "question": "ok"}, "[1, 2"])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: malformed JSON"):
        load_workload(path, strict=True)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="empty.jsonl: the file is empty"):
        load_workload(empty)
    with pytest.raises(ConfigError, match="nope.jsonl: no such file"):
        load_workload(tmp_path / "nope.jsonl")
    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", ["{", "}"])
    with pytest.raises(ConfigError, match="no valid line"):
        load_workload(only_bad)


def test_generation_settings_validate():
    assert GenerationSettings().greedy
    assert not GenerationSettings(temperature=0.7, top_p=0.9).greedy
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationSettings(top_p=0)


def test_head_keeps_the_first_prompts_and_the_rest_of_the_workload():
    workload = load_workload(TINY_WORKLOAD)
    first = workload.head(2)
    assert first.prompts == workload.prompts[:2]
    assert (first.name, first.shapes) == (workload.name, workload.shapes)
    assert workload.head(100).prompts == workload.prompts


def test_default_workload_is_large_and_varied():
    workload = load_workload(DEFAULT_WORKLOAD, strict=True)
    assert len(workload) >= 64
    assert len({p.id for p in workload.prompts}) == len(workload)
    words = [len(p.text.split()) for p in workload.prompts]
    buckets = {
        "short (<10 words)": 0,
        "medium (10-49)": 0,
        "long (50-119)": 0,
        "very long (120+)": 0,
    }
    for count in words:
        key = list(buckets)[(count >= 10) + (count >= 50) + (count >= 120)]
        buckets[key] += 1
    assert all(n >= 6 for n in buckets.values()), buckets
    # short and long are interleaved, so a prefix of the file is a fair sample
    first = [len(p.text.split()) for p in workload.prompts[:8]]
    assert min(first) <= 10 and max(first) >= 100


def test_tiny_workload_loads_strictly():
    assert len(load_workload(TINY_WORKLOAD, strict=True)) == 6
