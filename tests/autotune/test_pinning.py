"""CPU sets per worker from fixture topologies."""

from __future__ import annotations

import pytest

from autotune.errors import ConfigError
from autotune.pinning import cpu_order, cpu_sets
from autotune.topology import detect


def test_spread_uses_physical_cores_before_smt_siblings(machine):
    epyc = detect(machine("epyc_16c32t"))
    order = cpu_order(epyc, "spread")
    assert order[:16] == list(range(16)) and order[16:] == list(range(16, 32))
    assert cpu_sets(epyc, 4, 2, "spread") == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_compact_keeps_a_workers_threads_on_sibling_threads(machine):
    epyc = detect(machine("epyc_16c32t"))
    assert cpu_sets(epyc, 2, 2, "compact") == [(0, 16), (1, 17)]


def test_none_is_no_pinning_and_too_many_is_an_error(machine):
    container = detect(machine("container_64cpu_2cpu_4g"))
    assert cpu_sets(container, 8, 8, "none") is None
    # the quota allows 2 CPUs although 64 are in the affinity mask
    assert cpu_sets(container, 2, 1, "spread") == [(0,), (1,)]
    with pytest.raises(ConfigError, match="3 workers x 1 threads need 3 CPUs, 2 usable"):
        cpu_sets(container, 3, 1, "spread")
