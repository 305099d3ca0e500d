"""`autotune bench`: one configuration of one backend, measured as every sweep trial is."""

from __future__ import annotations

import argparse
import sys

from autotune.cli.common import (
    add_pacing_arguments,
    check_output,
    pacing_of,
    print_json,
    warn_bad_lines,
)

__all__ = ["register"]


def cmd_bench(args: argparse.Namespace) -> int:
    from autotune.config import config_from_args
    from autotune.models import ModelSpec
    from autotune.topology import detect
    from autotune.workload import load_workload

    config = config_from_args(args)
    workload = load_workload(args.workload, strict=args.strict)
    warn_bad_lines(workload)
    if args.limit:
        workload = workload.head(args.limit)
    model = ModelSpec.resolve(config.model)
    topology = detect()
    if args.output:  # fail on a bad --output before spending minutes measuring
        check_output(args.output, "--output")

    from autotune.measure import Pacing, benchmark

    def progress(message: str) -> None:
        print(f"[{config.backend}] {message}", file=sys.stderr, flush=True)

    result = benchmark(config, workload, model, topology, pacing_of(args), on_progress=progress)
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
        print_json(result.to_dict())
    else:
        from autotune import console

        console.show_result(result)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def register(sub) -> None:
    """The subcommand bench: a flag per TrialConfig field, the workload and pacing flags."""
    from autotune.config import add_config_arguments
    from backends import summaries

    bench = sub.add_parser(
        "bench",
        help="measure one configuration of one backend",
        description="Load the model once, warm up, run the workload --repeats times and report "
        "tokens/s, requests/s, latency, load time and peak memory (PSS of all processes).",
    )
    add_config_arguments(bench, summaries())
    bench.add_argument("--workload", metavar="FILE", help="prompts JSONL (default: shipped)")
    bench.add_argument("--strict", action="store_true", help="a bad workload line is fatal")
    add_pacing_arguments(bench, repeats=3)
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
