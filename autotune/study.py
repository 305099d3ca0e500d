"""A study on disk: its directory, its typed trial records, and which study is the newest.

``reports/<study>/`` holds ``trials.jsonl`` (one `TrialRecord` a line, synced as each trial
ends), ``summary.json`` (the winner and the baseline, written at the end), ``best.env``,
``machine.json`` (topology, fingerprint, model), ``study.db`` (Optuna's storage) and the
report's files. `StudyDir` is the one place that knows those names; `newest` is the one
answer to "which study did you mean"; every write goes through `autotune.files.atomic_write`.

The same record is kept in Optuna's storage (the trial's ``record`` attribute), so a study
resumed from a shared ``--storage`` rebuilds exactly the records it wrote.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.failures import FailureClass
from autotune.files import append_line, atomic_write
from autotune.passes import Sample

if TYPE_CHECKING:
    from autotune.quality import Quality

__all__ = ["Role", "StudyDir", "TrialRecord", "TrialState", "find", "newest"]


class TrialState(str, Enum):
    """How a trial ended."""

    COMPLETE = "complete"  # measured
    FAIL = "fail"  # ran and failed (oom, crash, timeout, invalid)
    PRUNED = "pruned"  # never started: the reason says why


class Role(str, Enum):
    """Why a trial was run."""

    BASELINE = "baseline"  # the naive baseline, trial 0
    RECIPE = "recipe"  # a seed's hand-made layout
    SEARCH = "search"  # suggested by the sampler
    EXTRA = "extra"  # injected by the caller (tests)
    WARM = "warm"  # one of a previous study's best layouts (--warm-start)
    REFERENCE = "reference"  # batch 1, the model's own weights, greedy: answers to compare with


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """One trial of a study, as trials.jsonl, Optuna's storage and summary.json hold it.

    ``value`` is the trial's tokens/s (complete trials only); ``paired`` the re-measurement
    against the baseline (the winner only: speedup, pairs, ratios, ci_low, ci_high, and the
    raw candidate / baseline tokens/s); ``agreement`` its answers against the reference run
    (share identical, mean first difference, sequences compared).
    """

    number: int
    state: TrialState
    role: Role = Role.SEARCH
    name: str = ""
    config: TrialConfig | None = None
    duration_s: float = 0.0
    ended_s: float | None = None  # seconds since the sweep began
    value: float | None = None
    result: dict | None = None
    samples: list[Sample] | None = None  # its timed passes
    failure_class: FailureClass | None = None
    stderr_tail: str = ""
    reason: str | None = None
    worker: str | None = None  # host:pid of the sweep process that ran it
    extra: dict = field(default_factory=dict)  # returncode, deadline_s of a failed trial
    paired: dict | None = None
    confirmed: bool | None = None
    # Its answers against its family's reference run (`autotune.agreement.agreement`).
    agreement: dict | None = None
    answers: dict | None = None  # the reference run's answers (reference trials only)

    def __post_init__(self) -> None:
        # JSON only at the edges: a record read back (a dict config, a bare string) is typed here.
        object.__setattr__(self, "state", TrialState(self.state))
        object.__setattr__(self, "role", Role(self.role))
        if self.samples and isinstance(self.samples[0], dict):
            object.__setattr__(self, "samples", [Sample.from_dict(s) for s in self.samples])
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", TrialConfig.from_dict(self.config))
        if self.failure_class is not None:
            object.__setattr__(self, "failure_class", FailureClass(self.failure_class))

    @property
    def complete(self) -> bool:
        return self.state is TrialState.COMPLETE

    @property
    def backend(self) -> str | None:
        return self.config.backend if self.config else None

    @property
    def quality(self) -> Quality | None:
        """Its per-token agreement with its family's reference (`autotune.quality`), where
        it was scored."""
        from autotune.quality import Quality

        return Quality.from_dict((self.result or {}).get("quality"))

    def with_(self, **changes) -> TrialRecord:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready; fields at their empty default are left out."""
        data = asdict(self)
        data["state"], data["role"] = self.state.value, self.role.value
        if self.failure_class is not None:
            data["failure_class"] = self.failure_class.value
        if self.samples is not None:
            data["samples"] = [sample.to_dict() for sample in self.samples]
        empty = {f.name: f.default for f in fields(self) if f.name not in ("number", "state")}
        empty["extra"] = {}
        return {k: v for k, v in data.items() if k not in empty or v != empty[k]}

    @classmethod
    def from_dict(cls, data: dict) -> TrialRecord:
        """Inverse of `to_dict`; keys of older studies that no field holds go to ``extra``."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            given["extra"] = {**given.get("extra", {}), **unknown}
        return cls(**given)


class StudyDir:
    """The files of one study under ``reports/<name>/``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    trials = property(lambda self: self.path / "trials.jsonl")
    summary = property(lambda self: self.path / "summary.json")
    best_env = property(lambda self: self.path / "best.env")
    machine = property(lambda self: self.path / "machine.json")
    database = property(lambda self: self.path / "study.db")
    roofline = property(lambda self: self.path / "roofline.json")

    def exists(self) -> bool:
        """A study lives here: a sweep has started in this directory."""
        return self.trials.is_file() or self.machine.is_file()

    def storage_url(self, storage: str | None = None) -> str:
        """Optuna's storage: ``storage`` if given, else the study's own SQLite file."""
        return storage or f"sqlite:///{self.database}"

    # ------------------------------------------------------------ reading

    def records(self) -> list[TrialRecord]:
        """Every record of trials.jsonl; a torn last line (a sweep killed mid-write) is left
        out, a bad line elsewhere is an error naming it."""
        if not self.trials.is_file():
            return []
        lines = self.trials.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(TrialRecord.from_dict(json.loads(line)))
            except json.JSONDecodeError:
                if number != len(lines):
                    raise ConfigError(f"{self.trials}:{number}: not JSON") from None
        return records

    def read_json(self, path: Path, what: str) -> dict | None:
        """A JSON file of the study, None if missing; a damaged one is an error naming it."""
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path}: the study's {what} is damaged (not JSON)") from None

    # ------------------------------------------------------------ writing

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, path: Path, data: dict) -> None:
        atomic_write(path, json.dumps(data, indent=2, default=_jsonable) + "\n")

    def drop_torn_tail(self) -> str | None:
        """Cut a torn last line off trials.jsonl (a sweep killed while writing it), so the
        next record starts on a line of its own; returns what was cut, or None."""
        if not self.trials.is_file():
            return None
        data = self.trials.read_bytes()
        if data.endswith(b"\n") or not data:
            return None  # the last write ended with its line
        start = data.rfind(b"\n") + 1  # where the last line begins
        last = data[start:]
        with self.trials.open("r+b") as handle:
            try:
                json.loads(last)
            except ValueError:  # not JSON (UnicodeDecodeError is one): cut off
                handle.truncate(start)
            else:  # whole but for its newline: keep it
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
                last = b""
            handle.flush()
            os.fsync(handle.fileno())
        return last.decode(errors="replace") or None

    def open_log(self):
        """trials.jsonl for appending records (`append`)."""
        return self.trials.open("a")

    @staticmethod
    def append(handle, record: TrialRecord) -> None:
        """One record as a line, synced before returning."""
        append_line(handle, json.dumps(record.to_dict(), default=_jsonable))


def _jsonable(value):
    if isinstance(value, TrialRecord):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    return str(value)


def newest(reports_dir: Path) -> StudyDir:
    """The study that was active last under ``reports_dir`` (its trials.jsonl, or machine.json
    before any trial ended, written last); ConfigError if there is none."""
    found = []
    for directory in Path(reports_dir).glob("*/"):
        study = StudyDir(directory)
        marks = [p.stat().st_mtime for p in (study.trials, study.machine) if p.is_file()]
        if marks:
            found.append((max(marks), study.name, study))
    if not found:
        raise ConfigError(f"no study under {reports_dir}; run autotune sweep first")
    return max(found, key=lambda item: item[:2])[2]


def find(reports_dir: Path, name: str | None) -> StudyDir:
    """The study named ``name`` (``--study``), or the newest; ConfigError if it is not there."""
    if name is None:
        return newest(reports_dir)
    study = StudyDir(Path(reports_dir) / name)
    if not study.exists():
        raise ConfigError(f"--study {name}: no study in {study.path}")
    return study
