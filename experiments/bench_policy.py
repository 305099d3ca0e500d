"""Does a change of one constant of the search help? An A/B on simulated sweeps.

    python experiments/bench_policy.py [--budget 5m] [--seeds 0-5] [--machines epyc,numa,...]
        [--set autotune.sweep.confirm.TOP=5 ...]

Runs a simulated sweep of --budget (on the simulated clock, as `bench_search.py --wall` does)
for every seed of --seeds on every machine of --machines (the names of `bench_search.MACHINES`),
with each ``--set MODULE.CONSTANT=VALUE`` applied first (the constant keeps its type); prints,
per machine, the confirmed winner's noise-free figure as % of the grid's optimum, mean (worst
seed), and beside it the fastest layout the sweep measured (noise-free, mean % of the optimum:
what a perfect choice among the measured would have reached), then the means over the
machines. Run it once without --set and once with, on the same
seeds: the difference is the change's, and the spread of the seeds is the noise to beat (a few
points a machine with 6 seeds). The tables of docs/results/dev-2vcpu-epyc.md ("policies
tried") came from this script's runs.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_search  # noqa: E402

from autotune.models import ModelSpec, model_shape  # noqa: E402
from autotune.study import Role  # noqa: E402
from autotune.units import parse_duration  # noqa: E402


def apply(setting: str) -> str:
    """Set ``MODULE.CONSTANT=VALUE``, the value of the constant's own type; says what it did."""
    name, _, value = setting.partition("=")
    module_name, _, constant = name.rpartition(".")
    module = importlib.import_module(module_name)
    old = getattr(module, constant)
    if isinstance(old, bool):  # bool("False") is True
        if value not in ("True", "False"):
            raise SystemExit(f"--set {name}: True or False, not {value!r}")
        setattr(module, constant, value == "True")
    else:
        setattr(module, constant, type(old)(value))
    return f"{name}: {old} -> {getattr(module, constant)}"


def seeds_of(text: str) -> range:
    """``0-5``: seeds 0 to 5."""
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main() -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--seeds", default="0-5")
    parser.add_argument("--machines", default=",".join(bench_search.MACHINES))
    parser.add_argument("--set", action="append", default=[], metavar="MODULE.CONSTANT=VALUE")
    args = parser.parse_args()
    for setting in args.set:
        print(apply(setting))
    budget_s = parse_duration(args.budget, "--budget")
    shape = model_shape(ModelSpec.resolve())
    means, reached = [], []
    for key in args.machines.split(","):
        _, path, backends, machine, space = bench_search.simulated(key, shape)
        optimum = max(value for _, value in bench_search.grid(space, machine))
        shares, measured = [], []
        with tempfile.TemporaryDirectory() as reports:
            for seed in seeds_of(args.seeds):
                summary = bench_search.sweep(
                    machine,
                    path,
                    backends,
                    seed,
                    budget_s=budget_s,
                    reports=Path(reports),
                )
                shares.append(machine.tokens_per_s(summary.winner.config) / optimum)
                best = max(
                    machine.tokens_per_s(r.config)
                    for r in summary.trials
                    if r.complete and r.role is not Role.REFERENCE
                )
                measured.append(best / optimum)
        means.append(statistics.fmean(shares))
        reached.append(statistics.fmean(measured))
        print(
            f"{key:10} {means[-1]:.1%} ({min(shares):.0%})  fastest measured {reached[-1]:.1%}",
            flush=True,
        )
    print(
        f"mean over the machines {statistics.fmean(means):.1%}"
        f"  fastest measured {statistics.fmean(reached):.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
