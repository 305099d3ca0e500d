"""What a sweep leaves behind when it ends: ``summary.json`` and ``best.env``."""

from __future__ import annotations

from autotune.config import TrialConfig
from autotune.files import atomic_write
from autotune.study import StudyDir, TrialState
from autotune.sweep.options import SweepSummary

__all__ = ["simulated_note", "write_outputs"]


def write_outputs(summary: SweepSummary, directory: StudyDir, topology) -> bool:
    """summary.json and best.env; returns whether the winner uses SMT siblings."""
    from autotune.export import render

    winner_threads = (
        TrialConfig.from_dict(summary.winner.config).total_threads if summary.winner else 0
    )
    data = {
        "study": summary.study,
        # More threads than the usable physical cores means SMT siblings are in use (seed
        # 001's question); the host's core count would be wrong in a container.
        "uses_smt_siblings": winner_threads > topology.usable_cores,
        "machine": {
            "physical_cores": topology.physical_cores,
            "usable_cores": topology.usable_cores,
            "usable_cpus": topology.usable_cpus,
            "threads_per_core": topology.threads_per_core,
        },
        "elapsed_s": summary.elapsed_s,
        "interrupted": summary.interrupted,
        "note": summary.note,
        "min_agreement": summary.min_agreement,
        "dropped": summary.dropped,
        "skipped_recipes": summary.skipped,
        "llama_extra_buffers": summary.extra_buffers,
        "winner": summary.winner,
        "baseline": summary.baseline,
        "counts": {state.value: summary.count(state) for state in TrialState},
    }
    directory.write_json(directory.summary, data)
    if summary.winner is not None:  # from the same data, not read back from disk
        atomic_write(
            directory.best_env, render(data, fingerprint=topology.fingerprint(), fmt="env")
        )
    return data["uses_smt_siblings"]


def simulated_note(machine: str | None, note: str | None) -> str | None:
    """The summary's note, first saying where every figure came from when simulated."""
    if machine is None:
        return note
    simulated = (
        f"SIMULATED on {machine}: every figure is autotune.simulate's speed model of that "
        "machine, not a measurement"
    )
    return f"{simulated}. {note}" if note else simulated
