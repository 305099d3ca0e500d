"""Where each process of a layout computes: the CPU, one GPU, or a block of GPUs.

A placement is one device per process, comma separated, in process order (worker, rank or
stage): ``cpu``, ``cuda:2`` or a block ``cuda:2+3`` (the process sees GPUs 2 and 3, as seed
003's ``CUDA_VISIBLE_DEVICES=2,3``, and spreads the model over them). The same GPU named for
two processes means they share it. ``TrialConfig.placement`` holds one; left out, the backend
places its processes itself (`default_placement`).

Seed 003's rule is the default for workers and ranks: with G GPUs and W processes each gets a
block of ``G // W`` GPUs of its own; with fewer GPUs than processes they share, round robin.

GPU numbers here are torch's (`autotune.topology.detect`): positions among the GPUs this
process sees. Under ``CUDA_VISIBLE_DEVICES=2,3`` GPU 0 is the machine's GPU 2, so a child's
``CUDA_VISIBLE_DEVICES`` names it as the parent's list does (`cuda_visible`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from autotune.errors import ConfigError

__all__ = [
    "MAX_SHARE",
    "Device",
    "check_placement",
    "cuda_visible",
    "default_placement",
    "format_placement",
    "parse_placement",
    "shared_gpus",
    "visible_entries",
]

_DEVICE = re.compile(r"cpu|cuda:\d+(\+\d+)*")
# Processes per GPU a search space goes up to where they outnumber the GPUs (seed 003's
# fallback: they share); a small model leaves most of an H100 idle with one.
MAX_SHARE = 4


@dataclass(frozen=True)
class Device:
    """One process's device: ``gpus`` empty for the CPU, else the GPU indices it sees."""

    gpus: tuple[int, ...] = ()

    @property
    def is_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def torch(self) -> str:
        """The torch device the process puts its inputs on: ``cpu`` or its first GPU."""
        return f"cuda:{self.gpus[0]}" if self.gpus else "cpu"

    @property
    def visible(self) -> str:
        """``CUDA_VISIBLE_DEVICES`` for the process: its GPUs as this process's own
        ``CUDA_VISIBLE_DEVICES`` names them (`cuda_visible`); empty: none, a CPU process."""
        return ",".join(cuda_visible(g) for g in self.gpus)

    def __str__(self) -> str:
        return "cuda:" + "+".join(str(g) for g in self.gpus) if self.gpus else "cpu"


def visible_entries(env=None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) in ``env`` (default: this
    process's environment), or None where it is unset (every GPU visible, in order)."""
    import os

    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" not in env:
        return None
    return [entry.strip() for entry in env["CUDA_VISIBLE_DEVICES"].split(",") if entry.strip()]


def cuda_visible(gpu: int, env=None) -> str:
    """How a child's ``CUDA_VISIBLE_DEVICES`` names this process's GPU ``gpu`` (torch's
    number): the parent's entry at that position where it sets one, else the number."""
    entries = visible_entries(env)
    if entries is None:
        return str(gpu)
    if gpu >= len(entries):
        raise ConfigError(
            f"cuda:{gpu}: CUDA_VISIBLE_DEVICES={','.join(entries)} shows {len(entries)} GPUs"
        )
    return entries[gpu]


def parse_placement(text: str) -> tuple[Device, ...]:
    """``cuda:0,cuda:0,cpu`` -> its devices; ConfigError naming the entry that is not one."""
    devices = []
    for entry in text.split(","):
        entry = entry.strip()
        if not _DEVICE.fullmatch(entry):
            raise ConfigError(
                f"placement {text!r}: {entry!r} is not a device (cpu, cuda:0, or a block of "
                "GPUs such as cuda:0+1)"
            )
        gpus = () if entry == "cpu" else tuple(int(g) for g in entry[5:].split("+"))
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"placement {text!r}: {entry!r} names a GPU twice")
        devices.append(Device(gpus))
    return tuple(devices)


def format_placement(devices) -> str:
    """The inverse of `parse_placement`."""
    return ",".join(str(d) for d in devices)


def default_placement(gpus: int, processes: int, *, blocks: bool = True) -> tuple[Device, ...]:
    """Seed 003's placement of ``processes`` on ``gpus`` GPUs: ``gpus // processes`` each
    (one each where ``blocks`` is False: a pipeline stage computes on one device), and round
    robin, sharing, where there are more processes than GPUs; the CPU where there is no GPU."""
    if gpus == 0:
        return (Device(),) * processes
    if processes > gpus:
        return tuple(Device((rank % gpus,)) for rank in range(processes))
    per = gpus // processes if blocks else 1
    return tuple(Device(tuple(range(rank * per, rank * per + per))) for rank in range(processes))


def shared_gpus(devices) -> bool:
    """Whether two processes compute on one GPU (then no NCCL between them: it needs a
    device per rank)."""
    seen: list[int] = [g for d in devices for g in d.gpus]
    return len(seen) != len(set(seen))


def check_placement(text: str, processes: int, gpus: int) -> tuple[Device, ...]:
    """The devices of placement ``text`` for ``processes`` processes on a host with ``gpus``
    GPUs; ConfigError when the count differs or a GPU does not exist."""
    devices = parse_placement(text)
    if len(devices) != processes:
        raise ConfigError(
            f"placement {text!r} names {len(devices)} devices for {processes} processes; "
            "give one per process"
        )
    missing = sorted({g for d in devices for g in d.gpus if g >= gpus})
    if missing:
        have = f"GPUs 0-{gpus - 1}" if gpus else "no GPU"
        raise ConfigError(
            f"placement {text!r}: GPU {missing[0]} does not exist (this machine has {have})"
        )
    return devices
