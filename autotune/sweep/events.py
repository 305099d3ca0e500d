"""What a sweep tells as it goes (`Sweep`'s ``on_event``): one small frozen dataclass per event.
The terminal's progress lines (`autotune.console_sweep.SweepProgress`) are written from these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autotune.config import TrialConfig
from autotune.failures import FailureClass
from autotune.study import Role, TrialRecord

__all__ = [
    "BackendDropped",
    "ConfirmFailed",
    "ConfirmSkipped",
    "ConfirmStarted",
    "Interrupted",
    "LogRepaired",
    "SearchEnded",
    "TrialEnded",
    "TrialStarted",
]


@dataclass(frozen=True)
class TrialStarted:
    number: int
    config: TrialConfig
    role: Role
    name: str
    deadline_s: float


@dataclass(frozen=True)
class TrialEnded:
    record: TrialRecord


@dataclass(frozen=True)
class ConfirmStarted:
    number: int
    config: TrialConfig
    pairs: int


@dataclass(frozen=True)
class ConfirmSkipped:
    number: int  # too little time left for even one pair


@dataclass(frozen=True)
class ConfirmFailed:
    number: int
    failure_class: FailureClass | None


@dataclass(frozen=True)
class Interrupted:
    pass


@dataclass(frozen=True)
class BackendDropped:
    backend: str
    reason: str


@dataclass(frozen=True)
class LogRepaired:
    path: Path
    dropped: str  # the torn last line (a sweep killed while writing it), cut off


@dataclass(frozen=True)
class SearchEnded:
    reason: str  # why the search stopped before its share of the budget was spent
