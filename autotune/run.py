"""`autotune run`: the production job with an exported config; nothing lost, nothing twice.

The config comes from an env file (what `autotune export` writes) or the environment. Every
prompt goes through the backend in chunks; each chunk's answers are appended to
``OUTPUT.partial`` as soon as the chunk is done (flushed and synced), so a crash loses at most
the chunk in flight, and a re-run with the same output resumes from what is there. When the
backend fails mid-chunk (a worker killed), it is restarted and the chunk's items go back to the
queue; an item that fails on its own is written with ``success: false`` and the rest go on. A
worker killed by SIGILL (an instruction the CPU traps) would die again: the job stops there
with the fix (`autotune.failures.fix_for`), the answered lines kept for the re-run.
At the end the partial file is renamed to OUTPUT: a file under the final name is complete.

One output line per input line, in input order: every input field kept, plus ``answer``,
``inference_time``, ``worker_rank``, ``success`` and ``error`` (seed 003's record), and
``request_hash``, a hash of the line's prompts and the config that answered them. A "main" +
"branches" line has one answer per branch, in order. A re-run keeps an earlier answer only
when its id is in the input and its request_hash matches: an edited prompt or another config
is answered again, and lines no longer in the input are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autotune.config import TrialConfig
from autotune.errors import BackendError, ConfigError
from autotune.failures import fix_for
from autotune.files import atomic_write, exclusive_lock
from autotune.workload import line_id

__all__ = ["RunStats", "config_from_env_file", "read_env_file", "run_job"]

_RESTARTS = 3  # backend restarts per chunk before its items are written as failed
CHUNK_WAVES = 8  # a chunk holds this many waves (processes x batch prompts) ...
CHUNK_MIN = 32  # ... and at least this many prompts


def read_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """(variables, comment lines) of a KEY=VALUE file; a bad line names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"--env {path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"--env {path}: not a text file (byte {error.start} is not UTF-8)"
        ) from None
    env, comments = {}, []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line.lstrip("# "))
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{path}:{number}: expected KEY=value, got {raw!r}")
        env[key.strip()] = value.strip().strip("'\"")
    return env, comments


def config_from_env_file(path: Path | None, topology) -> TrialConfig:
    """The config of an env file, or of the environment without one, checked against this
    machine (a bad value names its variable)."""
    from backends import check_config

    env = read_env_file(path)[0] if path else dict(os.environ)
    config = TrialConfig.from_env(env)
    check_config(config)
    if config.total_threads > topology.usable_cpus or config.processes > topology.usable_cpus:
        raise ConfigError(
            f"PARALLEL_WORKERS={config.processes} x THREADS_PER_WORKER="
            f"{config.threads_per_worker} needs {config.total_threads} CPUs; this machine has "
            f"{topology.usable_cpus} usable"
        )
    return config


@dataclass
class RunStats:
    """Per-worker statistics (seed 003's summary) and the totals."""

    workers: dict[int, dict] = field(default_factory=dict)
    skipped: int = 0
    restarts: int = 0

    def add(self, rank: int, ok: bool, seconds: float) -> None:
        mine = self.workers.setdefault(rank, {"items": 0, "errors": 0, "seconds": 0.0})
        mine["items"] += 1
        mine["errors"] += not ok
        mine["seconds"] += seconds


def _lines(workload) -> list[list]:
    """Prompts grouped by the input line they came from (a line with branches has several)."""
    groups: list[list] = []
    index: dict[int, list] = {}
    for prompt in workload.prompts:
        key = id(prompt.record) if "branch_index" not in prompt.record else line_id([prompt])
        if key not in index:
            index[key] = []
            groups.append(index[key])
        index[key].append(prompt)
    return groups


