"""The search and its studies: `autotune sweep`, `autotune plan` (what a sweep would search),
`autotune export` and `autotune report`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune.cli.common import (
    DEFAULT_BACKENDS,
    add_pacing_arguments,
    add_reports_dir,
    backend_list,
    check_output,
    extra_buffers_verdict,
    pacing_of,
    positive,
    print_json,
    share,
    study_name,
    warn_bad_lines,
)

__all__ = ["register"]

if TYPE_CHECKING:  # the commands import the library inside them: --help stays instant
    from autotune.models import ModelShape, ModelSpec
    from autotune.topology import Topology
    from backends.llamacpp.probe import ExtraBuffersVerdict

GPU_SETTLE_S = 30.0  # a sweep's default --settle on a host with GPUs


@dataclass
class Prepared:
    """What a sweep and a plan start from: the model and its shape, the machine (this one, or
    the one of --machine, with its file's data), and this CPU's llama.cpp extra-buffers verdict
    (`backends.llamacpp.probe`; None for another machine, or without llama.cpp)."""

    model: ModelSpec
    shape: ModelShape
    topology: Topology
    machine_data: dict | None
    verdict: ExtraBuffersVerdict | None

    @property
    def extra_buffers(self) -> tuple:
        """The values of llama.cpp's extra_buffers a search offers (`Target.extra_buffers`)."""
        return self.verdict.offered if self.verdict else (None,)


def prepare(model_arg: str | None, machine_arg: str | None, backends: list[str]) -> Prepared:
    """`Prepared` for --model and --machine (a bad one is a ConfigError naming it); the probe
    runs here, before the first llama.cpp trial, where llama.cpp is among ``backends``."""
    from autotune.machine_file import machine_file
    from autotune.models import ModelSpec, model_shape
    from autotune.topology import detect

    model = ModelSpec.resolve(model_arg)
    shape = model_shape(model)
    if machine_arg:
        topology, data = machine_file(machine_arg)
        return Prepared(model, shape, topology, data, None)
    return Prepared(model, shape, detect(), None, extra_buffers_verdict(backends))


def cmd_sweep(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from autotune.config import TrialConfig
    from autotune.quality import QualityFloor
    from autotune.study import newest
    from autotune.sweep import SweepOptions, run_sweep
    from autotune.units import parse_duration, parse_size
    from autotune.workload import load_workload

    budget = parse_duration(args.budget)
    backends = backend_list(args.backends)
    reports = Path(args.reports)
    study = args.study
    if study is None and args.resume:
        study = newest(reports).name
    study = study or time.strftime("sweep-%Y%m%d-%H%M%S")
    workload = load_workload(args.workload)  # a bad file fails here, before any trial
    warn_bad_lines(workload)
    found = prepare(args.model, args.machine, backends)
    model, shape, topology = found.model, found.shape, found.topology
    simulation: dict = {}
    if found.machine_data is not None:
        # Another machine, simulated: every trial is the speed model's, on a fake clock.
        from autotune.simulate import MachineModel

        machine = MachineModel.of(topology, shape, found.machine_data)
        simulation = machine.simulation(args.seed)
    # The model by absolute path where one was given (the embedded default stays None, so an
    # export never points into the environment the sweep ran in).
    base = TrialConfig(
        model=str(model.path.absolute()) if args.model else None,
        max_new_tokens=args.max_new_tokens,
        ignore_eos=args.ignore_eos,
    )
    options = SweepOptions(
        study=study,
        reports_dir=reports,
        budget_s=budget,
        trials=args.trials,
        storage=args.storage,
        resume=args.resume,
        backends=backends,
        workload=args.workload,
        limit=args.limit,
        # A GPU's first passes are slow (allocator, clocks, new shapes): layouts computing on
        # one settle (`autotune.measure.settles`). A CPU layout is steady from its first pass,
        # on a GPU host too, so more passes would only cost the budget.
        pacing=pacing_of(args, gpu_settle_s=GPU_SETTLE_S if topology.gpus else 0.0),
        min_agreement=args.min_agreement,
        min_quality=QualityFloor.parse(args.min_quality),
        memory_limit_bytes=parse_size(args.memory_limit) if args.memory_limit else None,
        trial_timeout_s=(
            parse_duration(args.trial_timeout, "--trial-timeout") if args.trial_timeout else None
        ),
        base=base,
        pairs=args.pairs,
        seed=args.seed,
        simulated=args.machine,
        warm_start=args.warm_start,
        extra_buffers=found.verdict,
    )
    from autotune import console_sweep

    progress = console_sweep.SweepProgress(budget, study)
    summary = run_sweep(
        options, topology=topology, model=model, shape=shape, on_event=progress, **simulation
    )
    console_sweep.show_sweep(summary)
    if summary.interrupted:
        return 130
    if summary.winner is None:  # the study's files are written; nothing to export
        print(
            f"autotune sweep: failed: no trial finished with every request answered; "
            f"see {summary.directory / 'trials.jsonl'}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from autotune.config import TrialConfig
    from autotune.knobs import Target
    from autotune.memory_plan import MemoryPlanner, memory_limit
    from autotune.space import SearchSpace
    from backends import backend_class

    backends = backend_list(args.backends)
    found = prepare(args.model, args.machine, backends)
    model, shape, topology = found.model, found.shape, found.topology
    target = Target.of(topology, shape, args.max_batch, extra_buffers=found.extra_buffers)
    planner = MemoryPlanner(shape, memory_limit(topology), topology)
    space = SearchSpace(target, backends, TrialConfig(), planner)
    plan = space.plan()
    examples = space.examples(args.examples, seed=args.seed)
    data = {
        "machine": {
            "source": args.machine or "this machine",
            "fingerprint": topology.fingerprint(),
            "usable_cpus": topology.usable_cpus,
            "physical_cores": topology.physical_cores,
            "threads_per_core": topology.threads_per_core,
            "gpus": len(topology.gpus),
            "memory_available_bytes": topology.memory_available_bytes,
        },
        "model": {"name": model.name, "layers": shape.layers},
        "memory_limit_bytes": planner.limit_bytes,
        **plan,
        "baseline": space.baseline().config.to_dict(),
        "examples": [
            {
                **config.to_dict(),
                "devices": backend_class(config.backend).devices(config, topology),
                "predicted_memory_bytes": planner.predict(config),
                "predicted_gpu_memory_bytes": planner.predict_gpus(config),
            }
            for config in examples
        ],
    }
    if args.json:
        print_json(data)
        return 0
    from autotune import console

    console.show_plan(data)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autotune.export import render
    from autotune.files import atomic_write
    from autotune.study import find
    from autotune.summary import SweepSummary

    study = find(Path(args.reports), args.study)
    summary = SweepSummary.load(study)
    machine = study.read_json(study.machine, "machine.json") or {}
    text = render(summary, fingerprint=machine.get("fingerprint"), fmt=args.format)
    if args.output:
        check_output(args.output, "-o")
        atomic_write(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autotune import console
    from autotune.report import build_report, load_study
    from autotune.study import StudyDir

    study = load_study(Path(args.reports), args.study)
    if study.roofline is None and not args.no_roofline:
        from autotune import models, roofline
        from autotune.topology import detect

        print(
            "measuring the machine's roofline for the report (once per study) ...",
            file=sys.stderr,
            flush=True,
        )
        spec = models.ModelSpec.resolve(study.machine.get("model"))
        roof = roofline.measure(
            threads=detect().usable_cpus,
            weights=models.weights_summary(spec),
            model_name=spec.name,
        )
        study.roofline = roof.to_dict()
        directory = StudyDir(study.directory)
        directory.write_json(directory.roofline, study.roofline)
    report = build_report(study)
    console.show_report(study, report)
    return 0


def register(sub) -> None:
    """The subcommands plan, sweep, export and report."""
    from autotune.quality import DEFAULT_FLOOR

    plan = sub.add_parser(
        "plan",
        help="show what a sweep would search on a machine, without running anything",
        description="Per backend: its knobs and their values on the machine, the constraints "
        "that join them (or why the backend is left out), the size of the space; with --json "
        "also 'examples', configs drawn by the sweep's own sampler, each one the machine can "
        "run. --machine plans for another machine from its `autotune detect --json`.",
    )
    plan.add_argument(
        "--machine", metavar="FILE", help="JSON of `autotune detect --json` on the machine to plan"
    )
    plan.add_argument("--model", metavar="M", help="GGUF file or HF directory (default: embedded)")
    plan.add_argument(
        "--backends",
        default=DEFAULT_BACKENDS,
        help=f"comma-separated backends (default: {DEFAULT_BACKENDS})",
    )
    plan.add_argument(
        "--max-batch",
        type=positive("--max-batch"),
        default=None,
        metavar="B",
        help="largest batch size in the space (default: 64, or 512 on a GPU host)",
    )
    plan.add_argument(
        "--examples",
        type=positive("--examples", 0),
        default=50,
        metavar="N",
        help="configs to draw with the sweep's sampler (default: 50)",
    )
    plan.add_argument(
        "--seed", type=positive("--seed", 0), default=0, help="sampler seed (default: 0)"
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.set_defaults(handler=cmd_plan)

    sweep = sub.add_parser(
        "sweep",
        help="search the layouts that fit this machine, within a time budget",
        description="An Optuna search over backends, workers, threads, batch size, "
        "quantization and pipeline splits, bounded by the detected CPUs and memory. Trial 0 "
        "is the naive baseline; the seeds' recipes follow; the best three are re-measured "
        "alternately with the baseline. Writes reports/STUDY/{study.db,trials.jsonl,"
        "machine.json,summary.json,best.env}.",
    )
    sweep.add_argument("--budget", default="30m", help="wall-clock budget: 90s, 30m, 1h30m")
    sweep.add_argument("--trials", type=positive("--trials"), help="stop after N trials")
    sweep.add_argument("--study", type=study_name, help="study name (default: sweep-DATE-TIME)")
    sweep.add_argument("--resume", action="store_true", help="continue --study (or the newest)")
    sweep.add_argument(
        "--storage", metavar="URL", help="Optuna RDB URL (default: sqlite in reports/STUDY/)"
    )
    sweep.add_argument(
        "--backends",
        default=DEFAULT_BACKENDS,
        help=f"comma-separated backends to search (default: {DEFAULT_BACKENDS})",
    )
    sweep.add_argument("--model", metavar="M", help="GGUF file or HF directory (default: embedded)")
    sweep.add_argument("--workload", metavar="FILE", help="prompts JSONL (default: shipped)")
    sweep.add_argument(
        "--max-new-tokens",
        type=positive("--max-new-tokens"),
        default=32,
        metavar="N",
        help="tokens generated per prompt (default: 32)",
    )
    sweep.add_argument(
        "--ignore-eos",
        action="store_true",
        help="every prompt generates exactly --max-new-tokens, so every layout does the same "
        "work (as llama-bench does)",
    )
    add_pacing_arguments(
        sweep,
        repeats=1,
        settle="30s on a GPU host, else no more passes",
        warmup="; none in a search trial whose pass's ramp-up wave warms it: a layout that "
        "refills its slots and does not settle",
    )
    sweep.add_argument(
        "--min-agreement",
        type=share("--min-agreement"),
        metavar="SHARE",
        help="prune layouts whose answers agree with the batch-1 reference run less than this "
        "(share of identical sequences, e.g. 0.9; default: none pruned, agreement reported)",
    )
    sweep.add_argument(
        "--min-quality",
        metavar="FLOOR",
        default=DEFAULT_FLOOR.as_flag(),
        help="prune layouts whose next-token distributions, scored by teacher forcing against "
        "the batch-1 reference run of the source weights, are under this floor: top1=SHARE "
        "(share of positions whose most likely token is the reference's), kld=NATS (mean KL "
        "divergence), both comma-separated, or none (default: %(default)s; README, "
        "'Quality')",
    )
    sweep.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="skip layouts predicted to need more (default: 80%% of available memory)",
    )
    sweep.add_argument(
        "--trial-timeout", metavar="DURATION", help="kill any trial running longer (e.g. 2m)"
    )
    sweep.add_argument(
        "--pairs",
        type=positive("--pairs"),
        default=3,
        help="A B pairs when re-measuring the best three against the baseline (default: 3)",
    )
    sweep.add_argument(
        "--seed", type=positive("--seed", 0), help="sampler seed (for a repeatable search)"
    )
    sweep.add_argument(
        "--warm-start",
        metavar="STUDY",
        type=study_name,
        help="measure a previous study's best three layouts right after the baseline (same "
        "machine and model, or exit 2)",
    )
    sweep.add_argument(
        "--machine",
        metavar="FILE",
        help="simulate another machine instead of measuring this one: its `autotune detect "
        "--json` (or a /proc + /sys copy); every figure is a speed model's, the budget runs "
        "on a simulated clock (a 30m sweep takes seconds)",
    )
    add_reports_dir(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    export = sub.add_parser(
        "export",
        help="write a study's winner as env vars",
        description="The winner of a sweep as the env var contract (PARALLEL_WORKERS, "
        "INFERENCE_NUM_THREADS, BATCH_SIZE, MODEL_QUANT, ...).",
    )
    export.add_argument("--study", type=study_name, help="study name (default: the newest)")
    export.add_argument(
        "--format", default="env", help="env, shell, json, systemd or docker (default: env)"
    )
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    add_reports_dir(export)
    export.set_defaults(handler=cmd_export)

    report = sub.add_parser(
        "report",
        help="figures and tables of a study: report.md, report.html",
        description="Draws the study's figures (PNG) and writes reports/STUDY/report.md and a "
        "standalone report.html (figures embedded). Works on a study cut off midway.",
    )
    report.add_argument("--study", type=study_name, help="study name (default: the newest)")
    add_reports_dir(report)
    report.add_argument(
        "--no-roofline",
        action="store_true",
        help="do not measure the roofline for its figure (it says so instead)",
    )
    report.set_defaults(handler=cmd_report)
