"""The content-addressed cache: converted models, quantized variants, time profiles.

An entry is a directory named after its source's content hash, carrying a manifest of its
files' sizes and SHA-256. `cached_build` makes one under a lock in a temporary directory and
renames it into place when whole, so parallel processes build it once and a reader never sees
half of it; `cache_entry_problem` says why an entry may not be used (then it is rebuilt).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "MANIFEST",
    "cache_entry_problem",
    "cache_root",
    "cached_build",
    "file_lock",
    "file_sha256",
]

MANIFEST = "autotune-cache.json"
_HASH_CHUNK = 8 * 2**20


def cache_root() -> Path:
    """Where autotune keeps converted models and quantized variants.

    ``AUTOTUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/autotune``, else ``~/.cache/autotune``.
    """
    if explicit := os.environ.get("AUTOTUNE_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "autotune"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file; an unchanged file (same inode, size, mtime) is hashed once per
    process, since a run asks for it several times (validation, then loading)."""
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _hash_file(path)
    return _HASHES[key]


_HASHES: dict[tuple, str] = {}


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_for(directory: Path, source_sha256: str) -> dict:
    files = {}
    for file in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        files[file.name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    return {"source_sha256": source_sha256, "files": files}


def cache_entry_problem(directory: Path, source_sha256: str) -> str | None:
    """Why a cache entry may not be used (missing, partial, corrupt), or None if it is sound."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return "no readable manifest (partial entry)"
    if manifest.get("source_sha256") != source_sha256:
        return "built from another file"
    files = manifest.get("files") or {}
    if not files:
        return "manifest lists no files"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("bytes"):
            return f"{name} has the wrong size"
    # Sizes can match while bytes are damaged; hashing ~0.5 GB costs well under a second.
    for name, expected in files.items():
        if file_sha256(directory / name) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive lock, so that parallel ranks or trials build one entry once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_build(entry: Path, source_sha256: str, build: Callable[[Path], None]) -> Path:
    """The verified cache directory ``entry``, built by ``build(tmp_dir)`` if missing or unsound.

    The build writes into a temporary directory that is renamed into place only when complete
    (with its manifest), under a lock, so parallel processes build it once and a reader never
    sees half an entry.
    """
    if cache_entry_problem(entry, source_sha256) is None:
        return entry
    base = entry.parent
    with file_lock(base / f"{entry.name}.lock"):
        # Another process may have built it while this one waited for the lock.
        if cache_entry_problem(entry, source_sha256) is None:
            return entry
        building = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=base))
        try:
            build(building)
            manifest = _manifest_for(building, source_sha256)
            (building / MANIFEST).write_text(json.dumps(manifest, indent=1))
            shutil.rmtree(entry, ignore_errors=True)
            # rename is atomic: a reader sees the old entry, no entry, or the whole new one.
            os.replace(building, entry)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return entry
