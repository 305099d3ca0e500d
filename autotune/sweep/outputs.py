"""What a sweep leaves behind when it ends: ``summary.json`` and ``best.env``."""

from __future__ import annotations

from autotune.files import atomic_write
from autotune.study import StudyDir
from autotune.summary import SweepSummary

__all__ = ["simulated_note", "write_outputs"]


def write_outputs(summary: SweepSummary, directory: StudyDir, topology) -> None:
    """summary.json and best.env; sets ``summary``'s machine and whether the winner uses SMT
    siblings first."""
    from autotune.export import render

    winner_threads = summary.winner.config.total_threads if summary.winner else 0
    # More threads than the usable physical cores means SMT siblings are in use (seed 001's
    # question); the host's core count would be wrong in a container.
    summary.uses_smt_siblings = winner_threads > topology.usable_cores
    summary.machine = {
        "physical_cores": topology.physical_cores,
        "usable_cores": topology.usable_cores,
        "usable_cpus": topology.usable_cpus,
        "threads_per_core": topology.threads_per_core,
    }
    directory.write_json(directory.summary, summary.to_dict())
    if summary.winner is not None:  # from the same summary, not read back from disk
        atomic_write(
            directory.best_env, render(summary, fingerprint=topology.fingerprint(), fmt="env")
        )


def simulated_note(machine: str | None, note: str | None) -> str | None:
    """The summary's note, first saying where every figure came from when simulated."""
    if machine is None:
        return note
    simulated = (
        f"SIMULATED on {machine}: every figure is autotune.simulate's speed model of that "
        "machine, not a measurement"
    )
    return f"{simulated}. {note}" if note else simulated
