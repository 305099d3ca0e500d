"""What would ending a pass at its last window save, and does it move the figure?

    python experiments/bench_tail.py [--rounds 4] [--layouts 2x1b1,2x1b4,2x1b16] [--windows 1]

A llama.cpp pass is a ramp-up wave, its windows and a tail; its figure is the windows'
tokens/s, and the windows end when the queue is empty, at the ``width``-th last finish
(`autotune.passes.windows`). What runs after that, the tail, is measured by nothing. With
`Pacing.cut_tail` (on in a sweep's trials and pairs and in `verify`, off in `bench`) the
requests still running then are stopped (`Backend.generate_pass`) and come back marked
``cut``.

For each layout, in one run, ``--rounds`` rounds of two fresh measurements (a new load each,
as a trial's child does; no warmup wave and --windows windows, one as a sweep's search trial
of a layout that refills its slots), one running its tail and one cutting it, in alternating
order: the tokens/s of each (mean, sd of log), beside it a figure that spreads no request's
tokens over time (the finishes between the window's start and end times the tokens each
generates, over that time), the ratio cut / run (1.00: the cut changes nothing) and the
seconds each took after its load, with the share the cut saved. Every request generates the
same --max-new-tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_warmup import alternating, parse_layout, spread  # noqa: E402

from autotune.measure import Pacing, width_of  # noqa: E402
from autotune.models import ModelSpec  # noqa: E402
from autotune.topology import detect  # noqa: E402
from autotune.workload import load_workload  # noqa: E402
from backends import describe  # noqa: E402


def by_finishes(result, config) -> float:
    """Tokens/s of the last pass's window span counted by its finishes alone: the requests
    that finished inside it times the tokens each generates (all alike, ``ignore_eos``), over
    its time."""
    width = width_of(config)
    ends = sorted(c.finished_at for c in result.completions if not c.cut)
    began, ended = ends[width - 1], ends[len(result.completions) - width - 1]
    inside = len(result.completions) - 2 * width
    return inside * config.max_new_tokens / (ended - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--layouts", default="2x1b1,2x1b4,2x1b16")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--windows", type=int, default=1, help="windows a pass (a sweep: 1-3)")
    args = parser.parse_args()
    measured_with = detect(), ModelSpec.resolve(), load_workload()
    print(
        f"{'layout':<22} {'tail':>5} {'tokens/s mean':>13} {'sd':>6} {'by finishes':>11} "
        f"{'s after load':>12}"
    )
    for text in args.layouts.split(","):
        config = parse_layout(text, args.max_new_tokens)
        sides = {cut: Pacing(warmup=0, windows=args.windows, cut_tail=cut) for cut in (False, True)}
        finishes: dict = {False: [], True: []}
        figures, seconds = alternating(
            config,
            sides,
            args.rounds,
            measured_with,
            lambda cut, r, kept=finishes: kept[cut].append(r),
        )
        for cut in (False, True):
            print(
                f"{describe(config):<22} {'cut' if cut else 'run':>5} "
                f"{statistics.fmean(figures[cut]):>13.1f} {spread(figures[cut]):>6.1%} "
                f"{statistics.fmean(by_finishes(r, config) for r in finishes[cut]):>11.1f} "
                f"{statistics.fmean(seconds[cut]):>12.2f}"
            )
        ratio = statistics.fmean(figures[True]) / statistics.fmean(figures[False])
        saved = 1 - statistics.fmean(seconds[True]) / statistics.fmean(seconds[False])
        print(f"{'':<22} cut / run: x{ratio:.3f} tokens/s, {saved:.0%} less time\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
