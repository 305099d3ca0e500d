"""The exception hierarchy every part of autotune raises.

The CLI's single top-level handler maps these to one clear line and an exit code:
`ConfigError` (a user's mistake: bad flag, file, line or variable) exits 2, any other
`AutotuneError` exits 1. Nothing a user typed should ever produce a traceback.
"""

from __future__ import annotations

from autotune.failures import FailureClass

__all__ = ["AutotuneError", "ConfigError", "BackendError"]


class AutotuneError(Exception):
    """Base class: an error autotune understands and can explain in one line."""

    exit_code = 1


class ConfigError(AutotuneError):
    """Bad input from the user: a flag, a file, a line in a file, an env var."""

    exit_code = 2


class BackendError(AutotuneError):
    """A backend could not load a model or generate; ``failure_class`` where the cause is one
    of `autotune.failures`' classes (a worker killed by SIGILL: ``illegal-instruction``)."""

    def __init__(self, message: str, failure_class: FailureClass | None = None) -> None:
        super().__init__(message)
        self.failure_class = failure_class
