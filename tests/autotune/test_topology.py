"""The topology parsers on fixture machines, with exact counts, and on the live machine."""

from __future__ import annotations

import os

import pytest

from autotune.topology import detect, parse_cpulist, read_cgroup_limits

GIB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", [0]), ("0-3", [0, 1, 2, 3]), ("0-1,8,10-11\n", [0, 1, 8, 10, 11]), ("", [])],
)
def test_parse_cpulist(text, expected):
    assert parse_cpulist(text) == expected


def test_epyc_16_cores_32_threads_smt(machine):
    topo = detect(machine("epyc_16c32t"))
    assert topo.logical_cpus == 32
    assert topo.physical_cores == 16
    assert topo.threads_per_core == 2
    assert topo.sockets == 1
    assert topo.smt_enabled
    # Linux numbers the second hardware thread of core i as i + 16 on this CPU.
    assert topo.smt_siblings[0] == (0, 16)
    assert topo.smt_siblings[15] == (15, 31)
    assert topo.usable_cpus == 32
    assert topo.cpu_quota is None and topo.memory_limit_bytes is None
    assert topo.memory_total_bytes == 128 * GIB
    assert topo.cpu_model == "AMD EPYC 7313P 16-Core Processor"
    assert "avx2" in topo.cpu_flags and "avx512f" not in topo.cpu_flags


def test_desktop_8c16t_avx512_flags(machine):
    topo = detect(machine("desktop_8c16t"))
    assert (topo.logical_cpus, topo.physical_cores, topo.threads_per_core) == (16, 8, 2)
    assert {"avx512f", "avx512_vnni", "avx512_bf16"} <= set(topo.cpu_flags)
    assert "amx" not in topo.cpu_flags


def test_two_vcpu_vm_without_smt(machine):
    topo = detect(machine("vm_2vcpu"))
    assert (topo.logical_cpus, topo.physical_cores, topo.threads_per_core) == (2, 2, 1)
    assert not topo.smt_enabled
    assert topo.smt_siblings == ((0,), (1,))
    # cgroup v1 "no limit" is a huge number, not a limit
    assert topo.memory_limit_bytes is None
    assert topo.usable_cpus == 2
    assert topo.memory_available_bytes == 16 * GIB


def test_dual_socket_two_numa_nodes(machine):
    topo = detect(machine("dual_socket_numa"))
    assert (topo.logical_cpus, topo.physical_cores, topo.sockets) == (32, 16, 2)
    assert [node.id for node in topo.numa_nodes] == [0, 1]
    assert topo.numa_nodes[0].cpus == tuple(range(0, 8)) + tuple(range(16, 24))
    assert topo.numa_nodes[1].cpus == tuple(range(8, 16)) + tuple(range(24, 32))
    assert topo.numa_nodes[1].memory_total_bytes == 96 * GIB


def test_container_cgroup_v2_limits_2_cpus_4_gib(machine):
    topo = detect(machine("container_64cpu_2cpu_4g"))
    assert topo.logical_cpus == 64 and topo.physical_cores == 32
    assert len(topo.affinity_cpus) == 64
    assert topo.cpu_quota == 2.0
    assert topo.usable_cpus == 2
    assert topo.memory_limit_bytes == 4 * GIB
    # 512 MiB of the 4 GiB are already in use in the container
    assert topo.memory_available_bytes == 4 * GIB - 512 * 2**20
    assert {"amx", "amx_tile", "amx_bf16", "amx_int8", "avx512_bf16"} <= set(topo.cpu_flags)


def test_container_cgroup_v1_limit_on_parent_group(machine):
    topo = detect(machine("container_v1_quota"))
    limits = read_cgroup_limits(machine("container_v1_quota"))
    assert limits.cpu_quota == 1.5
    assert limits.memory_limit_bytes == 2 * GIB
    # 1.5 CPUs of quota: tune for one whole CPU
    assert topo.usable_cpus == 1
    assert topo.memory_available_bytes == 2 * GIB - 256 * 2**20


def test_to_dict_has_the_documented_keys(machine):
    data = detect(machine("epyc_16c32t")).to_dict()
    for key in (
        "logical_cpus",
        "physical_cores",
        "threads_per_core",
        "smt_siblings",
        "sockets",
        "numa_nodes",
        "usable_cpus",
        "memory_total_bytes",
        "memory_available_bytes",
        "cpu_model",
        "cpu_flags",
        "gpus",
    ):
        assert key in data, key
    assert data["smt_siblings"][0] == [0, 16]
    assert data["numa_nodes"][0]["cpus"][:2] == [0, 1]


def test_fingerprint_tells_machines_apart(machine):
    prints = {
        detect(machine(name)).fingerprint() for name in ("epyc_16c32t", "desktop_8c16t", "vm_2vcpu")
    }
    assert len(prints) == 3


def test_live_machine_matches_the_os():
    topo = detect()
    assert topo.logical_cpus == os.cpu_count()
    assert set(topo.affinity_cpus) == os.sched_getaffinity(0)
    assert 1 <= topo.usable_cpus <= topo.logical_cpus
    assert 0 < topo.memory_available_bytes <= topo.memory_total_bytes
    assert topo.physical_cores * topo.threads_per_core >= topo.logical_cpus


def test_missing_tree_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect(tmp_path)
