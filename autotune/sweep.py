"""`autotune sweep`: an Optuna search over the layouts that fit this machine, within a budget.

Order of work:

1. the naive baseline (trial 0), then the seeds' recipes, then the sampler's suggestions —
   each checked against the machine (`space.Unfit`), the memory planner and the time left
   before it starts, and run in its own process with a deadline (`trial.run_in_child`);
2. the best three are re-measured side by side with the baseline, alternately (A B A B), and
   the winner is the one with the best paired speedup, reported with a confidence interval;
3. ``best.env`` (the winner as env vars) and ``summary.json`` are written.

Every trial, finished, failed or pruned, is a line in ``trials.jsonl`` (flushed as it ends) and
a trial in the Optuna study (``study.db``, or any ``--storage`` URL, so several machines can
share one study). Ctrl-C stops at once, keeps every finished trial, and still writes best.env
from what was measured.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.memory_plan import MemoryPlanner
from autotune.space import SearchSpace, Unfit
from autotune.trial import TrialOutcome, run_in_child

__all__ = ["SweepOptions", "SweepSummary", "describe_speedup", "run_sweep", "speedup_interval"]

# First guesses of a trial's cost in seconds, replaced by each backend's measured mean.
_FIRST_GUESS_S = {"llamacpp": 20.0, "hf": 40.0, "ddp": 45.0, "pipeline": 50.0, "fake": 5.0}
_CONFIRM_SHARE = 0.25  # of the budget kept for the paired re-measurement
_MAX_IDLE_ASKS = 60  # suggestions in a row that could not run: the space is exhausted
_TOP = 3


@dataclass
class SweepOptions:
    """Everything `autotune sweep` was asked to do."""

    study: str
    reports_dir: Path
    budget_s: float
    trials: int | None = None
    storage: str | None = None
    resume: bool = False
    backends: list[str] = field(default_factory=list)
    workload: str | None = None
    limit: int = 12
    repeats: int = 1
    warmup: int = 1
    memory_limit_bytes: int | None = None
    trial_timeout_s: float | None = None
    base: TrialConfig = field(default_factory=TrialConfig)
    pairs: int = 3
    seed: int | None = None


@dataclass
class SweepSummary:
    """What the sweep found."""

    study: str
    directory: Path
    trials: list[dict]
    winner: dict | None
    baseline: dict | None
    elapsed_s: float
    interrupted: bool = False
    uses_smt_siblings: bool = False


def speedup_interval(candidate: list[float], baseline: list[float]) -> dict:
    """Paired speedup: geometric mean of candidate/baseline per pair, 95% t-interval on logs."""
    logs = [math.log(c / b) for c, b in zip(candidate, baseline, strict=True)]
    mean = statistics.fmean(logs)
    result = {"speedup": math.exp(mean), "pairs": len(logs), "ratios": [math.exp(x) for x in logs]}
    if len(logs) >= 2:
        half = _t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        result.update(ci_low=math.exp(mean - half), ci_high=math.exp(mean + half))
    else:
        result.update(ci_low=None, ci_high=None)
    return result


def describe_speedup(paired: dict) -> str:
    """``x2.20 over 3 A B pairs, 95% CI 1.90-2.55`` for a `speedup_interval` result."""
    text = f"x{paired['speedup']:.2f} over {paired['pairs']} A B pairs"
    if paired.get("ci_low") is not None:
        text += f", 95% CI {paired['ci_low']:.2f}-{paired['ci_high']:.2f}"
    return text


def _t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t (table; normal beyond 30)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    if df <= len(table):
        return table[df - 1]
    return 2.042 if df <= 30 else 1.96


class _Log:
    """trials.jsonl: one line per trial, flushed and synced as it ends."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("a")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _storage_url(options: SweepOptions, directory: Path) -> str:
    return options.storage or f"sqlite:///{directory / 'study.db'}"


