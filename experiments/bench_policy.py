"""Does a change of one constant of the search help? An A/B on simulated sweeps.

    python experiments/bench_policy.py [--budget 5m] [--seeds 0-5] [--machines epyc,numa,...]
        [--set autotune.sweep.confirm.TOP=5 ...] [--errors]

Runs a simulated sweep of --budget (on the simulated clock, as `bench_search.py --wall` does)
for every seed of --seeds on every machine of --machines (the names of `bench_search.MACHINES`),
with each ``--set MODULE.CONSTANT=VALUE`` applied first (the constant keeps its type); prints,
per machine, the confirmed winner's noise-free figure as % of the grid's optimum, mean (worst
seed), and beside it the best layout the confirmation paired (what a perfect choice among
the paired would have reached) and the fastest layout the sweep measured (what a perfect
choice among all the measured would have reached), each noise-free, mean % of the optimum,
then the means over the machines; with --errors, per machine, the log errors of what the
choice among the paired weighs (each pair's ratio, short and full, the paired layouts' search
figures, the baseline's), against the model's noise-free figures. Run it once without --set
and once with, on the same seeds: the difference is the change's, and the spread of the
seeds is the noise to beat: a machine's mean over seeds 0-15 and over 16-31 differ by a point
or two (10 minutes: 96.7% and 95.4% over the six CPU machines), so judge a change on 32 seeds
(48 simulated 10-minute sweeps take about 4 minutes a process). The tables of
docs/results/dev-2vcpu-epyc.md ("policies tried") came from this script's runs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
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


@dataclass
class Confirmations:
    """What the confirmation of the sweep just run did (`watch_confirmation`): the trials it
    paired, and each re-measurement as (candidate config, baseline config, windows a pass,
    the candidate's figures, the baseline's)."""

    numbers: list[int] = field(default_factory=list)
    runs: list[tuple] = field(default_factory=list)

    def clear(self) -> None:
        self.numbers.clear()
        self.runs.clear()


def watch_confirmation() -> Confirmations:
    """Wrap `autotune.sweep.core.confirm` so that each sweep's confirmation is recorded in the
    `Confirmations` returned (cleared before each sweep by the caller)."""
    from autotune.sweep import core
    from autotune.sweep.events import ConfirmStarted

    seen = Confirmations()
    confirm = core.confirm

    def watched(*args, tell, run_pairs, **kwargs):
        def told(event):
            if isinstance(event, ConfirmStarted):
                seen.numbers.append(event.number)
            tell(event)

        def ran(candidate, baseline, pairs, deadline_s, pacing):
            outcome = run_pairs(candidate, baseline, pairs, deadline_s, pacing)
            if outcome.complete:
                rates = outcome.result
                seen.runs.append(
                    (candidate, baseline, pacing.windows, rates["candidate"], rates["baseline"])
                )
            return outcome

        return confirm(*args, tell=told, run_pairs=ran, **kwargs)

    core.confirm = watched
    return seen


def errors(machine, summary, records: dict, seen: Confirmations) -> dict[str, list[float]]:
    """The log errors (measured over the model's noise-free figure) of what the choice among
    the paired weighs: each pair's ratio, short (one window a pass) and full, and the paired
    layouts' own search figures (``records``: the sweep's trials by number) and the
    baseline's."""
    true = machine.tokens_per_s
    found: dict[str, list[float]] = {"short": [], "full": [], "search": [], "baseline": []}
    for candidate, baseline, windows, ours, theirs in seen.runs:
        expected = math.log(true(candidate) / true(baseline))
        kind = "short" if windows == 1 else "full"
        found[kind] += [math.log(a / b) - expected for a, b in zip(ours, theirs, strict=True)]
    for number in dict.fromkeys(seen.numbers):
        found["search"].append(math.log(records[number].value / true(records[number].config)))
    found["baseline"].append(math.log(summary.baseline.value / true(summary.baseline.config)))
    return found


def describe(found: dict[str, list[float]]) -> str:
    """One line: per kind of figure, how many, their mean log error and its spread, and how
    many are more than 20% low or 25% high."""
    parts = []
    for kind, values in found.items():
        if values:
            low = sum(v < math.log(0.8) for v in values)
            high = sum(v > math.log(1.25) for v in values)
            parts.append(
                f"{kind} {len(values)}: {statistics.fmean(values):+.3f} sd "
                f"{statistics.pstdev(values):.3f} ({low} low, {high} high)"
            )
    return "  errors " + "; ".join(parts)


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
    parser.add_argument(
        "--errors", action="store_true", help="also the paired figures' errors, per machine"
    )
    args = parser.parse_args()
    for setting in args.set:
        print(apply(setting))
    budget_s = parse_duration(args.budget, "--budget")
    shape = model_shape(ModelSpec.resolve())
    seen = watch_confirmation()
    means, paired, reached = [], [], []
    for key in args.machines.split(","):
        _, path, backends, machine, space = bench_search.simulated(key, shape)
        optimum = max(value for _, value in bench_search.grid(space, machine))
        shares, best_paired, measured = [], [], []
        found: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory() as reports:
            for seed in seeds_of(args.seeds):
                seen.clear()
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
                records = {r.number: r for r in summary.trials}
                best_paired.append(
                    max((machine.tokens_per_s(records[n].config) for n in seen.numbers), default=0)
                    / optimum
                )
                if args.errors:
                    for kind, values in errors(machine, summary, records, seen).items():
                        found.setdefault(kind, []).extend(values)
        means.append(statistics.fmean(shares))
        paired.append(statistics.fmean(best_paired))
        reached.append(statistics.fmean(measured))
        print(
            f"{key:10} {means[-1]:.1%} ({min(shares):.0%})  best paired {paired[-1]:.1%}"
            f"  fastest measured {reached[-1]:.1%}",
            flush=True,
        )
        if args.errors:
            print(describe(found), flush=True)
    print(
        f"mean over the machines {statistics.fmean(means):.1%}"
        f"  best paired {statistics.fmean(paired):.1%}"
        f"  fastest measured {statistics.fmean(reached):.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
