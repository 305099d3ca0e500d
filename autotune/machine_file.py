"""Another machine as a file: the JSON its ``autotune detect --json`` printed, or a copy of its
``/proc`` and ``/sys`` (tests/fixtures/machines/). What ``--machine`` reads for `autotune plan`
and the simulated sweep; anything malformed is one ConfigError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from autotune.topology import Gpu, NumaNode, Topology, detect

__all__ = ["load_machine", "machine_file", "topology_from_dict"]


def _check_types(data: dict, kind) -> None:
    """TypeError naming the first field of ``data`` whose value is not of the scalar type
    ``kind`` (a dataclass) declares: a count given as "8" fails here, not deep in the search."""
    scalars = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    for f in fields(kind):
        if f.name not in data:
            continue
        value, names = data[f.name], [t.strip() for t in str(f.type).split("|")]
        allowed = tuple(t for name in names for t in scalars.get(name, ()))
        if not allowed or (value is None and "None" in names):
            continue  # a tuple or a nested type: checked where it is built
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise TypeError(f"{f.name} must be {' or '.join(names)}, got {value!r}")


def topology_from_dict(data: dict) -> Topology:
    """Inverse of `Topology.to_dict` (extra keys, such as the roofline's, are ignored); a
    TypeError or KeyError names what is not as `Topology.to_dict` writes it."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got a {type(data).__name__}")
    _check_types(data, Topology)
    known = {f.name for f in fields(Topology)}
    given = {k: v for k, v in data.items() if k in known}
    given["smt_siblings"] = tuple(tuple(g) for g in given["smt_siblings"])
    given["affinity_cpus"] = tuple(given["affinity_cpus"])
    given["cpu_flags"] = tuple(given["cpu_flags"])
    given["numa_nodes"] = tuple(
        NumaNode(**{**node, "cpus": tuple(node["cpus"])}) for node in given["numa_nodes"]
    )
    given["gpus"] = tuple(Gpu(**gpu) for gpu in given.get("gpus", ()))
    return Topology(**given)


def load_machine(path: str | Path) -> Topology:
    """Another machine, from the JSON its ``autotune detect --json`` printed, or from a copy
    of its ``/proc`` and ``/sys`` (a directory holding both, as tests/fixtures/machines/ has);
    anything else is a ConfigError naming it."""
    return machine_file(path)[0]


def machine_file(path: str | Path) -> tuple[Topology, dict]:
    """`load_machine`'s topology and the file's whole JSON (its roofline figures where
    ``detect --roofline`` measured them; empty for a /proc + /sys copy)."""
    from autotune.errors import ConfigError

    if Path(path).is_dir():
        if not (Path(path) / "proc").is_dir() or not (Path(path) / "sys").is_dir():
            raise ConfigError(f"--machine {path}: a directory without proc/ and sys/ in it")
        return detect(path, probe_gpus=False), {}
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"--machine {path}: cannot read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"--machine {path}: not JSON (use `autotune detect --json`)") from None
    try:
        return topology_from_dict(data), data
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(
            f"--machine {path}: not the output of `autotune detect --json` ({error!r})"
        ) from None