def run_sweep(
    options: SweepOptions,
    *,
    topology,
    model,
    shape,
    on_event: Callable[[str, dict], None] | None = None,
    extra: list[TrialConfig] = (),
) -> SweepSummary:
    """Search, confirm, export; ``extra`` configs are measured right after the recipes
    (tests use it to inject failing trials)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tell = on_event or (lambda kind, data: None)
    started = time.monotonic()
    deadline = started + options.budget_s
    directory = options.reports_dir / options.study
    directory.mkdir(parents=True, exist_ok=True)
    storage = _storage_url(options, directory)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if options.study in existing and not options.resume:
        raise ConfigError(
            f"--study {options.study}: a study of that name exists in {storage}; "
            "add --resume to continue it, or name another"
        )
    study = optuna.create_study(
        study_name=options.study,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=options.seed),
    )
    (directory / "machine.json").write_text(
        json.dumps(
            {
                "topology": topology.to_dict(),
                "fingerprint": topology.fingerprint(),
                "model": str(model.path),
            },
            indent=2,
        )
    )
    # A batch larger than the prompts of a trial measures nothing a smaller one would not.
    batch_cap = 2 ** max(0, min(6, int(math.log2(max(1, options.limit)))))
    space = SearchSpace(topology, options.backends, shape.layers, options.base, batch_cap)
    available = topology.memory_available_bytes
    planner = MemoryPlanner(shape, options.memory_limit_bytes or int(available * 0.8))
    log = _Log(directory / "trials.jsonl")
    records: list[dict] = _previous_records(study)
    costs: dict[str, list[float]] = {}
    for record in records:
        if record["state"] == "complete":
            costs.setdefault(record["config"]["backend"], []).append(record["duration_s"])
    seen = {
        json.dumps(r["config"], sort_keys=True): r["number"]
        for r in records
        if r["state"] in ("complete", "fail")
    }

    # Fixed layouts first (only in a new study): the baseline, the recipes, any extras.
    if not records:
        fixed = [space.baseline(), *space.recipes()]
        for item in fixed:
            study.enqueue_trial(item.params, user_attrs={"role": item.role, "name": item.name})
    queue_extra = list(extra)

    search_end = deadline - options.budget_s * _CONFIRM_SHARE
    idle = 0
    interrupted = False
    done = sum(1 for r in records if r["state"] in ("complete", "fail"))
    try:
        while True:
            if options.trials is not None and done >= options.trials:
                break
            if time.monotonic() >= search_end or idle >= _MAX_IDLE_ASKS:
                break
            if queue_extra and not _waiting(study):
                config, role, name = queue_extra.pop(0), "extra", "injected"
                trial = study.ask()
                _mark_injected(trial, config)
            else:
                trial = study.ask()
                role = trial.user_attrs.get("role", "search")
                name = trial.user_attrs.get("name", "")
                try:
                    config = space.suggest(trial)
                except Unfit as why:
                    _prune(study, trial, str(why), log, records, None)
                    idle += 1
                    continue
            key = json.dumps(config.to_dict(), sort_keys=True)
            if key in seen and role == "search":
                _prune(study, trial, f"same config as trial {seen[key]}", log, records, config)
                idle += 1
                continue
            refusal = planner.refusal(config)
            if refusal:
                _prune(study, trial, refusal, log, records, config)
                idle += 1
                continue
            estimate = _estimate(costs, config.backend)
            remaining = search_end - time.monotonic()
            if role == "search" and estimate > remaining:
                _prune(
                    study,
                    trial,
                    f"would not finish in the {remaining:.0f} s left (expected {estimate:.0f} s)",
                    log,
                    records,
                    config,
                )
                idle += 1
                continue
            idle = 0
            # A trial may use what is left of the whole budget but the share kept for the
            # comparison; never more than 4x its expected cost.
            limit = max(5.0, min(deadline - time.monotonic() - 5.0, 4 * estimate + 30))
            if role == "baseline":
                limit = max(limit, min(deadline - time.monotonic() - 5.0, 600))
            if options.trial_timeout_s:
                limit = min(limit, options.trial_timeout_s)
            tell(
                "start",
                {
                    "number": trial.number,
                    "config": config,
                    "role": role,
                    "name": name,
                    "deadline_s": limit,
                },
            )
            spec = _spec(options, config)
            outcome = run_in_child(spec, limit)
            record = _finish(study, trial, config, role, name, outcome)
            record["ended_s"] = round(time.monotonic() - started, 3)  # since the sweep began
            log.write(record)
            records.append(record)
            seen[key] = trial.number
            done += 1
            if outcome.state == "complete":
                costs.setdefault(config.backend, []).append(outcome.duration_s)
                planner.observe(config, outcome.result["peak_memory_bytes"])
            tell("end", record)
    except KeyboardInterrupt:
        interrupted = True
        tell("interrupted", {})

    baseline = next(
        (r for r in records if r.get("role") == "baseline" and r["state"] == "complete"), None
    )
    winner = None
    if not interrupted:
        try:
            winner = _confirm(options, records, baseline, deadline, tell)
        except KeyboardInterrupt:
            interrupted = True
    if winner is None:
        winner = _best_unconfirmed(records, baseline)
    log.close()
    summary = SweepSummary(
        study=options.study,
        directory=directory,
        trials=records,
        winner=winner,
        baseline=baseline,
        elapsed_s=time.monotonic() - started,
        interrupted=interrupted,
    )
    summary.uses_smt_siblings = _write_outputs(summary, topology, model)
    return summary


# ---------------------------------------------------------------- helpers


def _estimate(costs: dict[str, list[float]], backend: str) -> float:
    seen = costs.get(backend)
    return statistics.fmean(seen) if seen else _FIRST_GUESS_S.get(backend, 30.0)


def _spec(options: SweepOptions, config: TrialConfig, **extra) -> dict:
    return {
        "config": config.to_dict(),
        "workload": options.workload,
        "limit": options.limit,
        "repeats": options.repeats,
        "warmup": options.warmup,
        **extra,
    }


def _waiting(study) -> bool:
    """Whether enqueued fixed layouts are still to be asked for."""
    import optuna

    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def _mark_injected(trial, config: TrialConfig) -> None:
    """An injected config is recorded with its fields as the trial's attributes."""
    trial.set_user_attr("role", "extra")
    trial.set_user_attr("config", config.to_dict())


