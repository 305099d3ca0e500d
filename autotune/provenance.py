"""Where a result came from: library versions, machine, time. Attached to every result."""

from __future__ import annotations

import platform
import socket
from datetime import datetime, timezone
from importlib import metadata

from autotune.topology import Topology

__all__ = ["DISTRIBUTIONS", "provenance", "versions"]

DISTRIBUTIONS = (
    "autotune",
    "torch",
    "transformers",
    "llama-cpp-python",
    "optuna",
    "numpy",
    "gguf",
)


def versions() -> dict[str, str | None]:
    """Installed version of each distribution that shapes a result (None if absent)."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def now_rfc3339() -> str:
    """The current UTC time, RFC 3339, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(topology: Topology) -> dict:
    """Versions, machine and time for one result row."""
    return {
        "time": now_rfc3339(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "versions": versions(),
        "cpu_model": topology.cpu_model,
        "logical_cpus": topology.logical_cpus,
        "physical_cores": topology.physical_cores,
        "usable_cpus": topology.usable_cpus,
        "memory_total_bytes": topology.memory_total_bytes,
        "gpus": [gpu.name for gpu in topology.gpus],
        "machine_fingerprint": topology.fingerprint(),
    }
