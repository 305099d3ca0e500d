"""What a trial, a bench, a paired run or an `autotune run` chunk died of, and what to do.

One list of failure classes (`classify` turns a process's exit into one) and, for the classes
a user can act on, the one line that names the fix (`fix_for`). A process killed by a signal
is described the same way everywhere (`killed_by`).
"""

from __future__ import annotations

import signal
from enum import Enum

__all__ = ["FailureClass", "classify", "fix_for", "killed_by", "signal_class"]


class FailureClass(str, Enum):
    """What a trial (or a bench, a pair, a chunk of `autotune run`) failed of. A str, so a
    record's JSON holds the bare value and older studies read back unchanged."""

    OOM = "oom"  # killed by SIGKILL (the OOM killer) or a MemoryError
    CRASH = "crash"  # any other non-zero exit
    INVALID = "invalid"  # the child refused the config (exit 2, a ConfigError)
    ILLEGAL_INSTRUCTION = "illegal-instruction"  # SIGILL, see `fix_for`
    TIMEOUT = "timeout"  # past its deadline, killed
    REQUESTS = "requests"  # measured, but some requests had no answer
    INTERRUPTED = "interrupted"  # Ctrl-C

    def __str__(self) -> str:
        return self.value


_FIXES = {
    FailureClass.ILLEGAL_INSTRUCTION: (
        "the CPU trapped an instruction the build uses (SIGILL; a VM that advertises AMX but "
        "traps it): run llama.cpp with --no-extra-buffers (LLAMA_EXTRA_BUFFERS=0), or rebuild "
        'it for a portable CPU: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall '
        "--no-cache-dir llama-cpp-python"
    ),
}


def fix_for(failure_class: FailureClass | str | None) -> str | None:
    """The one line that names the fix for ``failure_class``, or None where there is none."""
    return _FIXES.get(failure_class or "")  # type: ignore[call-overload]


def signal_class(number: int) -> FailureClass | None:
    """The failure class of a process killed by signal ``number``: SIGKILL is the OOM
    killer's (or a user's), SIGILL an illegal instruction; None for the others (a crash)."""
    return {
        int(signal.SIGKILL): FailureClass.OOM,
        int(signal.SIGILL): FailureClass.ILLEGAL_INSTRUCTION,
    }.get(number)


def killed_by(number: int) -> str:
    """``killed by signal NAME``, and the fix where the signal has one (SIGILL)."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = str(number)
    fix = fix_for(signal_class(number))
    return f"killed by signal {name}" + (f": {fix}" if fix else "")


def classify(returncode: int, stderr: str) -> FailureClass:
    """The failure class of a child that exited with ``returncode`` and wrote ``stderr``: killed
    by SIGILL (itself, or a worker of it: the message names the signal) is
    ``illegal-instruction``; by SIGKILL, or a MemoryError, ``oom``; exit code 2 (a ConfigError)
    ``invalid``; anything else ``crash``."""
    if returncode == -signal.SIGILL or "signal SIGILL" in stderr:
        return FailureClass.ILLEGAL_INSTRUCTION
    if returncode == -signal.SIGKILL or "MemoryError" in stderr or "SIGKILL" in stderr:
        return FailureClass.OOM
    if returncode == 2:
        return FailureClass.INVALID
    return FailureClass.CRASH
