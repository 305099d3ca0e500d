"""The parent's side of a group of torch ranks started by torch's own launcher.

`RankGroup` runs ``python -m torch.distributed.run`` (torchrun) on ``backends.torch.rank``
with ``nproc`` ranks on this node. Rank 0 connects back over a Unix socket in a private
directory; the parent sends it ``("generate", prompts, settings)`` and gets the gathered
completions back. The parent only ever sleeps in a blocking ``wait`` on that socket and on
the launcher's exit, so it takes no CPU from the ranks.

Failures: torchrun's elastic agent watches every rank; when one dies it stops the others and
exits, and we turn its "Root Cause" report (plus the rank's own traceback, which each rank
writes to ``rank<N>.error``) into one BackendError naming the rank. A rank that hangs makes the
others' collectives time out (``AUTOTUNE_COLLECTIVE_TIMEOUT_S``, default 120 s), which ends the
same way. `close` always leaves no process behind: the launcher runs in its own session, and
what is still alive after the grace period is killed as a group.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import psutil

from autotune.config import TrialConfig
from autotune.errors import BackendError, ConfigError
from autotune.failures import killed_by, signal_class
from autotune.workload import GenerationSettings, Prompt
from backends.base import Backend, Completion, ScoreRequest, TokenScores

__all__ = ["RankGroup", "RankGroupBackend", "collective_timeout_s"]

_CLOSE_GRACE_S = 10.0
# After rank 0 reported an error, how long to wait for the agent's verdict on which rank failed
# first (a rank that died makes rank 0's next receive fail too).
_VERDICT_WAIT_S = 3.0
_DEFAULT_TIMEOUT_S = 120.0


def collective_timeout_s() -> float:
    """Seconds a rank waits on another before giving up (AUTOTUNE_COLLECTIVE_TIMEOUT_S)."""
    raw = os.environ.get("AUTOTUNE_COLLECTIVE_TIMEOUT_S")
    if raw is None:
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):  # nan and inf pass a plain "> 0"
        raise ConfigError(
            f"AUTOTUNE_COLLECTIVE_TIMEOUT_S must be a number of seconds > 0, got {raw!r}"
        )
    return value


class RankGroup:
    """``nproc`` torch ranks running ``spec`` (a JSON-ready dict for ``backends.torch.rank``)."""

    def __init__(self, name: str, spec: dict, nproc: int, threads_per_rank: int) -> None:
        self.name = name
        self.spec = spec
        self.nproc = nproc
        self.threads_per_rank = threads_per_rank
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.rundir: Path | None = None
        self.load_times_s: list[float] = []
        self.info: dict = {}
        self._ranks: list[psutil.Process] = []
        self._failed = False

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Launch the ranks and wait until every one has loaded its part of the model."""
        self.rundir = Path(tempfile.mkdtemp(prefix=f"autotune-{self.name}-"))
        address = str(self.rundir / "rank0.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(1)
        spec_path = self.rundir / "spec.json"
        spec_path.write_text(
            json.dumps({**self.spec, "address": address, "rundir": str(self.rundir)})
        )
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={self.nproc}",
            "--max-restarts=0",
            "--monitor-interval=0.1",
            "-m",
            "backends.torch.rank",
        ]
        env = {
            **os.environ,
            "AUTOTUNE_RANK_SPEC": str(spec_path),
            # torchrun would set 1 (with a warning); the ranks set torch's own count too.
            "OMP_NUM_THREADS": str(self.threads_per_rank),
            "PYTHONUNBUFFERED": "1",
        }
        self._log = open(self.rundir / "launcher.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: close() can end all of it
        )
        # Readable once the launcher has exited: lets us sleep on "a message or its end".
        self._exit_fd = os.pidfd_open(self.process.pid)
        try:
            ready = wait([server, self._exit_fd])
            if server not in ready:
                self._raise_failure("while loading")
            sock, _ = server.accept()
        finally:
            server.close()
        self.conn = Connection(sock.detach())
        kind, payload = self._receive("while loading")
        if kind != "ready":
            raise BackendError(f"{self.name}: rank 0 sent {kind!r} before 'ready'")
        self.pids = payload["pids"]
        # psutil remembers each process's start time, so a later kill never hits a reused pid.
        self._ranks = []
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                self._ranks.append(psutil.Process(pid))
        self.load_times_s = payload["load_times_s"]
        self.info = payload.get("info", {})

    # ------------------------------------------------------------------ requests

    def request(self, message: tuple) -> object:
        """Send one request to rank 0 and return its answer's payload."""
        if self.conn is None:
            raise BackendError(f"{self.name}: generate() before load()")
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            self._raise_failure("while generating")
        kind, payload = self._receive("while generating")
        if kind != "result":
            raise BackendError(f"{self.name}: rank 0 sent {kind!r} instead of a result")
        return payload

    def _receive(self, when: str) -> tuple[str, Any]:
        """The next message from rank 0; a failure anywhere in the group raises BackendError."""
        ready = wait([self.conn, self._exit_fd])
        if self.conn in ready:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                self._raise_failure(when)
            if kind == "error":
                self._raise_failure(when, reported=payload)
            return kind, payload
        self._raise_failure(when)
        raise AssertionError("unreachable")

    def _raise_failure(self, when: str, reported: str | None = None) -> None:
        """Explain why the group failed, naming the rank that caused it, and raise.

        When one rank dies, the others fail too (their next receive from it breaks) and the
        agent then stops the rest with SIGTERM. So the culprit is, in this order: a rank killed
        by any other signal (SIGKILL from the OOM killer or a user, SIGSEGV); a rank whose own
        error is not about another rank; the rank another rank waited on in vain (a hang).
        """
        self._failed = True  # close() need not wait for a clean exit
        # Let the agent finish stopping the other ranks and write its report.
        try:
            self.process.wait(timeout=_CLOSE_GRACE_S if reported is None else _VERDICT_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        self._log.flush()
        log = (self.rundir / "launcher.log").read_text(errors="replace")
        exits = _agent_failures(log)  # rank -> (pid, exit code)
        errors = {}
        for rank in range(self.nproc):
            error_file = self.rundir / f"rank{rank}.error"
            if error_file.exists():
                errors[rank] = error_file.read_text(errors="replace")
        if reported is not None:
            errors.setdefault(0, reported)

        def pid_of(rank: int) -> int | None:
            if rank in exits:
                return exits[rank][0]
            return self.pids[rank] if rank < len(self.pids) else None

        culprit, failure_class = None, None
        for rank, (pid, code) in sorted(exits.items()):
            if code < 0 and -code != signal.SIGTERM:
                culprit, failure_class = (rank, pid, killed_by(-code)), signal_class(-code)
                break
        if culprit is None:
            for rank, text in errors.items():
                if _PEER_MARK not in text:
                    culprit = rank, pid_of(rank), _last_line(text)
                    break
        if culprit is None:
            for text in errors.values():
                peer = re.search(r"rank (\d+) " + _PEER_MARK, text)
                if peer:
                    rank = int(peer.group(1))
                    culprit = rank, pid_of(rank), _last_line(text).removeprefix("RuntimeError: ")
                    break
        if culprit is None and exits:
            rank, (pid, code) = min(exits.items())
            culprit = rank, pid, f"exit code {code}"
        if culprit is None:
            tail = " | ".join(log.strip().splitlines()[-3:])
            raise BackendError(
                f"{self.name} failed {when}: the launcher exited with code "
                f"{self.process.returncode}: {tail}"
            )
        rank, pid, what = culprit
        who = f"rank {rank}" + (f" (pid {pid})" if pid is not None else "")
        raise BackendError(f"{self.name} {who} failed {when}: {what}", failure_class)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Ask the ranks to exit; whatever is still alive after the grace period is killed."""
        if self.conn is not None:
            try:
                self.conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        if self.process is not None:
            try:
                self.process.wait(timeout=0 if self._failed else _CLOSE_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            # The launcher's session (torchrun and its agent), then the ranks, which the agent
            # starts in sessions of their own.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.5 if sig == signal.SIGTERM else 0)
            for rank in self._ranks:
                with contextlib.suppress(psutil.Error):
                    rank.kill()
            psutil.wait_procs(self._ranks, timeout=5)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._log.close()
            os.close(self._exit_fd)
        if self.conn is not None:
            self.conn.close()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
        self.process, self.conn, self.rundir = None, None, None


# What a rank's error says when the fault is another rank's (see backends.torch.rank.recv_object).
_PEER_MARK = "hung or died"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def _agent_failures(log: str) -> dict[int, tuple[int, int]]:
    """rank -> (pid, exit code) for every failure in torchrun's report."""
    found = {}
    for match in re.finditer(
        r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", log
    ):
        found[int(match.group(1))] = (int(match.group(3)), int(match.group(2)))
    return found


class RankGroupBackend(Backend):
    """A backend whose processes are a torchrun rank group (ddp, pipeline).

    Subclasses give `rank_spec` (what every rank needs) and may override `_answer` (how rank
    0's answer becomes completions); load, generate and close are the same for all.
    """

    @classmethod
    def rank_spec(cls, config: TrialConfig, model_dir: str, topology, pins=None) -> dict:
        """What every rank needs, JSON-ready (also used by the by-hand torchrun mode): at
        least ``kind``, ``config``, ``model_dir``, ``pins``, ``devices`` (each rank's
        placement entry, `Backend.devices`) and ``timeout_s``."""
        raise NotImplementedError

    def __init__(self, config, model, topology) -> None:
        super().__init__(config, model, topology)
        self.group: RankGroup | None = None

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids, rank order (empty before load)."""
        return self.group.pids if self.group else []

    @property
    def load_times_s(self) -> list[float]:
        """Each rank's load time, rank order (empty before load)."""
        return self.group.load_times_s if self.group else []

    def load(self) -> None:
        from autotune.models import hf_dir
        from autotune.pinning import cpu_sets

        ranks, threads = self.config.processes, self.config.threads_per_worker
        pins = cpu_sets(self.topology, ranks, threads, self.config.pinning)
        spec = self.rank_spec(
            self.config,
            str(hf_dir(self.model)),
            self.topology,
            [sorted(p) for p in pins] if pins else None,
        )
        self.group = RankGroup(self.name, spec, ranks, threads)
        try:
            self.group.start()
        except BaseException:
            self.close()
            raise

    def _answer(self, payload) -> list[Completion]:
        return payload

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[Completion]:
        if self.group is None:
            raise BackendError(f"{self.name} backend: generate() before load()")
        return self._answer(self.group.request(("generate", tuple(prompts), settings)))

    def score(
        self, requests: Sequence[ScoreRequest], settings: GenerationSettings, k: int
    ) -> list[TokenScores]:
        """Teacher forcing on the ranks (each kind's worker ``score``: ddp's ranks shard the
        requests, the pipeline's stages pass each one down); all of them back from rank 0."""
        if self.group is None:
            raise BackendError(f"{self.name} backend: score() before load()")
        return self.group.request(("score", tuple(requests), settings, k))  # type: ignore[return-value]

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
