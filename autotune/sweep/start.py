"""How a sweep starts: its Optuna study, the machine and the measurement the study holds (a
resumed sweep must match both), the layouts a --warm-start carries over, and the fixed layouts
(the naive baseline, the seeds' recipes) queued for a new study, or what is left of them for a
resumed one.
"""

from __future__ import annotations

from pathlib import Path

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.space import Fixed, config_key
from autotune.study import Role, StudyDir, TrialRecord
from autotune.sweep.ledger import abandoned
from autotune.sweep.steps import Queue
from autotune.workload import GenerationSettings

__all__ = [
    "enqueue_fixed",
    "measurement",
    "open_study",
    "resume_fixed",
    "warm_layouts",
    "write_machine",
]

# What a warm start takes of a previous study's layout: everything but the model, the
# generation settings and the fault (those are this sweep's own, `SweepOptions.base`).
_LAYOUT_FIELDS = frozenset(TrialConfig.__dataclass_fields__) - {
    "model",
    "fault",
    *GenerationSettings.__dataclass_fields__,
}
_WARM = 3  # layouts a warm start carries over
# The pacing settings a resume must keep, and the flag that sets each.
_FLAGS = {
    "workload": "--workload",
    "workload_sha256": "--workload (its content)",
    "limit": "--limit",
    "prompts": "--prompts",
    "repeats": "--repeats",
    "warmup": "--warmup",
    "settle_s": "--settle (seconds)",
}


