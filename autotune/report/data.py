"""A study as the report reads it: its files, read once (a study cut off midway loads what
finished)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autotune.study import Role, TrialRecord, find
from autotune.summary import SweepSummary

__all__ = ["Study", "load_study"]


@dataclass
class Study:
    """What a study directory holds, read once."""

    directory: Path
    summary: SweepSummary | None  # None: the sweep was cut off before writing it
    trials: list[TrialRecord]
    machine: dict
    roofline: dict | None = None

    @property
    def name(self) -> str:
        return self.summary.study if self.summary else self.directory.name

    @property
    def done(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.complete]

    @property
    def baseline(self) -> TrialRecord | None:
        if self.summary and self.summary.baseline:
            return self.summary.baseline
        return next((t for t in self.trials if t.role is Role.BASELINE and t.complete), None)

    @property
    def winner(self) -> TrialRecord | None:
        return self.summary.winner if self.summary else None


def load_study(reports_dir: Path, study: str | None) -> Study:
    """The study named (default: the newest under ``reports_dir``); a study cut off midway
    (no summary, a torn last line) loads what finished."""
    directory = find(reports_dir, study)
    trials = directory.records()
    summary = SweepSummary.load(directory) if directory.summary.is_file() else None
    machine = directory.read_json(directory.machine, "machine.json") or {}
    roofline = directory.read_json(directory.roofline, "roofline.json")
    return Study(directory.path, summary, trials, machine, roofline)
