"""What a sweep is asked to do (`SweepOptions`; what it found: `autotune.summary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autotune.config import TrialConfig
from autotune.measure import Pacing
from autotune.quality import DEFAULT_FLOOR, QualityFloor
from backends.llamacpp.probe import ExtraBuffersVerdict

__all__ = ["SweepOptions"]


@dataclass
class SweepOptions:
    """Everything `autotune sweep` was asked to do."""

    study: str
    reports_dir: Path
    budget_s: float
    trials: int | None = None
    storage: str | None = None
    resume: bool = False
    backends: list[str] = field(default_factory=list)
    workload: str | None = None
    limit: int | None = None  # only the first N prompts of the workload
    pacing: Pacing = field(default_factory=Pacing)
    min_agreement: float | None = None  # layouts whose answers agree less are pruned
    # Layouts whose per-token agreement with the reference is under it are pruned.
    min_quality: QualityFloor = DEFAULT_FLOOR
    memory_limit_bytes: int | None = None
    trial_timeout_s: float | None = None
    base: TrialConfig = field(default_factory=TrialConfig)
    pairs: int = 3
    seed: int | None = None
    # The machine file the trials were simulated on (`autotune.simulate`), or None: measured.
    simulated: str | None = None
    warm_start: str | None = None  # a previous study whose best layouts are tried first
    # This CPU's verdict on llama.cpp's extra buffer types (`backends.llamacpp.probe`), probed
    # before the first llama.cpp trial; None where not probed (a simulated machine, or no
    # llama.cpp backend searched).
    extra_buffers: ExtraBuffersVerdict | None = None
