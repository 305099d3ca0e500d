"""`autotune report`: a study's figures and tables, as report.md and a standalone report.html.

Everything comes from the study's own files (summary.json, trials.jsonl, machine.json, and
study.db for parameter importances), so a report can be made of a sweep cut off midway, and
made again. Every figure is always written: where the study has nothing for it (no pipeline
trial, one backend) the figure says so instead of being left out, so links never break.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from autotune.files import atomic_write
from autotune.report.data import Study, load_study
from autotune.report.documents import html_text, markdown_text, sections, top_rows
from autotune.report.figures import FIGURES, draw
from autotune.study import TrialRecord

__all__ = ["FIGURES", "Report", "Study", "build_report", "links", "load_study", "top_rows"]


@dataclass
class Report:
    """The written report: its files and the rows shown in the terminal."""

    markdown: Path
    html: Path
    figures: list[Path]
    top: list[TrialRecord] = field(default_factory=list)


def build_report(study: Study) -> Report:
    """Draw every figure and write report.md and report.html into the study's directory."""
    figures = draw(study, study.directory)
    parts = sections(study)
    markdown, page = study.directory / "report.md", study.directory / "report.html"
    atomic_write(markdown, markdown_text(study, parts))
    atomic_write(page, html_text(study, parts, study.directory))
    top = sorted(study.done, key=lambda t: t.value, reverse=True)[:10]
    return Report(markdown, page, figures, top)


def links(markdown: Path) -> list[str]:
    """The local files report.md links to (for checking that they resolve)."""
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text())
