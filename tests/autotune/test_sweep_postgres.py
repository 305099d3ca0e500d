"""Two sweep processes on one study in PostgreSQL (--storage), as several machines would run.

Starts a throwaway PostgreSQL server (Debian's package) on the loopback interface; marked slow
(an integration test: a server start, two sweeps), so it runs in CI's second pass.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

pytestmark = pytest.mark.slow


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if found is None:
        message = f"PostgreSQL's {name} is not installed (Debian package postgresql)"
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a failure
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 with a database ``studies``; yields its URL."""
    initdb, server, createdb = (_postgres_bin(n) for n in ("initdb", "postgres", "createdb"))
    # Not under tmp_path: pytest makes that private to us, and the server may run as another
    # user (PostgreSQL refuses to run as root, so as root it runs as the package's own user).
    home = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    os.chmod(home, 0o755)
    prefix = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = home / "data", _free_port()
    subprocess.run(
        [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "autotune"],
        check=True,
        capture_output=True,
    )
    process = subprocess.Popen(
        [
            *prefix,
            server,
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(home),
            "-c",
            "listen_addresses=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            made = subprocess.run(
                [
                    *prefix,
                    createdb,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "autotune",
                    "studies",
                ],
                capture_output=True,
                text=True,
            )
            if made.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {made.stderr}")
            time.sleep(0.3)
        yield f"postgresql+psycopg2://autotune@127.0.0.1:{port}/studies"
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def _sweep(reports, storage, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autotune",
            "sweep",
            "--backends",
            "fake",
            "--budget",
            "90s",
            "--trials",
            "6",
            "--limit",
            "4",
            "--study",
            "shared",
            "--storage",
            storage,
            "--reports",
            str(reports),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_sweeps_share_one_postgres_study(tmp_path, postgres):
    first = _sweep(tmp_path / "a", postgres)
    # The second joins once the first has created the study.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = {s.study_name for s in optuna.get_all_study_summaries(postgres)}
        if "shared" in names:
            break
        time.sleep(0.3)
    second = _sweep(tmp_path / "b", postgres, "--resume")
    for process in (first, second):
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    study = optuna.load_study(study_name="shared", storage=postgres)
    records = [t.user_attrs["record"] for t in study.trials if "record" in t.user_attrs]
    finished = [r for r in records if r["state"] in ("complete", "fail")]
    workers = {r["worker"] for r in finished}
    assert len(workers) == 2, "both processes ran trials of the one study"
    assert len({t.number for t in study.trials}) == len(study.trials)
    roles = [r.get("role") for r in finished]
    assert roles.count("baseline") == 1
