"""The llama.cpp backend's worker processes: started, spoken to, waited on, ended.

One spawn-context process per worker (`backends.llamacpp.worker.worker_main`), a pipe each
for its messages, and one shared task queue, so a fast worker takes more prompts. The parent
only ever sleeps in ``multiprocessing.connection.wait`` on the pipes and the processes'
sentinels: it takes no CPU from the workers, and notices at once when one dies.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import wait
from typing import Any

from autotune.errors import BackendError
from autotune.failures import killed_by, signal_class
from backends.llamacpp.worker import worker_main

__all__ = ["WorkerPool"]

_CLOSE_GRACE_S = 5.0
_ENDS = ("ready", "done", "scores")  # the messages that end what the parent waits for


class WorkerPool:
    """Started worker processes with their pipes and the shared task queue."""

    def __init__(self, processes: list, conns: list, tasks: Any, cut: Any) -> None:
        self._processes = processes
        self._conns = conns
        self._tasks = tasks  # a spawn context's Queue
        self._cut = cut  # a spawn context's Event, seen by every worker

    @classmethod
    def start(cls, worker_args: Sequence[tuple]) -> WorkerPool:
        """One worker per entry of ``worker_args`` (`worker_main`'s arguments before the task
        queue and its pipe end)."""
        # spawn, not fork: a fresh interpreter per worker, no inherited threads or locks.
        context = multiprocessing.get_context("spawn")
        tasks, cut = context.Queue(), context.Event()
        processes, conns = [], []
        for args in worker_args:
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(*args, tasks, cut, child_end),
                name=f"autotune-llamacpp-{args[0]}",
                daemon=True,
            )
            process.start()
            child_end.close()
            processes.append(process)
            conns.append(parent_end)
        return cls(processes, conns, tasks, cut)

    @property
    def size(self) -> int:
        return len(self._processes)

    def submit(self, settings: dict, texts: Sequence[str]) -> None:
        """One round: every worker gets ``settings``; the texts go into the shared queue,
        then one end-of-round marker per worker."""
        self._cut.clear()
        for conn in self._conns:
            conn.send(("generate", settings))
        for index, text in enumerate(texts):
            self._tasks.put((index, text))
        for _ in self._processes:
            self._tasks.put(None)

    def cut(self) -> None:
        """Stop the round: every worker sends what it runs, and what is left in the queue,
        as results marked cut, then its done."""
        self._cut.set()

    def ask(self, rank: int, message: tuple) -> None:
        """Send ``message`` to worker ``rank`` alone (a scoring request)."""
        self._conns[rank].send(message)

    def messages(self, expect: int) -> Iterator[tuple[str, int, Any]]:
        """Yield (kind, rank, payload) until ``expect`` ready/done/scores messages have arrived.

        Sleeps in a blocking wait; a worker that reports an error or dies ends it with
        BackendError naming the worker.
        """
        open_conns = {conn: rank for rank, conn in enumerate(self._conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._processes)}
        finished = 0

        def receive(conn):
            """The next message of ``conn``, or None once it is closed (then stop waiting on it)."""
            try:
                return conn.recv()
            except (EOFError, OSError):
                open_conns.pop(conn, None)
                return None

        def handle(message):
            kind, rank, *rest = message
            if kind == "error":
                raise BackendError(f"llamacpp worker {rank} failed:\n{rest[0].rstrip()}")
            return kind, rank, rest[0] if len(rest) == 1 else tuple(rest)

        while finished < expect:
            for ready in wait(list(open_conns) + list(sentinels)):
                if ready in sentinels:
                    rank = sentinels[ready]
                    conn = self._conns[rank]
                    # Its last words first: results it sent, or an error report, which says
                    # more than "died".
                    while conn in open_conns and conn.poll():
                        if (message := receive(conn)) is not None:
                            kind, rank_, payload = handle(message)
                            finished += kind in _ENDS
                            yield kind, rank_, payload
                    process = self._processes[rank]
                    process.join(1)
                    code, why = process.exitcode, _exit_reason(process)
                    raise BackendError(
                        f"llamacpp worker {rank} (pid {process.pid}) died ({why})",
                        failure_class=signal_class(-code) if code and code < 0 else None,
                    )
                if ready not in open_conns:
                    continue
                message = receive(ready)
                if message is None:
                    continue  # the pipe closed: the worker's sentinel will say why
                kind, rank, payload = handle(message)
                finished += kind in _ENDS
                yield kind, rank, payload

    def close(self) -> None:
        """Ask every worker to exit, then make sure: terminate, kill. Safe to call twice."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + _CLOSE_GRACE_S
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(1)
            if process.is_alive():
                process.kill()
                process.join(1)
        for conn in self._conns:
            conn.close()
        if self._tasks is not None:
            self._tasks.cancel_join_thread()  # never block exit on undelivered tasks
            self._tasks.close()
        self._processes, self._conns, self._tasks = [], [], None


def _exit_reason(process: multiprocessing.Process) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        return killed_by(-code)
    return f"exit code {code}"
