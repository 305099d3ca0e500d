"""Does llama.cpp's extra buffer types (AMX, CPU repack) run on this CPU? Probe once, cache it.

A llama.cpp built for the native CPU loads weights into its "extra" buffer types (the AMX
tiles, or repacked q4_0/q4_1/q8_0 layouts) where CPUID says the CPU has the instructions. A
cloud VM can advertise AMX in CPUID yet trap it (the hypervisor leaves it off in XCR0): the
first large matmul then kills the process with SIGILL, while a short decode still works.

`extra_buffers_verdict` decodes one large batch (a few hundred prompt tokens) in a child process
with the extra buffers on; a child killed by SIGILL means they trap here, and llama.cpp runs
with them off (``llama_model_params.use_extra_bufts = false``). Not every such VM raises
SIGILL: a 2-vCPU Xeon VM advertising amx_int8 killed the child by SIGSEGV (2026-12-02). A
child killed by any other signal is run again with them off: where that one runs, they trap
too (the verdict names the signal); where it dies as well, the fault is not theirs (unknown).
The child decodes the embedded model whatever model is tuned: its Q4_1 weights are a type
the AMX and repack buffers take (the trap was seen on exactly it), and a verdict that holds
for the CPU and the build must not depend on which model happened to be probed first (a
test's f32 toy model would never touch them). The verdict is cached under the autotune cache
(`autotune.cache.cache_root`), keyed by the CPU's flags and the llama.cpp build (`build_key`),
so every later run reads it at once.

``python -m backends.llamacpp.probe [MODEL] [--no-extra-buffers]`` is the child: exit 0 when
the decode ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata, util
from pathlib import Path

__all__ = [
    "ExtraBuffersVerdict",
    "build_key",
    "cached_verdict",
    "extra_buffers_verdict",
    "resolve_extra_buffers",
]

_CACHE_FILE = "llama-extra-buffers.json"
_PROBE_TIMEOUT_S = 180.0  # loading and one 400-token decode of a model take seconds
# The probe's prompt: a few hundred tokens decoded in one llama_decode, as a real prompt's
# prefill is (a 5-word prompt decodes even where the large matmul traps).
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog while the cat watches. " * 30
_OFF = "--no-extra-buffers"  # the child's flag for the control decode


@dataclass(frozen=True)
class ExtraBuffersVerdict:
    """What the probe found: ``works`` True (on by default, a knob), False (they trap here:
    off), or None (the probe failed otherwise: nothing known, llama.cpp's default stays).
    ``detail`` says how in words; ``key`` is the `build_key` it holds for."""

    works: bool | None
    detail: str
    key: str

    @property
    def offered(self) -> tuple:
        """The values of the ``extra_buffers`` knob a search may try here: both where they
        work, off where they trap, only llama.cpp's default (None) where nothing is known."""
        if self.works is None:
            return (None,)
        return (True, False) if self.works else (False,)

    def describe(self) -> str:
        """One line for ``autotune detect`` and an export header."""
        if self.works is None:
            return f"unknown ({self.detail}); llama.cpp's default (on)"
        if self.works:
            return "run here: on by default, a knob of the search (--no-extra-buffers)"
        return f"trap here ({self.detail}), off"

    def to_dict(self) -> dict:
        return asdict(self)


def build_key(root: str | Path = "/") -> str:
    """The CPU (model name and every ISA flag in ``proc/cpuinfo``) and the llama.cpp build (the
    llama-cpp-python version and its shared libraries' sizes and times, so a rebuild with other
    CMAKE_ARGS probes again), as a short hash."""
    from autotune.topology import read_cpuinfo

    model, flags = read_cpuinfo(root)
    parts = [model or "", " ".join(sorted(flags)), _llama_version() or "not installed"]
    spec = util.find_spec("llama_cpp")
    if spec is not None and spec.origin:
        lib = Path(spec.origin).parent / "lib"
        for path in sorted(lib.glob("*.so*")) if lib.is_dir() else ():
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _llama_version() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def _cache_path() -> Path:
    from autotune.cache import cache_root

    return cache_root() / _CACHE_FILE


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: probe again
    return data if isinstance(data, dict) else {}


def cached_verdict(key: str | None = None) -> ExtraBuffersVerdict | None:
    """The verdict cached for this machine and build (``key``: `build_key`), or None."""
    key = key or build_key()
    found = _read_cache().get(key)
    if not isinstance(found, dict) or not isinstance(found.get("works"), bool):
        return None
    return ExtraBuffersVerdict(found["works"], str(found.get("detail", "")), key)


def _store(verdict: ExtraBuffersVerdict) -> None:
    from autotune.cache import file_lock
    from autotune.files import atomic_write

    path = _cache_path()
    with file_lock(path.with_name(path.name + ".lock")):  # probes of parallel runs
        data = _read_cache()
        data[verdict.key] = verdict.to_dict()
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


def extra_buffers_verdict(
    *, refresh: bool = False, command: list[str] | None = None
) -> ExtraBuffersVerdict:
    """The cached verdict for this CPU and llama.cpp build, else the probe's: a child decodes
    one large batch of the embedded model with the extra buffers on. Killed by SIGILL: they
    trap (cached). Killed by another signal, and the same decode with them off runs: they trap
    (cached). Exit 0: they work (cached). Anything else (no llama-cpp-python, a model that
    would not load, a control decode that dies too): unknown, not cached. ``command`` replaces
    the child's argv (tests make a child that dies by a signal; the control run appends
    ``--no-extra-buffers`` to it); ``refresh`` probes again."""
    key = build_key()
    if not refresh and (found := cached_verdict(key)) is not None:
        return found
    if command is None:
        if _llama_version() is None:
            return ExtraBuffersVerdict(None, "llama-cpp-python is not installed", key)
        command = [sys.executable, "-m", "backends.llamacpp.probe"]
    try:
        child = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return ExtraBuffersVerdict(None, f"the probe ran past {_PROBE_TIMEOUT_S:.0f} s", key)
    if child.returncode == -signal.SIGILL:
        verdict = ExtraBuffersVerdict(
            False, "a 400-token decode died by SIGILL: the CPU advertises what it traps", key
        )
    elif child.returncode == 0:
        verdict = ExtraBuffersVerdict(True, "a 400-token decode ran", key)
    elif child.returncode < 0 and (found := _control(command, -child.returncode, key)):
        verdict = found
    else:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return ExtraBuffersVerdict(None, f"the probe failed, exit {child.returncode}: {last}", key)
    _store(verdict)
    return verdict


def _control(command: list[str], number: int, key: str) -> ExtraBuffersVerdict | None:
    """The verdict where the probe's child died by signal ``number`` (not SIGILL): the same
    decode with the extra buffers off; where it runs, they trap here, else None (not theirs)."""
    try:
        child = subprocess.run(
            [*command, _OFF],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return None
    if child.returncode != 0:
        return None
    name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
    return ExtraBuffersVerdict(
        False, f"a 400-token decode died by {name} with them on and ran with them off", key
    )


def resolve_extra_buffers(setting: bool | None) -> bool:
    """What llama.cpp runs with for a config's ``extra_buffers``: the setting where one is
    given, else on unless this machine's verdict (probed now if not cached) says they trap."""
    if setting is not None:
        return setting
    return extra_buffers_verdict().works is not False


def main(argv: list[str]) -> int:
    """The probe's child: load ``argv[0]`` (default: the embedded model) with the extra
    buffers on (off with ``--no-extra-buffers``), decode the probe's prompt in one batch (and
    one new token); exit 0 when that ran."""
    from autotune.models import ModelSpec
    from backends.llamacpp.engine import LlamaEngine

    paths = [arg for arg in argv if arg != _OFF]
    threads = max(1, len(os.sched_getaffinity(0)))
    engine = LlamaEngine(
        paths[0] if paths else str(ModelSpec.resolve().path),
        threads=threads,
        batch_size=1,
        ctx_per_sequence=1024,
        n_batch=512,
        extra_buffers=_OFF not in argv,
    )
    try:
        result = engine.answer(_PROBE_TEXT, max_new_tokens=1, chat_template=False, ignore_eos=True)
    finally:
        engine.close()
    if result is None or result.error:
        print(f"probe: {result.error if result else 'no result'}", file=sys.stderr)
        return 1
    print(f"probe: decoded {result.prompt_tokens} prompt tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
