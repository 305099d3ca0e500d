"""What this machine really has: CPUs, SMT siblings, sockets, NUMA, cgroup limits, memory, GPUs.

Every parser takes a root directory (``/`` on the live machine, a fixture tree in tests) and
reads the same files the kernel exposes: ``sys/devices/system/cpu/cpu*/topology/``,
``sys/devices/system/node/``, ``proc/self/status``, ``proc/self/cgroup``, the cgroup v1 and v2
limit files, ``proc/meminfo`` and ``proc/cpuinfo``. `detect()` puts them together.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "Gpu",
    "NumaNode",
    "Topology",
    "detect",
    "format_cpulist",
    "parse_cpulist",
    "read_cgroup_limits",
    "read_cpu_topology",
]

# cgroup v1 writes "no limit" as a huge page-aligned number (2**63 rounded down to a page);
# anything this large is no limit on any real machine.
_NO_LIMIT_THRESHOLD = 2**60

# The ISA features that decide which kernels llama.cpp and torch can use on this CPU.
KEY_CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    # aarch64 names, from the "Features" line
    "asimd",
    "asimddp",
    "sve",
    "sve2",
    "i8mm",
    "bf16",
)


@dataclass(frozen=True, kw_only=True)
class NumaNode:
    """One NUMA node: its id, its CPUs and (where the kernel says) its memory."""

    id: int
    cpus: tuple[int, ...]
    memory_total_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class Gpu:
    """One accelerator as torch sees it."""

    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True, kw_only=True)
class Topology:
    """The machine as a tuning search must see it.

    ``usable_cpus`` is what this process may really use: its affinity mask, reduced by a
    cgroup CPU quota. ``memory_available_bytes`` is reduced by a cgroup memory limit.
    """

    logical_cpus: int
    physical_cores: int
    threads_per_core: int
    smt_siblings: tuple[tuple[int, ...], ...]
    sockets: int
    numa_nodes: tuple[NumaNode, ...]
    affinity_cpus: tuple[int, ...]
    cpu_quota: float | None
    usable_cpus: int
    memory_total_bytes: int
    memory_limit_bytes: int | None
    memory_available_bytes: int
    cpu_model: str
    cpu_flags: tuple[str, ...]
    gpus: tuple[Gpu, ...] = field(default=())
    # The installed llama-cpp-python can offload layers to these GPUs (a CUDA build); the
    # llama.cpp space searches n_gpu_layers only then.
    llama_gpu_offload: bool = False

    @property
    def usable_cores(self) -> int:
        """Physical cores this process may use: cores with a CPU in the affinity mask, no more
        than the usable CPUs. More threads than this share a core's SMT siblings."""
        allowed = set(self.affinity_cpus)
        cores = sum(1 for group in self.smt_siblings if allowed.intersection(group))
        return min(cores, self.usable_cpus)

    @property
    def smt_enabled(self) -> bool:
        """True when at least one core runs more than one hardware thread."""
        return self.threads_per_core > 1

    def to_dict(self) -> dict:
        """A JSON-ready dict; the keys are the field names."""
        data = asdict(self)
        data["smt_siblings"] = [list(group) for group in self.smt_siblings]
        data["affinity_cpus"] = list(self.affinity_cpus)
        data["cpu_flags"] = list(self.cpu_flags)
        for node in data["numa_nodes"]:
            node["cpus"] = list(node["cpus"])
        return data

    def fingerprint(self) -> str:
        """A short stable id of the hardware (not of its momentary load or free memory)."""
        parts = [
            self.cpu_model,
            str(self.logical_cpus),
            str(self.physical_cores),
            str(self.sockets),
            str(self.usable_cpus),
            str(self.memory_total_bytes // 2**30),
            *(f"{gpu.name}:{gpu.memory_bytes // 2**30}" for gpu in self.gpus),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- parsers


def parse_cpulist(text: str) -> list[int]:
    """Parse the kernel's CPU list format (``0-3,8,10-11``) into sorted CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            first, last = part.split("-", 1)
            cpus.update(range(int(first), int(last) + 1))
        else:
            cpus.add(int(part))
    return sorted(cpus)


def format_cpulist(cpus) -> str:
    """Format CPU ids the way the kernel does: ``0-7,16-23`` (``-`` for none)."""
    cpus = sorted(cpus)
    if not cpus:
        return "-"
    ranges, start, prev = [], cpus[0], cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(f"{start}-{prev}" if start != prev else str(start))
        if cpu is not None:
            start = prev = cpu
    return ",".join(ranges)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class _Cpu:
    id: int
    package: int
    siblings: tuple[int, ...]


def read_cpu_topology(root: str | Path = "/") -> list[_Cpu]:
    """The online CPUs under ``root`` with their package and SMT sibling group."""
    cpu_dir = Path(root, "sys/devices/system/cpu")
    online_text = _read(cpu_dir / "online")
    if online_text is not None:
        ids = parse_cpulist(online_text)
    else:
        ids = sorted(
            int(m.group(1))
            for entry in (cpu_dir.iterdir() if cpu_dir.is_dir() else ())
            if (m := re.fullmatch(r"cpu(\d+)", entry.name))
        )
    cpus = []
    for cpu_id in ids:
        topo = cpu_dir / f"cpu{cpu_id}" / "topology"
        # core_cpus_list is the newer name of thread_siblings_list; either gives the SMT group.
        siblings_text = _read(topo / "core_cpus_list") or _read(topo / "thread_siblings_list")
        if siblings_text is None:
            continue
        package_text = _read(topo / "physical_package_id")
        cpus.append(
            _Cpu(
                id=cpu_id,
                package=int(package_text) if package_text else 0,
                siblings=tuple(parse_cpulist(siblings_text)),
            )
        )
    return cpus


def read_numa_nodes(root: str | Path = "/") -> list[NumaNode]:
    """NUMA nodes that have CPUs, with their CPU lists and memory."""
    node_dir = Path(root, "sys/devices/system/node")
    nodes = []
    if not node_dir.is_dir():
        return nodes
    for entry in sorted(node_dir.iterdir(), key=lambda p: p.name):
        match = re.fullmatch(r"node(\d+)", entry.name)
        if not match:
            continue
        cpus = tuple(parse_cpulist(_read(entry / "cpulist") or ""))
        if not cpus:
            continue  # memory-only nodes (CXL, HBM) run no threads
        memory = None
        meminfo = _read(entry / "meminfo") or ""
        if found := re.search(r"MemTotal:\s+(\d+)\s*kB", meminfo):
            memory = int(found.group(1)) * 1024
        nodes.append(NumaNode(id=int(match.group(1)), cpus=cpus, memory_total_bytes=memory))
    return sorted(nodes, key=lambda n: n.id)


def read_affinity(root: str | Path = "/") -> list[int] | None:
    """The CPUs this process may run on, from ``proc/self/status`` (Cpus_allowed_list)."""
    status = _read(Path(root, "proc/self/status")) or ""
    if found := re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.MULTILINE):
        return parse_cpulist(found.group(1))
    return None


def read_meminfo(root: str | Path = "/") -> dict[str, int]:
    """``proc/meminfo`` in bytes, by key (MemTotal, MemAvailable, ...)."""
    values = {}
    for line in (_read(Path(root, "proc/meminfo")) or "").splitlines():
        if found := re.match(r"(\w+):\s+(\d+)(?:\s*kB)?", line):
            scale = 1024 if line.rstrip().endswith("kB") else 1
            values[found.group(1)] = int(found.group(2)) * scale
    return values


def read_cpuinfo(root: str | Path = "/") -> tuple[str | None, set[str]]:
    """The CPU model name and ISA flags from ``proc/cpuinfo`` (x86 "flags", arm "Features")."""
    model, flags = None, set()
    for line in (_read(Path(root, "proc/cpuinfo")) or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@dataclass(frozen=True)
class CgroupLimits:
    """Limits that cgroups put on this process; None where there is none."""

    cpu_quota: float | None = None
    memory_limit_bytes: int | None = None
    memory_usage_bytes: int | None = None


def _cgroup_paths(root: Path) -> dict[str, str]:
    """Controller name -> cgroup path, from ``proc/self/cgroup`` ("" is the v2 unified one)."""
    paths = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _chain(mount: Path, path: str) -> list[Path]:
    """The cgroup directory of this process and its ancestors up to the mount, existing ones.

    Limits are hierarchical, so the tightest one anywhere on the chain applies. Inside a cgroup
    namespace the path may not exist under the mount; the mount root itself is the cgroup then.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if not text or text == "max":
        return None
    value = int(text)
    return None if value < 0 or value >= _NO_LIMIT_THRESHOLD else value


def _min_or_none(values: list[float | int | None]):
    present = [v for v in values if v is not None]
    return min(present) if present else None


def read_cgroup_limits(root: str | Path = "/") -> CgroupLimits:
    """CPU quota (in CPUs) and memory limit/usage from cgroup v2 or v1 under ``root``."""
    root = Path(root)
    paths = _cgroup_paths(root)
    base = root / "sys/fs/cgroup"
    quotas: list[float | None] = []
    limits: list[int | None] = []
    usage = None

    if "" in paths and (base / "cgroup.controllers").exists():  # cgroup v2 (unified)
        chain = _chain(base, paths[""])
        for directory in chain:
            cpu_max = (_read(directory / "cpu.max") or "").split()
            if len(cpu_max) == 2 and cpu_max[0] != "max":
                quotas.append(int(cpu_max[0]) / int(cpu_max[1]))
            limits.append(_int_or_none(_read(directory / "memory.max")))
        if chain:
            usage = _int_or_none(_read(chain[0] / "memory.current"))
    else:  # cgroup v1: one hierarchy per controller
        cpu_path = paths.get("cpu", paths.get("cpuacct"))
        for mount_name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = base / mount_name
            if cpu_path is None or not mount.is_dir():
                continue
            for directory in _chain(mount, cpu_path):
                quota = _int_or_none(_read(directory / "cpu.cfs_quota_us"))
                period = _int_or_none(_read(directory / "cpu.cfs_period_us"))
                if quota and period:
                    quotas.append(quota / period)
            break
        memory_mount = base / "memory"
        if "memory" in paths and memory_mount.is_dir():
            chain = _chain(memory_mount, paths["memory"])
            for directory in chain:
                limits.append(_int_or_none(_read(directory / "memory.limit_in_bytes")))
            if chain:
                usage = _int_or_none(_read(chain[0] / "memory.usage_in_bytes"))

    return CgroupLimits(
        cpu_quota=_min_or_none(quotas),
        memory_limit_bytes=_min_or_none(limits),
        memory_usage_bytes=usage,
    )


# --------------------------------------------------------------------------- assembly


def _probe_gpus() -> tuple[Gpu, ...]:
    """GPUs as torch sees them; empty without torch or without a GPU driver.

    Importing torch costs seconds, so it is only imported when a driver is there to find.
    """
    driver_present = any(
        os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")
    )
    if not driver_present or importlib.util.find_spec("torch") is None:
        return ()
    import torch

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(Gpu(index=index, name=props.name, memory_bytes=int(props.total_memory)))
    return tuple(gpus)


def _llama_gpu_offload() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (CUDA)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001 - a library that does not load cannot offload
        return False


def _fallback_cpu_model() -> str:
    try:
        import cpuinfo  # py-cpuinfo: slow (it may spawn a subprocess), so only when /proc lacks it

        return cpuinfo.get_cpu_info().get("brand_raw") or "unknown"
    except Exception:  # noqa: BLE001 - a missing model name must not stop detection
        return "unknown"


def detect(root: str | Path = "/", *, probe_gpus: bool | None = None) -> Topology:
    """Read the topology under ``root``; GPUs are probed only on the live machine by default."""
    root = Path(root)
    live = root == Path("/")
    cpus = read_cpu_topology(root)
    if cpus:
        logical = len(cpus)
        groups = sorted({cpu.siblings for cpu in cpus})
        sockets = len({cpu.package for cpu in cpus})
    elif live:  # no sysfs (not Linux): psutil knows the counts, not the sibling groups
        import psutil

        logical = psutil.cpu_count(logical=True) or 1
        physical = psutil.cpu_count(logical=False) or logical
        per_core = max(1, logical // physical)
        groups = [tuple(range(i, i + per_core)) for i in range(0, logical, per_core)]
        sockets = 1
    else:
        raise FileNotFoundError(f"{root}: no CPU topology under sys/devices/system/cpu")

    all_cpus = sorted(cpu for group in groups for cpu in group)
    affinity = read_affinity(root)
    if live and hasattr(os, "sched_getaffinity"):
        affinity = sorted(os.sched_getaffinity(0))
    if not affinity:
        affinity = all_cpus

    limits = read_cgroup_limits(root)
    usable = len(affinity)
    if limits.cpu_quota is not None:
        # A quota of 1.5 CPUs throttles a second busy thread; tune for the whole CPUs you get.
        usable = max(1, min(usable, math.floor(limits.cpu_quota)))

    meminfo = read_meminfo(root)
    if not meminfo and live:
        import psutil

        vm = psutil.virtual_memory()
        meminfo = {"MemTotal": vm.total, "MemAvailable": vm.available}
    total = meminfo.get("MemTotal", 0)
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", total))
    if limits.memory_limit_bytes is not None:
        room = limits.memory_limit_bytes - (limits.memory_usage_bytes or 0)
        available = max(0, min(available, room))

    model, flags = read_cpuinfo(root)
    if model is None:
        model = _fallback_cpu_model() if live else "unknown"
    key_flags = {f for f in KEY_CPU_FLAGS if f in flags}
    if any(f.startswith("amx") for f in key_flags):
        key_flags.add("amx")

    numa_nodes = read_numa_nodes(root)
    if not numa_nodes:  # no node directory (some containers, non-NUMA kernels): one node
        numa_nodes = [NumaNode(id=0, cpus=tuple(all_cpus), memory_total_bytes=total or None)]

    if probe_gpus is None:
        probe_gpus = live
    gpus = _probe_gpus() if probe_gpus else ()
    return Topology(
        logical_cpus=logical,
        physical_cores=len(groups),
        threads_per_core=max(len(g) for g in groups),
        smt_siblings=tuple(groups),
        sockets=sockets,
        numa_nodes=tuple(numa_nodes),
        affinity_cpus=tuple(affinity),
        cpu_quota=limits.cpu_quota,
        usable_cpus=usable,
        memory_total_bytes=total,
        memory_limit_bytes=limits.memory_limit_bytes,
        memory_available_bytes=available,
        cpu_model=model,
        cpu_flags=tuple(sorted(key_flags)),
        gpus=gpus,
        llama_gpu_offload=bool(gpus) and _llama_gpu_offload(),
    )