def request_hash(group, config: TrialConfig) -> str:
    """What an answer depends on: the line's prompts and the whole config."""
    key = json.dumps([[p.text for p in group], config.to_dict()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _record(group, completions, config: TrialConfig) -> dict:
    record = {k: v for k, v in group[0].record.items() if k != "branch_index"}
    answers = [c.text for c in completions]
    errors = [c.error for c in completions if c.error]
    record.update(
        id=line_id(group),
        answer=answers if len(group) > 1 else answers[0],
        inference_time=round(sum(c.latency_s for c in completions), 4),
        worker_rank=completions[0].worker_rank,
        success=not errors,
        request_hash=request_hash(group, config),
    )
    if errors:
        record["error"] = errors[0]
    return record


def run_job(
    config: TrialConfig,
    workload,
    output: Path,
    *,
    model,
    topology,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunStats:
    """Answer every prompt of ``workload`` into ``output`` (see the module docstring). One
    run per output at a time: a second is refused (ConfigError naming the first's pid)."""
    with exclusive_lock(output.with_name(output.name + ".lock"), f"--output {output}"):
        return _answer(config, workload, output, model, topology, on_progress)


def _answer(config, workload, output, model, topology, on_progress) -> RunStats:
    """`run_job` with the output held."""
    from backends import create_backend

    partial = output.with_name(output.name + ".partial")
    groups = _lines(workload)
    wanted = {line_id(g): request_hash(g, config) for g in groups}
    # Keep the successful lines of earlier runs that answer this input with this config, once
    # each; failed ones, edited prompts and lines of another config are run again.
    kept: dict[str, str] = {}
    for path in (output, partial):
        for record, line in _read_records(path):
            key = str(record.get("id"))
            if record.get("success") and record.get("request_hash") == wanted.get(key):
                kept.setdefault(key, line)
    todo = [g for g in groups if line_id(g) not in kept]
    stats = RunStats(skipped=len(groups) - len(todo))
    backend = create_backend(config, model, topology)  # a bad config fails before any output
    # Each chunk is one generate call, whose last wave drains the slots with no prompt to
    # refill them: long chunks keep that tail a small part of the job (measured: chunks of
    # 2 waves ran batch 8 at 52 tokens/s where its steady state is 67), and a crash costs
    # at most one chunk's time, never its answers.
    chunk_size = max(CHUNK_MIN, config.processes * config.batch_size * CHUNK_WAVES)
    # The kept lines go into a fresh partial file that replaces the old one in one step, so no
    # moment exists at which an answered line is on disk nowhere.
    fresh = partial.with_name(partial.name + ".new")
    with fresh.open("w") as handle:
        handle.writelines(line + "\n" for line in kept.values())
        handle.flush()
        os.fsync(handle.fileno())
    fresh.replace(partial)
    with partial.open("a") as handle:
        backend.load()
        try:
            finished = stats.skipped
            if on_progress:
                on_progress(finished, len(groups))
            start = 0
            while start < len(todo):
                chunk = todo[start : start + chunk_size]
                prompts = [p for group in chunk for p in group]
                completions = None
                for attempt in range(_RESTARTS + 1):
                    try:
                        completions = backend.generate(prompts, config.generation)
                        break
                    except BackendError as error:
                        if fix_for(error.failure_class):
                            # A cause a restart meets again (an instruction the CPU traps):
                            # stop with the fix; the answered lines stay in the partial file.
                            raise BackendError(
                                f"{error}; {finished} of {len(groups)} lines answered, kept in "
                                f"{partial} (a rerun goes on from there)",
                                error.failure_class,
                            ) from None
                        # A worker died: start the backend again; the chunk goes back in.
                        stats.restarts += 1
                        backend.close()
                        if attempt == _RESTARTS:
                            completions = [_failed(p, str(error)) for p in prompts]
                            break
                        backend = create_backend(config, model, topology)
                        backend.load()
                by_id = {c.id: c for c in completions}
                for group in chunk:
                    answers = [by_id[p.id] for p in group]
                    record = _record(group, answers, config)
                    handle.write(json.dumps(record) + "\n")
                    for answer in answers:
                        stats.add(answer.worker_rank, answer.error is None, answer.latency_s)
                handle.flush()
                os.fsync(handle.fileno())
                finished += len(chunk)
                if on_progress:
                    on_progress(finished, len(groups))
                start += chunk_size
        finally:
            backend.close()
    # Complete: only now under the final name, in input order.
    answered = {str(record.get("id")): line for record, line in _read_records(partial)}
    atomic_write(output, "".join(answered[key] + "\n" for key in wanted))
    partial.unlink()
    return stats


def _read_records(path: Path):
    """(record, line) of each whole JSON line of ``path`` (a torn last line is skipped)."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line), line
        except json.JSONDecodeError:
            continue


def _failed(prompt, error: str):
    from backends.base import Completion

    return Completion(
        id=prompt.id,
        text="",
        token_ids=(),
        prompt_tokens=0,
        worker_rank=-1,
        latency_s=0.0,
        error=error,
    )
