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
