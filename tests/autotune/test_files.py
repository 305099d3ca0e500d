"""`autotune.files`: whole files replaced in one step, with the mode any new file gets."""

from __future__ import annotations

import os
import stat

import pytest

from autotune.files import atomic_write


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    atomic_write(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o644
    umask(0o027)
    atomic_write(tmp_path / "b.env", b"X=1\n")
    assert mode(tmp_path / "b.env") == 0o640


def test_a_sweeps_files_all_have_one_mode(tmp_path, umask, simulated_sweep):
    from autotune.sweep import SweepOptions

    simulated_sweep(
        SweepOptions(study="m", reports_dir=tmp_path, budget_s=30.0, backends=["fake"], limit=4)
    )
    modes = {p.name: mode(p) for p in (tmp_path / "m").iterdir() if p.is_file()}
    assert {"best.env", "summary.json", "machine.json", "trials.jsonl"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
