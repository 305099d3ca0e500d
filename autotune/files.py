"""Writing files so that a reader never sees half of one: the one atomic-write helper.

Every file autotune writes whole (summary.json, best.env, machine.json, reports, exported env
files, a trial's result, completions) goes through `atomic_write`: the text goes to a
temporary file in the same directory, is flushed to disk, and is renamed over the target, so
the target holds either the old content or all of the new. `append_line` is for the logs that
grow a line at a time (trials.jsonl): each line is flushed and synced as it is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["append_line", "atomic_write", "exclusive_lock", "write_jsonl"]


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask (read without changing it
    is not possible: set and restore)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` in one step (temporary file, fsync, rename). The file
    gets the mode any new file gets here (the umask's), not mkstemp's private 0600."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(handle, _new_file_mode())
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


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``path`` as a lock file (holding this process's pid) while the block runs, and
    remove it after; a ConfigError naming ``what`` and the holder's pid where another process
    holds it. Never waits: two jobs writing one file is a user's mistake, not a queue."""
    from autotune.errors import ConfigError

    path = Path(path)
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(
                f"{what}: another autotune process (pid {holder}) is writing it; wait for it "
                "to end or choose another"
            ) from None
        # The holder before us may have removed the file between our open and our lock:
        # then we hold a lock on nothing, and try again on the file now at the path.
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding it, so no one locks the file being removed
        handle.close()
