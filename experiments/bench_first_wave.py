"""Could a wide layout's first wave be its window?

    python experiments/bench_first_wave.py [--passes 4] [--layouts 2x1b8,2x1b16]
        [--max-new-tokens 32] [--ignore-eos]

A search trial of a layout that refills its slots times one pass: a ramp-up wave (every slot
starts at once), then one window of at least one wave, from the ``width``-th finish to the
``2 x width``-th (`autotune.passes.windows`), its tail cut. For a wide layout that is two
waves of requests, and on 2 vCPUs a 2x1 batch 32 trial took 43 s of a 5-minute sweep's 225
search seconds (docs/results/dev-2vcpu-epyc.md, 2026-12-02). Where answers end together (the
same length), the slots stay in step wave after wave, and the first wave is already what every
later one is; where they differ, the first wave runs all slots in the same phase, the steady
state does not.

For each layout, one load, then ``--passes`` passes of the sweep's one-window size (its
default generation: the embedded workload, ``--max-new-tokens`` per request, stopping at the
end of an answer unless ``--ignore-eos``), run to their end; from each pass's completions, the
window's tokens/s as the sweep measures it and the first wave's (the tokens generated from the
pass's start to the ``width``-th finish, each request's tokens spread evenly from its first
token to its finish, as the windows count them), their ratio, and the seconds to each one's
end. Prints per layout: each figure's mean and spread over the passes (sd of log), the ratio
first wave / window (mean and spread), and the seconds to each one's end.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_warmup import parse_layout, spread  # noqa: E402

from autotune.measure import Pacing, width_of  # noqa: E402
from autotune.models import ModelSpec  # noqa: E402
from autotune.passes import _first_token_at, _tokens_between, windows  # noqa: E402
from autotune.topology import detect  # noqa: E402
from autotune.workload import load_workload  # noqa: E402
from backends import create_backend, describe  # noqa: E402


def first_wave(completions, width: int) -> tuple[float, float, float]:
    """(tokens/s from the pass's start to its ``width``-th finish, counted as the windows count
    them; seconds to that finish; seconds to the ``2 x width``-th, where a one-window pass
    closes its window and is cut)."""
    answered = [c for c in completions if c.error is None]
    start = min(c.finished_at - c.latency_s for c in answered)
    ends = sorted(c.finished_at for c in answered)
    end = ends[width - 1]
    spans = [(_first_token_at(c), c.finished_at, len(c.token_ids)) for c in answered]
    tokens = sum(_tokens_between(span, start, end) for span in spans)
    return tokens / (end - start), end - start, ends[2 * width - 1] - start


def options(doc: str, passes: int, layouts: str) -> argparse.Namespace:
    """The command line of this script and of `bench_short_ramp.py` (``passes``, ``layouts``:
    their defaults)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--passes", type=int, default=passes)
    parser.add_argument("--layouts", default=layouts)
    parser.add_argument("--max-new-tokens", type=int, default=32)  # the sweep's default
    parser.add_argument("--ignore-eos", action="store_true")
    return parser.parse_args()


def layout_passes(args: argparse.Namespace, windows_a_pass: int):
    """Per layout of ``args.layouts``: (its config, its width, the completions of each of
    ``args.passes`` passes of the sweep's ``windows_a_pass``-window size run to their end),
    one load per layout, the embedded workload in the sweep's balanced order."""
    topology, model, workload = detect(), ModelSpec.resolve(), load_workload()
    for text in args.layouts.split(","):
        config = parse_layout(text, args.max_new_tokens)
        if not args.ignore_eos:
            config = config.replace(ignore_eos=False)
        width = width_of(config)
        prompts = Pacing(windows=windows_a_pass).pass_of(workload, width).prompts
        backend = create_backend(config, model, topology)
        backend.load()
        try:
            passes = [
                backend.generate_pass(prompts, config.generation, None) for _ in range(args.passes)
            ]
        finally:
            backend.close()
        yield config, width, passes


def main() -> int:
    args = options(__doc__, passes=4, layouts="2x1b8,2x1b16")
    print(
        f"{'layout':<22} {'window':>8} {'sd':>6} {'first wave':>10} {'sd':>6} "
        f"{'ratio':>6} {'sd':>6} {'s to window end':>15} {'s to first wave':>15}"
    )
    for config, width, passes in layout_passes(args, windows_a_pass=1):
        steady, first, ratios, to_window, to_first = [], [], [], [], []
        for completions in passes:
            found = windows(completions, width)
            rate, seconds, window_s = first_wave(completions, width)
            steady.append(found[0])
            first.append(rate)
            ratios.append(rate / found[0])
            to_window.append(window_s)
            to_first.append(seconds)
        geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
        print(
            f"{describe(config):<22} {statistics.fmean(steady):>8.1f} {spread(steady):>6.1%} "
            f"{statistics.fmean(first):>10.1f} {spread(first):>6.1%} {geo:>6.3f} "
            f"{spread(ratios):>6.1%} {statistics.fmean(to_window):>15.1f} "
            f"{statistics.fmean(to_first):>15.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