def _prune(study, trial, reason: str, log: _Log, records: list, config) -> None:
    import optuna

    trial.set_user_attr("pruned_reason", reason)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    record = {
        "number": trial.number,
        "state": "pruned",
        "reason": reason,
        "config": config.to_dict() if config else None,
        "role": trial.user_attrs.get("role", "search"),
        "duration_s": 0.0,
    }
    log.write(record)
    records.append(record)


def _finish(study, trial, config, role, name, outcome: TrialOutcome) -> dict:
    import optuna

    record = {
        "number": trial.number,
        "role": role,
        "name": name,
        "config": config.to_dict(),
        "duration_s": round(outcome.duration_s, 3),
    }
    trial.set_user_attr("config", config.to_dict())
    trial.set_user_attr("role", role)
    # Which sweep process ran it: several machines may share one study (--storage).
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    if outcome.state == "complete":
        result = outcome.result
        keep = (
            "tokens_per_s",
            "requests_per_s",
            "latency_p50_s",
            "latency_p95_s",
            "ttft_p50_s",
            "load_time_s",
            "peak_memory_bytes",
            "cpu_utilisation",
            "tokens_per_s_summary",
            "warnings",
            "details",
        )
        summary = {k: result.get(k) for k in keep}
        trial.set_user_attr("result", summary)
        study.tell(trial, result["tokens_per_s"])
        record.update(
            state="complete",
            value=result["tokens_per_s"],
            result=summary,
            samples=result.get("samples"),
        )
    else:
        trial.set_user_attr("failure_class", outcome.failure_class)
        trial.set_user_attr("stderr_tail", outcome.stderr_tail)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        record.update(
            state="fail",
            failure_class=outcome.failure_class,
            stderr_tail=outcome.stderr_tail,
            **outcome.extra,
        )
    return record


def _previous_records(study) -> list[dict]:
    """The records of a resumed study, rebuilt from the trials' attributes."""
    import optuna

    records = []
    for trial in study.get_trials(deepcopy=False):
        config = trial.user_attrs.get("config")
        base = {
            "number": trial.number,
            "role": trial.user_attrs.get("role", "search"),
            "config": config,
            "duration_s": trial.duration.total_seconds() if trial.duration else 0.0,
        }
        if trial.state == optuna.trial.TrialState.COMPLETE and config:
            records.append(
                {
                    **base,
                    "state": "complete",
                    "value": trial.value,
                    "result": trial.user_attrs.get("result", {}),
                }
            )
        elif trial.state == optuna.trial.TrialState.FAIL and config:
            records.append(
                {**base, "state": "fail", "failure_class": trial.user_attrs.get("failure_class")}
            )
        elif trial.state == optuna.trial.TrialState.PRUNED:
            records.append(
                {**base, "state": "pruned", "reason": trial.user_attrs.get("pruned_reason")}
            )
    return records


