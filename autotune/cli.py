"""The ``autotune`` command: a thin argparse layer over the library, and the one error handler.

Heavy libraries (torch, transformers, llama_cpp) are imported inside the commands that need
them, so ``autotune --help`` and ``autotune detect`` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from autotune import __version__
from autotune.errors import AutotuneError, ConfigError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line and exit code 2 (never a usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------- commands


def cmd_detect(args: argparse.Namespace) -> int:
    from autotune import models, topology

    topo = topology.detect()
    data = topo.to_dict()
    verdict = _extra_buffers_verdict()
    data["llama_extra_buffers"] = verdict.to_dict()
    roof = None
    if args.roofline:
        from autotune import roofline

        spec = models.ModelSpec.resolve(args.model)
        weights = models.weights_summary(spec)
        # A buffer far beyond any cache, but never more than an eighth of free memory.
        buffer_bytes = max(64 * 2**20, min(2**30, topo.memory_available_bytes // 8))
        roof = roofline.measure(
            threads=topo.usable_cpus,
            buffer_bytes=buffer_bytes,
            weights=weights,
            model_name=spec.name,
        )
        data.update(roof.to_dict())
    if args.json:
        _print_json(data)
        return 0
    from autotune import console

    console.show_topology(topo, verdict)
    if roof is not None:
        console.show_roofline(roof)
    return 0


def _extra_buffers_verdict(backends: Sequence[str] = ("llamacpp",)):
    """This CPU's verdict on llama.cpp's extra buffer types (`backends.llamacpp_probe`: probed
    once, then cached), where llama.cpp is among ``backends``; else None."""
    if "llamacpp" not in backends:
        return None
    from backends.llamacpp_probe import extra_buffers_verdict

    return extra_buffers_verdict()


def cmd_model(args: argparse.Namespace) -> int:
    from autotune import models
    from autotune.cache import cache_entry_problem

    spec = models.ModelSpec.resolve(args.model)
    weights = models.weights_summary(spec)
    if spec.format == "hf":
        cache = "not needed (an HF directory)"
    else:
        if args.prepare:  # hf_dir verifies or builds the entry: it is ready when it returns
            cache = f"{models.hf_dir(spec)} (ready)"
        else:
            sha = spec.sha256()
            entry = models.hf_cache_entry(spec, source_sha256=sha)
            problem = cache_entry_problem(entry, sha)
            cache = f"{entry} ({problem or 'ready'})"
    if args.json:
        _print_json(
            {
                "name": spec.name,
                "path": str(spec.path),
                "format": spec.format,
                "embedded": spec.embedded,
                "hf_cache": cache,
                **weights.__dict__,
            }
        )
        return 0
    from autotune import console

    console.show_model(spec, weights, cache)
    return 0


def _warn_bad_lines(workload, shown: int = 10) -> None:
    """One stderr line per skipped workload line (the first ``shown``), then a count."""
    for error in workload.errors[:shown]:
        print(f"warning: {error}", file=sys.stderr)
    if len(workload.errors) > shown:
        print(f"warning: ... and {len(workload.errors) - shown} more bad lines", file=sys.stderr)


def cmd_workload(args: argparse.Namespace) -> int:
    from autotune.workload import load_workload

    workload = load_workload(args.file, strict=args.strict, source="workload")
    lengths = sorted(len(p.text) for p in workload.prompts)
    summary = {
        "name": workload.name,
        "prompts": len(workload),
        "shapes": workload.shapes,
        "bad_lines": len(workload.errors),
        "prompt_chars_min": lengths[0],
        "prompt_chars_median": lengths[len(lengths) // 2],
        "prompt_chars_max": lengths[-1],
    }
    _warn_bad_lines(workload)
    if args.json:
        _print_json({**summary, "errors": [str(e) for e in workload.errors]})
        return 0
    from autotune import console

    console.show_summary(f"Workload {workload.name}", summary)
    return 0


def _study_name(text: str) -> str:
    """A --study / --warm-start value: a name (letters, digits, ``._-``), never a path, so a
    study is always a directory right under --reports."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"a study name is letters, digits and ._- (not a path), got {text!r}"
        )
    return text


