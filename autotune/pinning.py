"""Which CPUs each worker is pinned to, from the detected topology.

- ``none``: the OS schedules freely.
- ``compact``: a worker's threads fill SMT siblings of one core before the next core.
- ``spread``: first hardware thread of every physical core first, SMT siblings last.
"""

from __future__ import annotations

from autotune.errors import ConfigError
from autotune.topology import Topology

__all__ = ["cpu_order", "cpu_sets"]


def cpu_order(topology: Topology, policy: str) -> list[int]:
    """Usable CPUs in the order a policy hands them out."""
    usable = set(topology.affinity_cpus)
    groups = [[cpu for cpu in group if cpu in usable] for group in topology.smt_siblings]
    groups = [group for group in groups if group]
    if policy == "compact":
        return [cpu for group in groups for cpu in group]
    if policy == "spread":
        return [group[0] for group in groups] + [cpu for group in groups for cpu in group[1:]]
    raise ConfigError(f"pinning must be compact or spread here, got {policy!r}")


def cpu_sets(
    topology: Topology, workers: int, threads_per_worker: int, policy: str
) -> list[tuple[int, ...]] | None:
    """One CPU set per worker, or None for ``none`` (no pinning)."""
    if policy == "none":
        return None
    order = cpu_order(topology, policy)[: topology.usable_cpus]
    needed = workers * threads_per_worker
    if needed > len(order):
        raise ConfigError(
            f"pinning {policy}: {workers} workers x {threads_per_worker} threads need {needed} "
            f"CPUs, {len(order)} usable"
        )
    return [
        tuple(order[rank * threads_per_worker : (rank + 1) * threads_per_worker])
        for rank in range(workers)
    ]