def open_study(options, directory: StudyDir, topology):
    """The sweep's Optuna study, created or (--resume) loaded; a resumed study on another
    machine, or measuring otherwise, is refused (ConfigError naming the difference)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = directory.storage_url(options.storage)
    # A --storage URL is opened before anything is written; the default SQLite file needs the
    # study's directory first.
    if not options.storage:
        directory.create()
    try:
        existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    except Exception as error:  # noqa: BLE001 - any storage failure is the URL's fault
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"--storage {storage}: cannot open it ({type(error).__name__}: {first[:160]})"
        ) from None
    if options.study in existing and not options.resume:
        raise ConfigError(
            f"--study {options.study}: a study of that name exists in {storage}; "
            "add --resume to continue it, or name another"
        )
    directory.create()
    study = optuna.create_study(
        study_name=options.study,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=options.seed),
    )
    # Trials of one study are compared with each other: they must run on one machine...
    machine = {"fingerprint": topology.fingerprint(), "simulated": options.simulated}
    recorded_machine = study.user_attrs.get("machine") or _machine_on_disk(directory)
    if recorded_machine is None:
        study.set_user_attr("machine", machine)
    elif recorded_machine != machine:
        raise ConfigError(_machine_differs(options.study, recorded_machine, machine))
    # ... and measure the same thing.
    now = measurement(options)
    recorded = study.user_attrs.get("measurement")
    if recorded is None:
        study.set_user_attr("measurement", now)
    elif recorded != now:
        raise ConfigError(_measurement_differs(options.study, recorded, now))
    return study


def measurement(options) -> dict:
    """What every trial of a study measures: the prompts (the workload file and its hash, the
    first --limit of them), the pacing of the passes, and the shared config (model, tokens)."""
    from autotune.cache import file_sha256
    from autotune.workload import DEFAULT_WORKLOAD

    workload = Path(options.workload or DEFAULT_WORKLOAD)
    return {
        "workload": options.workload or "shipped default",
        "workload_sha256": file_sha256(workload),
        "limit": options.limit,
        **options.pacing.to_dict(),
        "base": options.base.to_dict(),
    }


def write_machine(directory: StudyDir, topology, model, options) -> None:
    """machine.json: the topology, its fingerprint, the model, simulated or not, and the
    llama.cpp extra-buffers verdict."""
    directory.write_json(
        directory.machine,
        {
            "topology": topology.to_dict(),
            "fingerprint": topology.fingerprint(),
            "model": str(model.path),
            "model_embedded": bool(model.embedded),
            "simulated": options.simulated,
            "llama_extra_buffers": (
                options.extra_buffers.to_dict() if options.extra_buffers else None
            ),
        },
    )


def warm_layouts(options, topology, model, space) -> list[Fixed]:
    """The best `_WARM` layouts of the --warm-start study that ``space`` can run, best first;
    a study of another machine or model is refused (ConfigError)."""
    name = options.warm_start
    if not name:
        return []
    previous = StudyDir(options.reports_dir / name)
    machine = previous.read_json(previous.machine, "machine.json")
    if machine is None:
        raise ConfigError(f"--warm-start {name}: no such study in {options.reports_dir}")
    if machine.get("fingerprint") != topology.fingerprint():
        raise ConfigError(
            f"--warm-start {name}: measured on machine {machine.get('fingerprint')}, this "
            f"one is {topology.fingerprint()}; a layout's speed does not carry over"
        )
    if machine.get("model") != str(model.path):
        raise ConfigError(
            f"--warm-start {name}: measured with model {machine.get('model')}, this sweep "
            f"runs {model.path}"
        )
    done = [
        r
        for r in previous.records()
        if r.complete and r.role in (Role.SEARCH, Role.RECIPE, Role.EXTRA, Role.WARM)
    ]
    found, keys = [], set()
    for record in sorted(done, key=lambda r: r.value, reverse=True):
        config = options.base.replace(**{k: getattr(record.config, k) for k in _LAYOUT_FIELDS})
        if config_key(config) in keys or space.refusal(config) is not None:
            continue
        keys.add(config_key(config))
        label = f"warm start: {name} trial {record.number}, {record.value:.1f} tokens/s there"
        found.append(Fixed(label, Role.WARM.value, config))
        if len(found) == _WARM:
            break
    return found


def _fixed_layouts(space, warm: list[Fixed]) -> tuple[list[Fixed], list[Fixed]]:
    """(queued first, waiting): the baseline, the ``warm`` layouts (--warm-start) and the
    baseline backend's recipes; the other backends' recipes, which wait until nothing else is
    queued and no climb goes on (`Steps.release_recipe`): the baseline's backend is the one
    expected fastest here (`baseline_priority`), and its batch climb is where a short budget
    finds the most speed."""
    baseline = space.baseline()
    first, waiting = [baseline, *warm], []
    for fixed in space.recipes():
        (first if fixed.config.backend == baseline.config.backend else waiting).append(fixed)
    return first, waiting


def enqueue_fixed(study, queue: Queue, space, warm: list[Fixed]) -> None:
    """A new study's fixed layouts, queued as Optuna trials with their parameters (so the
    sampler learns from them), or waiting."""
    first, waiting = _fixed_layouts(space, warm)
    for fixed in first:
        queue.fixed(study, fixed)
    queue.deferred.extend(waiting)


def resume_fixed(study, queue: Queue, space, records: list[TrialRecord], warm: list[Fixed]) -> None:
    """A resumed study goes on with exactly the fixed layouts left: those with no record, no
    trial queued and no trial running in a live sweep (several may share a study). A trial
    its sweep was killed in is failed (it has no record) and its layout queued again, ahead
    of the queue it was taken from, so the baseline is still measured first; the waiting
    recipes are rebuilt."""
    import optuna

    states = optuna.trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        if abandoned(trial):
            study.tell(trial.number, state=states.FAIL)
    pending = study.get_trials(deepcopy=False, states=(states.WAITING, states.RUNNING))
    covered = {(r.role.value, r.name) for r in records}
    covered |= {(t.user_attrs.get("role"), t.user_attrs.get("name")) for t in pending}
    first, waiting = _fixed_layouts(space, warm)
    missing = [fixed for fixed in first if (fixed.role, fixed.name) not in covered]
    if missing:
        # Optuna asks its queue in order: the queued trials step out and line up again behind
        # what was queued before them.
        queued = [t for t in pending if t.state is states.WAITING]
        for _ in queued:
            study.tell(study.ask(), state=states.FAIL)
        for fixed in missing:
            queue.fixed(study, fixed)
        for trial in queued:
            study.enqueue_trial(trial.system_attrs["fixed_params"], user_attrs=trial.user_attrs)
    queue.deferred.extend(f for f in waiting if (f.role, f.name) not in covered)


def _machine_on_disk(directory: StudyDir) -> dict | None:
    """The machine of a study made before the study recorded it: its machine.json."""
    found = directory.read_json(directory.machine, "machine.json")
    if not found:
        return None
    return {"fingerprint": found.get("fingerprint"), "simulated": found.get("simulated")}


def _machine_differs(study: str, recorded: dict, now: dict) -> str:
    """One line naming the machine a study ran on and the one a resumed sweep runs on."""

    def machine(found: dict) -> str:
        how = f"simulated from {found['simulated']}" if found.get("simulated") else "measured"
        return f"{found.get('fingerprint')} ({how})"

    return (
        f"--resume {study}: its trials ran on machine {machine(recorded)}, this sweep on "
        f"{machine(now)}; a resumed study continues on the same machine only: name a new study"
    )


def _measurement_differs(study: str, recorded: dict, now: dict) -> str:
    """One line naming what a resumed sweep would measure differently from its study."""
    changes = []
    for key, flag in _FLAGS.items():
        if recorded.get(key) != now.get(key) and not (key == "workload_sha256" and changes):
            changes.append(f"{flag} {now.get(key)} (the study has {recorded.get(key)})")
    for key in sorted((set(recorded) | set(now)) - set(_FLAGS) - {"base"}):
        if recorded.get(key) != now.get(key):  # set by autotune itself: another version's
            changes.append(f"pacing {key} {now.get(key)} (the study has {recorded.get(key)})")
    base_before, base_now = recorded.get("base") or {}, now["base"]
    for name in sorted(set(base_before) | set(base_now)):
        if base_before.get(name) != base_now.get(name):
            changes.append(f"{name} {base_now.get(name)} (the study has {base_before.get(name)})")
    return (
        f"--resume {study}: its trials were measured differently; resume with the same "
        f"settings or name a new study: {'; '.join(changes)}"
    )
