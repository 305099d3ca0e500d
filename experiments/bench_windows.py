"""How much noisier is a pass of one window than a pass of three?

    python experiments/bench_windows.py [--rounds 8] [--layouts 2x1b4,1x2b8]

The simulator (`autotune.simulate`) takes a pass of one window to be sqrt(3) times as noisy
as a pass of three (each window holding other prompts, independent draws), and the sweep's
search trials run one window where the budget is short. This measures it: for each layout,
``--rounds`` rounds of two fresh measurements (a new load each, as a trial's child does, one
warmup wave), one timed pass of one window and one of three, in alternating order; each
side's mean and spread (sd of log over the rounds), and the ratio of the spreads (the
simulator's: x1.73). Every request generates the same --max-new-tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_warmup import alternating, parse_layout, spread  # noqa: E402

from autotune.measure import Pacing  # noqa: E402
from autotune.models import ModelSpec  # noqa: E402
from autotune.topology import detect  # noqa: E402
from autotune.workload import load_workload  # noqa: E402
from backends import describe  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--layouts", default="2x1b4,1x2b8")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    measured_with = detect(), ModelSpec.resolve(), load_workload()
    print(f"{'layout':<22} {'windows':>7} {'tokens/s mean':>13} {'sd':>6}")
    for text in args.layouts.split(","):
        config = parse_layout(text, args.max_new_tokens)
        sides = {windows: Pacing(windows=windows) for windows in (1, 3)}
        figures, _ = alternating(config, sides, args.rounds, measured_with)
        for windows in (1, 3):
            print(
                f"{describe(config):<22} {windows:>7} {statistics.fmean(figures[windows]):>13.1f} "
                f"{spread(figures[windows]):>6.1%}"
            )
        ratio = spread(figures[1]) / max(spread(figures[3]), 1e-9)
        print(f"{'':<22} one window / three: x{ratio:.2f} the spread (simulator: x1.73)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
