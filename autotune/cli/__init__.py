"""The ``autotune`` command: a thin argparse layer over the library, and the one error handler.

Each module registers its own subcommands (`register`): `machine` (detect, model, workload),
`bench`, `study` (plan, sweep, export, report) and `job` (run, verify); `common` holds what
they share. Heavy libraries (torch, transformers, llama_cpp) are imported inside the commands
that need them, so ``autotune --help`` and ``autotune detect`` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autotune import __version__
from autotune.cli import bench, job, machine, study
from autotune.errors import AutotuneError, ConfigError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line and exit code 2 (never a usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface."""
    parser = _Parser(
        prog="autotune",
        description="Find the parallel layout that makes a model fastest on this machine.",
    )
    parser.add_argument("--version", action="version", version=f"autotune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for commands in (machine, bench, study, job):
        commands.register(sub)
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
