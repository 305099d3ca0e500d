"""`autotune report` on studies made with the fake backend: every figure is a real PNG, the
links of report.md resolve, report.html stands alone, partial studies work."""

from __future__ import annotations

import json
import re

import pytest

from autotune.config import TrialConfig
from autotune.report import FIGURES, links
from autotune.sweep import SweepOptions

PNG = b"\x89PNG\r\n\x1a\n"
NAMES = [figure.name for figure in FIGURES]
ROOFLINE = {  # a stand-in for `autotune detect --roofline`, which takes seconds to measure
    "threads": 2,
    "memory_bandwidth_gb_s": 30.0,
    "gemm_gflops": 120.0,
    "bound_batch1_tokens_per_s": 300.0,
    "bound_compute_tokens_per_s": 450.0,
}


@pytest.fixture
def study(tmp_path_factory, simulated_sweep):
    reports = tmp_path_factory.mktemp("reports")
    options = SweepOptions(
        study="r",
        reports_dir=reports,
        budget_s=60.0,
        backends=["fake"],
        limit=4,
        pairs=2,
        trials=9,
        seed=3,
        trial_timeout_s=4,
    )
    simulated_sweep(options, extra=[TrialConfig(backend="fake", fault="crash")])
    (reports / "r" / "roofline.json").write_text(json.dumps(ROOFLINE))
    return reports


def test_report_writes_every_figure_and_both_documents(cli, study):
    result = cli("report", "--reports", str(study), "--study", "r")
    assert result.returncode == 0, result.stderr
    directory = study / "r"
    for name in NAMES:
        data = (directory / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    markdown = directory / "report.md"
    linked = links(markdown)
    assert sorted(linked) == sorted(NAMES)
    assert all((directory / link).is_file() for link in linked)
    text = markdown.read_text()
    assert "## Top configurations" in text and "| trial |" in text
    assert "| answers identical |" in text and "| window spread |" in text
    assert "crash" in text, "the failed trial is listed with its class"
    page = (directory / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert not re.search(r"<img[^>]+src='(?!data:)", page), "no image outside the file"
    assert "top configurations" in result.stdout


def test_a_study_cut_off_midway_still_reports(cli, study, tmp_path):
    # What a sweep killed with SIGKILL leaves: trials.jsonl with a torn last line, no summary.
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (study / "r" / "trials.jsonl").read_text().splitlines()[:4]
    (cut / "trials.jsonl").write_text("\n".join(lines) + '\n{"number": 9, "sta')
    result = cli("report", "--reports", str(tmp_path), "--study", "cut", "--no-roofline")
    assert result.returncode == 0, result.stderr
    assert all((cut / name).read_bytes().startswith(PNG) for name in NAMES)
    assert "interrupted" in (cut / "report.md").read_text()


def test_unknown_study_is_one_line_and_exit_2(cli, tmp_path):
    result = cli("report", "--reports", str(tmp_path), "--study", "nope")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nope" in result.stderr


def test_what_the_search_left_out_is_listed_with_the_reason(cli, study):
    summary_path = study / "r" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["dropped"] = {"hf": "its best, 17.7 tokens/s (trial 3), is x0.34 llamacpp's 52.5"}
    summary["skipped_recipes"] = {"seed 000: transformers batch 4": "expected 93 s with 41 s left"}
    summary_path.write_text(json.dumps(summary))
    result = cli("report", "--reports", str(study), "--study", "r", "--no-roofline")
    assert result.returncode == 0, result.stderr
    text = (study / "r" / "report.md").read_text()
    assert "| not searched further | why |" in text
    assert "| backend hf | its best, 17.7 tokens/s" in text
    assert "| seed 000: transformers batch 4 | expected 93 s with 41 s left |" in text
