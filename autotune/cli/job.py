"""The production job: `autotune run` with an exported config, and `autotune verify`, which
re-measures it here against its header."""

from __future__ import annotations

import argparse
import sys

from autotune.cli.common import add_pacing_arguments, check_output, pacing_of

__all__ = ["register"]


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
    check_output(args.output, "--output")
    output = Path(args.output)
    model = ModelSpec.resolve(config.model)
    with console.progress_bar(f"{config.backend} x{config.processes}") as advance:
        stats = run_job(
            config, workload, output, model=model, topology=topology, on_progress=advance
        )
    console.show_run(stats, output)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from dataclasses import replace
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
    # Measured as the sweep's paired passes were, whose figures it checks: cut at the last
    # window (`Pacing.cut_tail`).
    pacing = replace(pacing_of(args), cut_tail=True)
    result = benchmark(config, workload, ModelSpec.resolve(config.model), topology, pacing)
    warnings, inside = console.show_verify(recorded, result, topology.fingerprint())
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0 if inside else 1  # a config that no longer performs as exported is a failure


def register(sub) -> None:
    """The subcommands run and verify."""
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
    add_pacing_arguments(verify, repeats=3)
    verify.set_defaults(handler=cmd_verify)