def _positive(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a whole number, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def _add_pacing_arguments(
    parser: argparse.ArgumentParser, repeats: int, settle: str = "no more passes"
):
    """How long one measurement runs (`autotune.measure.Pacing`): the same flags, the same
    meaning, for bench and for every trial of a sweep."""
    parser.add_argument(
        "--limit",
        type=_positive("--limit"),
        metavar="N",
        help="use only the first N prompts of the workload (default: all of them)",
    )
    parser.add_argument(
        "--prompts",
        type=_positive("--prompts"),
        metavar="N",
        help="requests per timed pass, the workload cycled to N (default: sized by the layout: "
        "a ramp-up wave, 3 windows of at least one wave each, and a tail)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive("--repeats"),
        default=repeats,
        metavar="R",
        help=f"timed passes at least (default: {repeats})",
    )
    parser.add_argument(
        "--warmup",
        type=_positive("--warmup", 0),
        default=1,
        metavar="W",
        help="untimed warmup passes of one wave (default: 1)",
    )
    parser.add_argument(
        "--settle",
        metavar="DURATION",
        help="after --repeats passes, go on until the last 3 windows agree within 5%% or the "
        f"timed passes have run this long (e.g. 60s; default: {settle}); "
        "a result that never does is flagged not stable",
    )


def _pacing(args: argparse.Namespace, settle_s: float = 0.0):
    """The `Pacing` the flags of `_add_pacing_arguments` ask for (``settle_s`` where no
    --settle was given)."""
    from autotune.measure import Pacing
    from autotune.units import parse_duration

    return Pacing(
        prompts=args.prompts,
        warmup=args.warmup,
        repeats=args.repeats,
        settle_s=parse_duration(args.settle, "--settle") if args.settle else settle_s,
    )


def _share(flag: str):
    """An argparse type: a number from 0 to 1."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{flag} must be between 0 and 1, got {text}")
        return value

    return parse


def cmd_bench(args: argparse.Namespace) -> int:
    from autotune.config import config_from_args
    from autotune.models import ModelSpec
    from autotune.topology import detect
    from autotune.workload import load_workload

    config = config_from_args(args)
    workload = load_workload(args.workload, strict=args.strict)
    _warn_bad_lines(workload)
    if args.limit:
        workload = workload.head(args.limit)
    model = ModelSpec.resolve(config.model)
    topology = detect()
    if args.output:  # fail on a bad --output before spending minutes measuring
        _check_output(args.output, "--output")

    from autotune.measure import Pacing, benchmark

    def progress(message: str) -> None:
        print(f"[{config.backend}] {message}", file=sys.stderr, flush=True)

    result = benchmark(config, workload, model, topology, _pacing(args), on_progress=progress)
    if args.agreement:
        from autotune.agreement import agreement, reference_config

        progress("reference run for agreement: batch 1, the model's own weights, greedy")
        # As `--batch-size 1 --warmup 0 --repeats 1` with the same flags measures it, so the
        # two --output files reproduce the figure.
        reference = benchmark(
            reference_config(config),
            workload,
            model,
            topology,
            Pacing(prompts=args.prompts, warmup=0, repeats=1),
        )
        result.agreement = agreement(result.completions, reference.completions)
    if args.output:
        from autotune.files import write_jsonl

        write_jsonl(args.output, (c.to_dict() for c in result.completions))
    if args.json:
        _print_json(result.to_dict())
    else:
        from autotune import console

        console.show_result(result)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


GPU_SETTLE_S = 30.0  # a sweep's default --settle on a host with GPUs


def cmd_sweep(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from autotune.config import TrialConfig
    from autotune.memory_plan import model_shape
    from autotune.models import ModelSpec
    from autotune.study import newest
    from autotune.sweep import SweepOptions, run_sweep
    from autotune.topology import detect
    from autotune.units import parse_duration, parse_size
    from autotune.workload import load_workload

    budget = parse_duration(args.budget)
    backends = _backends(args.backends)
    reports = Path(args.reports)
    study = args.study
    if study is None and args.resume:
        study = newest(reports).name
    study = study or time.strftime("sweep-%Y%m%d-%H%M%S")
    workload = load_workload(args.workload)  # a bad file fails here, before any trial
    _warn_bad_lines(workload)
    model = ModelSpec.resolve(args.model)
    shape = model_shape(model)
    simulation: dict = {}
    if args.machine:
        # Another machine, simulated: every trial is the speed model's, on a fake clock.
        from autotune.simulate import MachineModel

        machine = MachineModel.load(args.machine, shape)
        topology = machine.topology
        simulation = machine.simulation(args.seed)
    else:
        topology = detect()
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
        # A GPU's first passes are slow (allocator, clocks, new shapes): settle there. On a
        # CPU a pass is steady from its first window, and short layouts' windows differ by
        # their prompts more than 5% (measured), so more passes would only cost the budget.
        pacing=_pacing(args, settle_s=GPU_SETTLE_S if topology.gpus else 0.0),
        min_agreement=args.min_agreement,
        memory_limit_bytes=parse_size(args.memory_limit) if args.memory_limit else None,
        trial_timeout_s=(
            parse_duration(args.trial_timeout, "--trial-timeout") if args.trial_timeout else None
        ),
        base=base,
        pairs=args.pairs,
        seed=args.seed,
        simulated=args.machine,
        warm_start=args.warm_start,
        # Before the first llama.cpp trial: whether its extra buffers run on this CPU.
        extra_buffers=None if args.machine else _extra_buffers_verdict(backends),
    )
    from autotune import console

    progress = console.SweepProgress(budget, study)
    summary = run_sweep(
        options, topology=topology, model=model, shape=shape, on_event=progress, **simulation
    )
    console.show_sweep(summary)
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


def _backends(text: str) -> list[str]:
    """The --backends list, each a registered backend."""
    from backends import BACKENDS

    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names or any(b not in BACKENDS for b in names):
        raise ConfigError(f"--backends {text!r}: each must be one of {', '.join(BACKENDS)}")
    return names


def _check_output(path: str, flag: str) -> None:
    """A file we may write: its directory exists and it is not a directory itself."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory; name a file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"{flag} {path}: its directory does not exist")


def cmd_plan(args: argparse.Namespace) -> int:
    from autotune.config import TrialConfig
    from autotune.knobs import Target
    from autotune.memory_plan import MemoryPlanner, model_shape
    from autotune.models import ModelSpec
    from autotune.space import SearchSpace
    from autotune.topology import detect, load_machine
    from backends import backend_class

    topology = load_machine(args.machine) if args.machine else detect()
    backends = _backends(args.backends)
    model = ModelSpec.resolve(args.model)
    shape = model_shape(model)
    verdict = None if args.machine else _extra_buffers_verdict(backends)
    target = Target.of(
        topology,
        shape,
        batch_cap=args.max_batch,
        extra_buffers=verdict.offered if verdict else (None,),
    )
    planner = MemoryPlanner(shape, int(topology.memory_available_bytes * 0.8), topology)
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
        _print_json(data)
        return 0
    from autotune import console

    console.show_plan(data)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autotune.export import render
    from autotune.files import atomic_write
    from autotune.study import find

    study = find(Path(args.reports), args.study)
    summary = study.load_summary()
    machine = study.read_json(study.machine, "machine.json") or {}
    text = render(summary, fingerprint=machine.get("fingerprint"), fmt=args.format)
    if args.output:
        _check_output(args.output, "-o")
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


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autotune import console
    from autotune.models import ModelSpec
    from autotune.run import config_from_env_file, run_job
    from autotune.topology import detect
    from autotune.workload import load_workload

    topology = detect()
    config = config_from_env_file(Path(args.env) if args.env else None, topology)
    workload = load_workload(args.input, strict=True, source="--input")
    _check_output(args.output, "--output")
    output = Path(args.output)
    model = ModelSpec.resolve(config.model)
    with console.progress_bar(f"{config.backend} x{config.processes}") as advance:
        stats = run_job(
            config, workload, output, model=model, topology=topology, on_progress=advance
        )
    console.show_run(stats, output)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autotune import console
    from autotune.export import parse_header
    from autotune.measure import benchmark
    from autotune.models import ModelSpec
    from autotune.run import config_from_env_file, read_env_file
    from autotune.topology import detect
    from autotune.workload import load_workload

    topology = detect()
    path = Path(args.env)
    config = config_from_env_file(path, topology)
    recorded = parse_header(read_env_file(path)[1])
    workload = load_workload(args.workload)
    if args.limit:
        workload = workload.head(args.limit)
    result = benchmark(config, workload, ModelSpec.resolve(config.model), topology, _pacing(args))
    warnings, inside = console.show_verify(recorded, result, topology.fingerprint())
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0 if inside else 1  # a config that no longer performs as exported is a failure


# --------------------------------------------------------------------------- parser


def _add_reports_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reports", default="reports", help="where studies live (default: reports)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface."""
    parser = _Parser(
        prog="autotune",
        description="Find the parallel layout that makes a model fastest on this machine.",
    )
    parser.add_argument("--version", action="version", version=f"autotune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    detect = sub.add_parser("detect", help="show this machine's topology and limits")
    detect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    detect.add_argument(
        "--roofline",
        action="store_true",
        help="measure memory bandwidth and fp32 GEMM GFLOP/s, and the model's tokens/s bounds",
    )
    detect.add_argument(
        "--model", metavar="M", help="GGUF file or HF directory for --roofline (default: embedded)"
    )
    detect.set_defaults(handler=cmd_detect)

    model = sub.add_parser("model", help="show a model's weights and its converted HF copy")
    model.add_argument("--model", metavar="M", help="GGUF file or HF directory (default: embedded)")
    model.add_argument(
        "--prepare", action="store_true", help="build the HF copy of a GGUF now (once, cached)"
    )
    model.add_argument("--json", action="store_true", help="print JSON instead of a table")
    model.set_defaults(handler=cmd_model)

    from autotune.config import add_config_arguments
    from backends import summaries

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
        default="llamacpp,hf,ddp,pipeline",
        help="comma-separated backends (default: llamacpp,hf,ddp,pipeline)",
    )
    plan.add_argument(
        "--max-batch",
        type=_positive("--max-batch"),
        default=None,
        metavar="B",
        help="largest batch size in the space (default: 64, or 512 on a GPU host)",
    )
    plan.add_argument(
        "--examples",
        type=_positive("--examples", 0),
        default=50,
        metavar="N",
        help="configs to draw with the sweep's sampler (default: 50)",
    )
    plan.add_argument(
        "--seed", type=_positive("--seed", 0), default=0, help="sampler seed (default: 0)"
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.set_defaults(handler=cmd_plan)

    bench = sub.add_parser(
        "bench",
        help="measure one configuration of one backend",
        description="Load the model once, warm up, run the workload --repeats times and report "
        "tokens/s, requests/s, latency, load time and peak memory (PSS of all processes).",
    )
    add_config_arguments(bench, summaries())
    bench.add_argument("--workload", metavar="FILE", help="prompts JSONL (default: shipped)")
    bench.add_argument("--strict", action="store_true", help="a bad workload line is fatal")
    _add_pacing_arguments(bench, repeats=3)
    bench.add_argument(
        "--agreement",
        action="store_true",
        help="also run the reference (batch 1, the model's own weights, greedy) and report the "
        "share of answers identical to it and the mean position of the first difference",
    )
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument(
        "--output",
        metavar="FILE",
        help="write one JSONL line per request (text, token ids, timing)",
    )
    bench.set_defaults(handler=cmd_bench)

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
    sweep.add_argument("--trials", type=_positive("--trials"), help="stop after N trials")
    sweep.add_argument("--study", type=_study_name, help="study name (default: sweep-DATE-TIME)")
    sweep.add_argument("--resume", action="store_true", help="continue --study (or the newest)")
    sweep.add_argument(
        "--storage", metavar="URL", help="Optuna RDB URL (default: sqlite in reports/STUDY/)"
    )
    sweep.add_argument(
        "--backends",
        default="llamacpp,hf,ddp,pipeline",
        help="comma-separated backends to search (default: llamacpp,hf,ddp,pipeline)",
    )
    sweep.add_argument("--model", metavar="M", help="GGUF file or HF directory (default: embedded)")
    sweep.add_argument("--workload", metavar="FILE", help="prompts JSONL (default: shipped)")
    sweep.add_argument(
        "--max-new-tokens",
        type=_positive("--max-new-tokens"),
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
    _add_pacing_arguments(sweep, repeats=1, settle="30s on a GPU host, else no more passes")
    sweep.add_argument(
        "--min-agreement",
        type=_share("--min-agreement"),
        metavar="SHARE",
        help="prune layouts whose answers agree with the batch-1 reference run less than this "
        "(share of identical sequences, e.g. 0.9; default: none pruned, agreement reported)",
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
        type=_positive("--pairs"),
        default=3,
        help="A B pairs when re-measuring the best three against the baseline (default: 3)",
    )
    sweep.add_argument(
        "--seed", type=_positive("--seed", 0), help="sampler seed (for a repeatable search)"
    )
    sweep.add_argument(
        "--warm-start",
        metavar="STUDY",
        type=_study_name,
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
    _add_reports_dir(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    export = sub.add_parser(
        "export",
        help="write a study's winner as env vars",
        description="The winner of a sweep as the env var contract (PARALLEL_WORKERS, "
        "INFERENCE_NUM_THREADS, BATCH_SIZE, MODEL_QUANT, ...).",
    )
    export.add_argument("--study", type=_study_name, help="study name (default: the newest)")
    export.add_argument(
        "--format", default="env", help="env, shell, json, systemd or docker (default: env)"
    )
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    _add_reports_dir(export)
    export.set_defaults(handler=cmd_export)

    report = sub.add_parser(
        "report",
        help="figures and tables of a study: report.md, report.html",
        description="Draws the study's figures (PNG) and writes reports/STUDY/report.md and a "
        "standalone report.html (figures embedded). Works on a study cut off midway.",
    )
    report.add_argument("--study", type=_study_name, help="study name (default: the newest)")
    _add_reports_dir(report)
    report.add_argument(
        "--no-roofline",
        action="store_true",
        help="do not measure the roofline for its figure (it says so instead)",
    )
    report.set_defaults(handler=cmd_report)

    run = sub.add_parser(
        "run",
        help="the production job: answer a JSONL with the exported config",
        description="Answers every line of --input with the config of --env (or of the "
        "environment: the variables autotune export writes). One output line per input line, "
        "written as items finish; a re-run with the same --output skips ids already answered.",
    )
    run.add_argument("--env", metavar="FILE", help="env file from autotune export (default: env)")
    run.add_argument("--input", required=True, metavar="FILE", help="prompts JSONL")
    run.add_argument("--output", required=True, metavar="FILE", help="results JSONL")
    run.set_defaults(handler=cmd_run)

    verify = sub.add_parser(
        "verify",
        help="re-measure an exported config here and compare with its header",
    )
    verify.add_argument("--env", required=True, metavar="FILE", help="env file from export")
    verify.add_argument("--workload", metavar="FILE", help="prompts JSONL (default: shipped)")
    _add_pacing_arguments(verify, repeats=3)
    verify.set_defaults(handler=cmd_verify)

    workload = sub.add_parser("workload", help="check a prompts JSONL and summarise it")
    workload.add_argument("file", nargs="?", help="JSONL file (default: the shipped workload)")
    workload.add_argument("--strict", action="store_true", help="any bad line is fatal (exit 2)")
    workload.add_argument("--json", action="store_true", help="print JSON instead of a table")
    workload.set_defaults(handler=cmd_workload)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"autotune {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except AutotuneError as error:
        print(f"autotune {args.command}: failed: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"autotune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `autotune detect --json | head` closes the pipe early
        return 0


if __name__ == "__main__":
    sys.exit(main())
