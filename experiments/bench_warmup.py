"""Does a search trial need its warmup wave where its pass ramps up anyway?

    python experiments/bench_warmup.py [--rounds 6] [--layouts 2x1b1,2x1b4,1x2b8]

A sweep's search trial of a llama.cpp layout is one load, a warmup wave (``width`` requests,
untimed) and one timed pass: a ramp-up wave, one window and a tail, its figure the window's
tokens/s, from the ``width``-th finish on (`autotune.passes.windows`). The ramp-up wave
already runs every slot before the window opens, so the warmup wave may buy nothing but time.

For each layout, in one run, ``--rounds`` rounds of two fresh measurements (a new load each,
as a trial's child does), one with the warmup wave and one without, in alternating order:
the window's tokens/s of each, their means, the ratio without / with (1.00: the warmup
changes nothing), the spread of each side (sd of log), and the seconds each measurement took
after its load. Every request generates the same --max-new-tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.config import TrialConfig  # noqa: E402
from autotune.measure import Pacing, benchmark  # noqa: E402
from autotune.models import ModelSpec  # noqa: E402
from autotune.topology import detect  # noqa: E402
from autotune.workload import load_workload  # noqa: E402
from backends import describe  # noqa: E402


def parse_layout(text: str, max_new_tokens: int) -> TrialConfig:
    """``2x1b4``: 2 workers x 1 thread, batch 4."""
    shape, batch = text.split("b")
    workers, threads = shape.split("x")
    return TrialConfig(
        backend="llamacpp",
        workers=int(workers),
        threads_per_worker=int(threads),
        batch_size=int(batch),
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
    )


def spread(values: list[float]) -> float:
    """Standard deviation of the logs: the relative noise of one measurement."""
    return statistics.stdev(math.log(v) for v in values) if len(values) > 1 else 0.0


def alternating(config, sides: dict, rounds: int, measured_with, keep=None) -> tuple[dict, dict]:
    """``rounds`` rounds of one fresh measurement (`autotune.measure.benchmark`: a new load,
    as a trial's child does) per side of ``sides`` (label -> `Pacing`), the sides' order
    reversed every other round so drift falls on both alike; ``measured_with`` is (topology,
    model, workload); ``keep(label, result)``, if given, sees each `RunResult`. Returns per
    label the tokens/s figures and the seconds each took after its load."""
    topology, model, workload = measured_with
    figures: dict = {label: [] for label in sides}
    seconds: dict = {label: [] for label in sides}
    labels = list(sides)
    for index in range(rounds):
        for label in labels if index % 2 == 0 else labels[::-1]:
            started = time.monotonic()
            result = benchmark(config, workload, model, topology, sides[label])
            if keep is not None:
                keep(label, result)
            figures[label].append(result.tokens_per_s)
            seconds[label].append(time.monotonic() - started - result.load_time_s)
    return figures, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--layouts", default="2x1b1,2x1b4,1x2b8")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    measured_with = detect(), ModelSpec.resolve(), load_workload()
    print(f"{'layout':<22} {'warmup':>6} {'tokens/s mean':>13} {'sd':>6} {'s after load':>12}")
    for text in args.layouts.split(","):
        config = parse_layout(text, args.max_new_tokens)
        sides = {warmup: Pacing(warmup=warmup, windows=1) for warmup in (1, 0)}
        figures, seconds = alternating(config, sides, args.rounds, measured_with)
        for warmup in (1, 0):
            print(
                f"{describe(config):<22} {warmup:>6} {statistics.fmean(figures[warmup]):>13.1f} "
                f"{spread(figures[warmup]):>6.1%} {statistics.fmean(seconds[warmup]):>12.2f}"
            )
        ratio = statistics.fmean(figures[0]) / statistics.fmean(figures[1])
        saved = 1 - statistics.fmean(seconds[0]) / statistics.fmean(seconds[1])
        print(f"{'':<22} without / with: x{ratio:.3f} tokens/s, {saved:.0%} less time\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
