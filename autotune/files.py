"""Writing files so that a reader never sees half of one: the one atomic-write helper.

Every file autotune writes whole (summary.json, best.env, machine.json, reports, exported env
files, a trial's result, completions) goes through `atomic_write`: the text goes to a
temporary file in the same directory, is flushed to disk, and is renamed over the target, so
the target holds either the old content or all of the new. `append_line` is for the logs that
grow a line at a time (trials.jsonl): each line is flushed and synced as it is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["append_line", "atomic_write", "write_jsonl"]


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` in one step (temporary file, fsync, rename)."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """All rows as JSON lines, or nothing (`atomic_write`)."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_line(handle, line: str) -> None:
    """Append one line to an open text file, flushed and synced before returning."""
    handle.write(line.rstrip("\n") + "\n")
    handle.flush()
    os.fsync(handle.fileno())
