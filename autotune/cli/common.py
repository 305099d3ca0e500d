"""What the commands share: argument types that name the flag in their error, the pacing and
reports flags, the --backends list, and small output helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from autotune.errors import ConfigError

__all__ = [
    "DEFAULT_BACKENDS",
    "add_pacing_arguments",
    "add_reports_dir",
    "backend_list",
    "check_output",
    "extra_buffers_verdict",
    "pacing_of",
    "positive",
    "print_json",
    "share",
    "study_name",
    "warn_bad_lines",
]

# The backends a sweep and a plan search where --backends is not given.
DEFAULT_BACKENDS = "llamacpp,hf,ddp,pipeline"


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def warn_bad_lines(workload, shown: int = 10) -> None:
    """One stderr line per skipped workload line (the first ``shown``), then a count."""
    for error in workload.errors[:shown]:
        print(f"warning: {error}", file=sys.stderr)
    if len(workload.errors) > shown:
        print(f"warning: ... and {len(workload.errors) - shown} more bad lines", file=sys.stderr)


def study_name(text: str) -> str:
    """A --study / --warm-start value: a name (letters, digits, ``._-``), never a path, so a
    study is always a directory right under --reports."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"a study name is letters, digits and ._- (not a path), got {text!r}"
        )
    return text


def positive(name: str, minimum: int = 1):
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


def share(flag: str):
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


def add_pacing_arguments(
    parser: argparse.ArgumentParser,
    repeats: int,
    settle: str = "no more passes",
    warmup: str = "",
):
    """How long one measurement runs (`autotune.measure.Pacing`): the same flags, the same
    meaning, for bench and for every trial of a sweep."""
    parser.add_argument(
        "--limit",
        type=positive("--limit"),
        metavar="N",
        help="use only the first N prompts of the workload (default: all of them)",
    )
    parser.add_argument(
        "--prompts",
        type=positive("--prompts"),
        metavar="N",
        help="requests per timed pass, the workload cycled to N (default: sized by the layout: "
        "a ramp-up wave, 3 windows of at least one wave each, and a tail)",
    )
    parser.add_argument(
        "--repeats",
        type=positive("--repeats"),
        default=repeats,
        metavar="R",
        help=f"timed passes at least (default: {repeats})",
    )
    parser.add_argument(
        "--warmup",
        type=positive("--warmup", 0),
        default=1,
        metavar="W",
        help=f"untimed warmup passes of one wave (default: 1{warmup})",
    )
    parser.add_argument(
        "--settle",
        metavar="DURATION",
        help="after --repeats passes, go on until the last 2 passes (the same requests each) "
        f"agree within 5%% or the timed passes have run this long (e.g. 60s; default: {settle}); "
        "a result that never does is flagged not stable",
    )


def pacing_of(args: argparse.Namespace, gpu_settle_s: float = 0.0):
    """The `Pacing` the flags of `add_pacing_arguments` ask for: --settle for every layout;
    without it, ``gpu_settle_s`` for the layouts that compute on a GPU only."""
    from autotune.measure import Pacing
    from autotune.units import parse_duration

    if args.settle:
        settle_s, on_cpu = parse_duration(args.settle, "--settle"), True
    else:
        settle_s, on_cpu = gpu_settle_s, False
    return Pacing(
        prompts=args.prompts,
        warmup=args.warmup,
        repeats=args.repeats,
        settle_s=settle_s,
        settle_on_cpu=on_cpu,
    )


def add_reports_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reports", default="reports", help="where studies live (default: reports)"
    )


def backend_list(text: str) -> list[str]:
    """The --backends list, each a registered backend."""
    from backends import BACKENDS

    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names or any(b not in BACKENDS for b in names):
        raise ConfigError(f"--backends {text!r}: each must be one of {', '.join(BACKENDS)}")
    return names


def check_output(path: str, flag: str) -> None:
    """A file we may write: its directory exists and it is not a directory itself."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory; name a file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"{flag} {path}: its directory does not exist")


def extra_buffers_verdict(backends: Sequence[str] = ("llamacpp",)):
    """This CPU's verdict on llama.cpp's extra buffer types (`backends.llamacpp.probe`: probed
    once, then cached), where llama.cpp is among ``backends``; else None."""
    if "llamacpp" not in backends:
        return None
    from backends.llamacpp.probe import extra_buffers_verdict

    return extra_buffers_verdict()
