"""Shared test helpers: fixture locations and a way to run the real CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MACHINES = FIXTURES / "machines"
REPO = Path(__file__).parent.parent


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``python -m autotune ARGS`` as a user would, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "autotune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA device (torch is
    imported only when such a test was collected)."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def machine():
    """Path of a named fixture machine tree."""
    return lambda name: MACHINES / name


def _test_cache() -> Path:
    """A cache the tests may fill and keep between runs (never the user's own)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autotune-tests"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache():
    """Every test sees AUTOTUNE_CACHE pointing at the test cache."""
    previous = os.environ.get("AUTOTUNE_CACHE")
    os.environ["AUTOTUNE_CACHE"] = str(_test_cache())
    yield _test_cache()
    if previous is None:
        os.environ.pop("AUTOTUNE_CACHE", None)
    else:
        os.environ["AUTOTUNE_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_gguf(isolated_cache):
    """ModelSpec of a tiny random Llama GGUF (seeded: built once, reused across runs).

    Four layers, so the pipeline tests can split it into up to four stages.
    """
    from autotune.cache import file_lock
    from autotune.models import ModelSpec

    # Loaded by path: putting tests/ on sys.path would let tests/backends/ shadow the
    # backends package.
    helper = importlib.util.spec_from_file_location(
        "tiny_model", Path(__file__).with_name("tiny_model.py")
    )
    tiny_model = importlib.util.module_from_spec(helper)
    helper.loader.exec_module(tiny_model)

    path = isolated_cache / "tiny-random-llama-4l.gguf"
    with file_lock(isolated_cache / "tiny-random-llama.lock"):
        if not path.is_file():
            partial = path.with_suffix(".partial")
            tiny_model.build_tiny_llama(partial, ModelSpec.resolve().path, layers=4)
            partial.replace(path)
    return ModelSpec.resolve(str(path))


@pytest.fixture(scope="session")
def topology():
    from autotune.topology import detect

    return detect()


@pytest.fixture
def simulated_sweep(topology, tiny_gguf):
    """Run a whole sweep on a fake clock with simulated fake-backend trials (no process, no
    sleep): ``simulated_sweep(options, extra=[...])`` returns (summary, clock, runner).
    ``change(spec, outcome)`` may edit each simulated outcome before the sweep sees it."""
    from autotune.models import model_shape
    from autotune.simulate import FakeClock, SimulatedTrials
    from autotune.sweep import Sweep

    def run(options, extra=(), machine=None, change=None):
        clock = FakeClock()
        runner = SimulatedTrials(clock, machine or topology)

        def changed(spec, deadline_s):
            outcome = runner(spec, deadline_s)
            change(spec, outcome)
            return outcome

        summary = Sweep(
            options,
            topology=machine or topology,
            model=tiny_gguf,
            shape=model_shape(tiny_gguf),
            clock=clock,
            runner=changed if change else runner,
            extra=list(extra),
        ).run()
        return summary, clock, runner

    return run