def _confirm(options, records, baseline, deadline, tell) -> dict | None:
    """Re-measure the best three beside the baseline (A B A B) and pick the winner on that."""
    if baseline is None:
        return None
    done = sorted(
        (r for r in records if r["state"] == "complete" and r is not baseline),
        key=lambda r: r["value"],
        reverse=True,
    )
    unique, keys = [], set()
    for record in done:
        key = json.dumps(record["config"], sort_keys=True)
        if key not in keys and key != json.dumps(baseline["config"], sort_keys=True):
            keys.add(key)
            unique.append(record)
    candidates = unique[:_TOP]
    base_config = TrialConfig.from_dict(baseline["config"])
    confirmed = []
    for record in candidates:
        left = deadline - time.monotonic() - 5.0
        pairs = options.pairs  # as many as fit in the time left, at least one
        while pairs > 1 and _paired_cost(record, baseline, pairs) > left:
            pairs -= 1
        if _paired_cost(record, baseline, pairs) > left:
            tell("skip-confirm", {"number": record["number"]})
            continue
        config = TrialConfig.from_dict(record["config"])
        tell("confirm", {"number": record["number"], "config": config, "pairs": pairs})
        spec = _spec(options, config, paired=base_config.to_dict(), pairs=pairs)
        outcome = run_in_child(spec, max(5.0, left))
        if outcome.state != "complete":
            tell(
                "confirm-failed",
                {"number": record["number"], "failure_class": outcome.failure_class},
            )
            continue
        rates = outcome.result
        stats = speedup_interval(rates["candidate"], rates["baseline"])
        confirmed.append({**record, "paired": {**stats, **rates}})
    if not confirmed:
        return None
    best = max(confirmed, key=lambda r: r["paired"]["speedup"])
    return {**best, "confirmed": True}


def _paired_cost(record, baseline, pairs: int) -> float:
    """Expected seconds of a paired re-measurement: both loads, warmups and 2 x pairs runs."""

    def parts(r):
        result = r.get("result") or {}
        summary = result.get("tokens_per_s_summary") or {}
        load = result.get("load_time_s") or 10.0
        run = r["duration_s"] - load if r["duration_s"] > load else r["duration_s"] / 2
        runs = max(1, summary.get("n") or 1) + 1  # timed passes + the warmup
        return load, run / runs

    load_a, run_a = parts(record)
    load_b, run_b = parts(baseline)
    return load_a + load_b + (pairs + 1) * (run_a + run_b) + 10.0


def _best_unconfirmed(records, baseline) -> dict | None:
    done = [r for r in records if r["state"] == "complete"]
    if not done:
        return None
    best = max(done, key=lambda r: r["value"])
    return {**best, "confirmed": False}


def _write_outputs(summary: SweepSummary, topology, model) -> bool:
    """summary.json and best.env; returns whether the winner uses SMT siblings."""
    from autotune.export import render

    directory = summary.directory
    winner_threads = (
        TrialConfig.from_dict(summary.winner["config"]).total_threads if summary.winner else 0
    )
    data = {
        "study": summary.study,
        # More threads than physical cores means SMT siblings are in use (seed 001's question).
        "uses_smt_siblings": winner_threads > topology.physical_cores,
        "machine": {
            "physical_cores": topology.physical_cores,
            "usable_cpus": topology.usable_cpus,
            "threads_per_core": topology.threads_per_core,
        },
        "elapsed_s": summary.elapsed_s,
        "interrupted": summary.interrupted,
        "winner": summary.winner,
        "baseline": summary.baseline,
        "counts": {
            state: sum(1 for r in summary.trials if r["state"] == state)
            for state in ("complete", "fail", "pruned")
        },
    }
    partial = directory / "summary.json.partial"
    partial.write_text(json.dumps(data, indent=2, default=str))
    partial.replace(directory / "summary.json")
    if summary.winner is not None:
        text = render(
            data, topology_fingerprint=topology.fingerprint(), fmt="env", model_path=str(model.path)
        )
        partial = directory / "best.env.partial"
        partial.write_text(text)
        partial.replace(directory / "best.env")
    return data["uses_smt_siblings"]
