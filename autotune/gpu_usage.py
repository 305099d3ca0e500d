"""GPU memory and utilisation of a process tree, read from ``nvidia-smi``.

NVIDIA's tool is there wherever the driver is, and it sees every process of the tree (ranks
under torchrun, llama.cpp workers) without a Python binding in each. Memory is what the driver
charges each process (CUDA context and caching allocator included: what another process
could not use), summed per GPU over the tree's processes.
"""

from __future__ import annotations

import shutil
import subprocess

__all__ = ["GpuSample", "available", "sample", "torch_numbers"]

_TIMEOUT_S = 5.0


def available() -> bool:
    """Whether ``nvidia-smi`` is on PATH."""
    return shutil.which("nvidia-smi") is not None


def _query(what: str, fields: str) -> list[list[str]]:
    result = subprocess.run(
        ["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=True,
    )
    return [
        [cell.strip() for cell in line.split(",")] for line in result.stdout.splitlines() if line
    ]


def torch_numbers(gpus: list[list[str]], env=None) -> dict[str, int]:
    """nvidia-smi's GPUs (rows of index, uuid, ...) by UUID -> torch's number for them in a
    process whose ``CUDA_VISIBLE_DEVICES`` is ``env``'s: nvidia-smi counts every GPU of the
    machine, torch only the visible ones, in the list's order (indices or UUIDs, or a UUID's
    first characters, as CUDA takes them). GPUs not visible are left out."""
    from autotune.placement import visible_entries

    entries = visible_entries(env)
    if entries is None:
        return {row[1]: int(row[0]) for row in gpus}
    by_index = {row[0]: row[1] for row in gpus}
    found: dict[str, int] = {}
    for number, entry in enumerate(entries):
        uuid = by_index.get(entry) if entry.isdigit() else None
        if uuid is None and not entry.isdigit():
            uuid = next((row[1] for row in gpus if row[1].startswith(entry)), None)
        if uuid is not None:
            found[uuid] = number
    return found


class GpuSample:
    """One reading: bytes per GPU (torch's number, as `autotune.topology` lists them) held by
    the given processes, and each of those GPUs' utilisation (percent of the last sample
    period a kernel ran)."""

    def __init__(self, memory: dict[int, int], utilisation: dict[int, float]) -> None:
        self.memory = memory
        self.utilisation = utilisation


def sample(pids: set[int]) -> GpuSample | None:
    """What ``pids`` hold on each GPU now; None where nvidia-smi cannot say."""
    try:
        gpus = _query("gpu", "index,uuid,utilization.gpu")
        apps = _query("compute-apps", "pid,gpu_uuid,used_memory")
    except (OSError, subprocess.SubprocessError):
        return None
    index_of = torch_numbers(gpus)
    busy = {
        index_of[uuid]: float(util)
        for _, uuid, util in gpus
        if uuid in index_of and util.replace(".", "").isdigit()
    }
    memory: dict[int, int] = {}
    for pid, uuid, used in apps:
        if pid.isdigit() and int(pid) in pids and uuid in index_of and used.isdigit():
            gpu = index_of[uuid]
            memory[gpu] = memory.get(gpu, 0) + int(used) * 2**20  # MiB
    return GpuSample(memory, {g: busy[g] for g in memory if g in busy})
