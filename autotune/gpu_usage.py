"""GPU memory and utilisation of a process tree, read from ``nvidia-smi``.

NVIDIA's tool is there wherever the driver is, and it sees every process of the tree (ranks
under torchrun, llama.cpp workers) without a Python binding in each. Memory is what the driver
charges each process (CUDA context and caching allocator included: what another process
could not use), summed per GPU over the tree's processes.
"""

from __future__ import annotations

import shutil
import subprocess

__all__ = ["GpuSample", "available", "sample"]

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


class GpuSample:
    """One reading: bytes per GPU index held by the given processes, and each of those
    GPUs' utilisation (percent of the last sample period a kernel ran)."""

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
    index_of = {uuid: int(index) for index, uuid, _ in gpus}
    busy = {int(index): float(util) for index, _, util in gpus if util.replace(".", "").isdigit()}
    memory: dict[int, int] = {}
    for pid, uuid, used in apps:
        if pid.isdigit() and int(pid) in pids and uuid in index_of and used.isdigit():
            gpu = index_of[uuid]
            memory[gpu] = memory.get(gpu, 0) + int(used) * 2**20  # MiB
    return GpuSample(memory, {g: busy[g] for g in memory if g in busy})
