"""One trial in its own process, with a deadline; whatever happens to it becomes data.

The parent writes a spec (config, workload, how to measure) to a file and starts
``python -m autotune.trial SPEC RESULT``; the child measures with `autotune.measure.benchmark`
and writes the RunResult as JSON. The parent sleeps in a blocking wait on the child's exit
(a pidfd) until the deadline. Outcomes:

- ``complete``: the result file is there;
- ``timeout``: past the deadline (the child and everything it started are killed);
- ``oom``: killed by SIGKILL (the kernel's OOM killer), a MemoryError, or a worker of the trial
  killed by SIGKILL;
- ``illegal-instruction``: killed by SIGILL, or a worker of it (a CPU that advertises AMX but
  traps it; `autotune.failures.fix_for` names the fix);
- ``invalid``: the child refused the config (exit code 2, a ConfigError);
- ``crash``: any other non-zero exit.

A "paired" spec loads two configs side by side and times them alternately (A B A B ...), for
the sweep's final comparison against the baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import psutil

from autotune.failures import FailureClass, classify

__all__ = ["TrialOutcome", "run_in_child"]

_STDERR_TAIL = 2000


@dataclass
class TrialOutcome:
    """What became of one trial process."""

    complete: bool  # the result is there; else it failed of ``failure_class``
    failure_class: FailureClass | None = None
    result: dict | None = None  # the child's RunResult as JSON, with its answers
    stderr_tail: str = ""
    duration_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _kill_tree(process: subprocess.Popen) -> None:
    """The child and every process under it (torchrun's ranks live in sessions of their own,
    so a process-group kill would miss them)."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(tree, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def run_in_child(spec: dict, deadline_s: float) -> TrialOutcome:
    """Run ``spec`` in a fresh process; kill it (and its children) after ``deadline_s``.

    KeyboardInterrupt kills the child and is raised again.
    """
    with tempfile.TemporaryDirectory(prefix="autotune-trial-") as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        stderr_path = Path(scratch) / "stderr.txt"
        spec_path.write_text(json.dumps(spec))
        started = time.monotonic()
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "autotune.trial", str(spec_path), str(result_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # Ctrl-C reaches the sweep only; it ends the child
            )
            exited = os.pidfd_open(process.pid)
            try:
                finished = bool(wait([exited], timeout=max(0.0, deadline_s)))
            except KeyboardInterrupt:
                _kill_tree(process)
                raise
            finally:
                os.close(exited)
            if not finished:
                _kill_tree(process)
            else:
                process.wait()
        duration = time.monotonic() - started
        tail = stderr_path.read_text(errors="replace")[-_STDERR_TAIL:]
        if not finished:
            return TrialOutcome(
                False,
                FailureClass.TIMEOUT,
                stderr_tail=tail,
                duration_s=duration,
                extra={"deadline_s": deadline_s},
            )
        if process.returncode == 0 and result_path.exists():
            return TrialOutcome(
                True,
                result=json.loads(result_path.read_text()),
                stderr_tail=tail,
                duration_s=duration,
            )
        return TrialOutcome(
            False,
            classify(process.returncode, tail),
            stderr_tail=tail,
            duration_s=duration,
            extra={"returncode": process.returncode},
        )


# ---------------------------------------------------------------- the child


def _measure(spec: dict) -> dict:
    from autotune.config import TrialConfig
    from autotune.measure import Pacing, benchmark
    from autotune.models import ModelSpec
    from autotune.quality import ReferenceScores
    from autotune.topology import detect
    from autotune.workload import load_workload

    config = TrialConfig.from_dict(spec["config"])
    workload = load_workload(spec.get("workload"))
    if spec.get("limit"):
        workload = workload.head(spec["limit"])
    pacing = Pacing(**spec["pacing"])
    model = ModelSpec.resolve(config.model)
    topology = detect()
    if spec.get("paired"):
        return _paired(spec, config, workload, pacing, model, topology)
    reference = spec.get("quality_reference")
    result = benchmark(
        config,
        workload,
        model,
        topology,
        pacing,
        stop_below=spec.get("stop_below"),
        quality_reference=ReferenceScores.load(reference) if reference else None,
        keep_reference=bool(spec.get("keep_reference")),
    )
    return {**result.to_dict(), "answers": result.answers()}


def _paired(spec, candidate, workload, pacing, model, topology) -> dict:
    """Load the baseline and the candidate side by side and time them alternately (A B, B A,
    ...), each pass measured as a trial measures its passes (`autotune.passes.Sample.figure`);
    with each side's failed requests (a pair is only a comparison when both answered all)."""
    from autotune.config import TrialConfig
    from autotune.measure import pair_warmup_waves, refills, timed_pass, warm_up, width_of
    from backends import create_backend

    configs = {"baseline": TrialConfig.from_dict(spec["paired"]), "candidate": candidate}
    backends = {name: create_backend(c, model, topology) for name, c in configs.items()}
    passes = {
        name: pacing.pass_of(workload, width_of(c), refills(c)) for name, c in configs.items()
    }
    rates: dict[str, list[float]] = {"baseline": [], "candidate": []}
    failed = {"baseline": 0, "candidate": 0}  # requests without an answer, per side
    try:
        for name, backend in backends.items():
            backend.load()
            waves = pair_warmup_waves(configs[name], topology, pacing)
            warm_up(backend, passes[name], configs[name], waves)
        order = list(backends.items())
        for pair in range(spec["pairs"]):
            # Alternate which goes first (A B, B A, ...): whatever drifts over the pairs (the
            # machine warming up, a neighbour starting) then favours neither side.
            for name, backend in order if pair % 2 == 0 else order[::-1]:
                sample, answers = timed_pass(
                    backend, passes[name], configs[name], topology.usable_cpus, pacing.cut_tail
                )
                rates[name].append(sample.figure)
                failed[name] += sum(c.error is not None for c in answers)
    finally:
        for backend in backends.values():
            backend.close()
    return {**rates, "failed_requests": failed}


def main(argv: list[str]) -> int:
    """``python -m autotune.trial SPEC RESULT``: measure, write the result, exit 0."""
    from autotune.errors import ConfigError
    from autotune.files import atomic_write

    spec_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result = _measure(json.loads(spec_path.read_text()))
    except ConfigError as error:
        print(f"invalid config: {error}", file=sys.stderr)
        return 2
    atomic_write(result_path, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
