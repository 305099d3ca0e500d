"""What a sweep found (`SweepSummary`), typed in memory and as ``summary.json`` on disk.

The sweep builds one when it ends and writes it (`SweepSummary.to_dict`); export, report and
verify read it back with `SweepSummary.load`, records and all typed: JSON only at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autotune.errors import ConfigError
from autotune.study import Role, StudyDir, TrialRecord, TrialState

__all__ = ["SweepSummary"]


@dataclass
class SweepSummary:
    """What the sweep found: its winner (paired with the baseline where time allowed), the
    baseline, and why backends or recipes were left out."""

    study: str
    directory: Path
    trials: list[TrialRecord]
    winner: TrialRecord | None
    baseline: TrialRecord | None
    elapsed_s: float
    interrupted: bool = False
    uses_smt_siblings: bool = False
    note: str | None = None
    min_agreement: float | None = None
    min_quality: str | None = None  # the --min-quality floor (`QualityFloor.as_flag`)
    dropped: dict[str, str] = field(default_factory=dict)  # backend -> why no more trials
    skipped: dict[str, str] = field(default_factory=dict)  # recipe -> why it never ran
    extra_buffers: str | None = None  # the probe's verdict in words, where it ran
    machine: dict = field(default_factory=dict)  # the cores the sweep saw (summary.json)
    # Trials per state; from ``trials`` while the sweep holds them, from the file when read.
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def best_recipe(self) -> TrialRecord | None:
        recipes = [r for r in self.trials if r.role is Role.RECIPE and r.complete]
        return max(recipes, key=lambda r: r.value, default=None)

    def count(self, state: TrialState) -> int:
        """Trials that ended in ``state``."""
        if self.trials:
            return sum(r.state is state for r in self.trials)
        return self.counts.get(state.value, 0)

    def to_dict(self) -> dict:
        """summary.json: everything but the trials (trials.jsonl holds those)."""
        return {
            "study": self.study,
            "uses_smt_siblings": self.uses_smt_siblings,
            "machine": self.machine,
            "elapsed_s": self.elapsed_s,
            "interrupted": self.interrupted,
            "note": self.note,
            "min_agreement": self.min_agreement,
            "min_quality": self.min_quality,
            "dropped": self.dropped,
            "skipped_recipes": self.skipped,
            "llama_extra_buffers": self.extra_buffers,
            "winner": self.winner.to_dict() if self.winner else None,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "counts": {state.value: self.count(state) for state in TrialState},
        }

    @classmethod
    def from_dict(
        cls, data: dict, directory: Path, trials: list[TrialRecord] | None = None
    ) -> SweepSummary:
        """Inverse of `to_dict` (``trials`` from trials.jsonl, where the caller read them)."""

        def record(key: str) -> TrialRecord | None:
            return TrialRecord.from_dict(data[key]) if data.get(key) else None

        return cls(
            study=data.get("study") or Path(directory).name,
            directory=Path(directory),
            trials=list(trials or []),
            winner=record("winner"),
            baseline=record("baseline"),
            elapsed_s=float(data.get("elapsed_s") or 0.0),
            interrupted=bool(data.get("interrupted")),
            uses_smt_siblings=bool(data.get("uses_smt_siblings")),
            note=data.get("note"),
            min_agreement=data.get("min_agreement"),
            min_quality=data.get("min_quality"),
            dropped=dict(data.get("dropped") or {}),
            skipped=dict(data.get("skipped_recipes") or {}),
            extra_buffers=data.get("llama_extra_buffers"),
            machine=dict(data.get("machine") or {}),
            counts=dict(data.get("counts") or {}),
        )

    @classmethod
    def load(cls, directory: StudyDir, trials: bool = False) -> SweepSummary:
        """summary.json of ``directory`` (and its trials, if asked); ConfigError naming the fix
        if the sweep has not finished."""
        data = directory.read_json(directory.summary, "summary")
        if data is None:
            raise ConfigError(
                f"study {directory.name}: no summary.json in {directory.path} (the sweep has "
                "not finished); run autotune sweep --study NAME --resume to finish it"
            )
        return cls.from_dict(data, directory.path, directory.records() if trials else None)
