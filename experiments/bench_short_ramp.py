"""How short may a wide layout's ramp-up and window be?

    python experiments/bench_short_ramp.py [--passes 2] [--layouts 2x1b8,2x1b16,2x1b32]
        [--max-new-tokens 32] [--ignore-eos]

A search trial of a layout that refills its slots times one pass: a ramp-up of one wave (from
the pass's start to the ``width``-th finish), then one window of at least one wave (to the
``2 x width``-th finish, `autotune.passes.windows`), its tail cut. A wide layout's trial is
two waves of requests (a 2x1 batch 32 trial took 43 s of a 5-minute sweep's 225 search
seconds on 2 vCPUs, docs/results/dev-2vcpu-epyc.md). The first wave itself reads 25-32%
under the steady state (`bench_first_wave.py`): every slot prefills at once. This asks
whether the steady state starts earlier than the ``width``-th finish, and whether a window of
fewer finishes than a wave reads it as well, since the windows count tokens where they were
generated, not where requests ended.

For each layout, one load, then ``--passes`` passes of the sweep's three-window size run to
their end (the embedded workload, the sweep's balanced order, ``--max-new-tokens`` a request,
stopping at the end of an answer unless ``--ignore-eos``). The reference is the mean of each
pass's last two windows (the steady state, long after the ramp). For each candidate
(``begin`` finishes of ramp-up, a window of ``length`` finishes, both as shares of the
width, at least `MIN_WINDOW` finishes a window), the window's tokens/s counted as the sweep
counts them, over the reference: the mean ratio and its spread over the passes (sd of log),
and the seconds from the pass's start to the window's end (what a one-window trial's pass
would take before its cut). ``1 x 1`` is the sweep's rule today.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_first_wave import layout_passes, options  # noqa: E402
from bench_warmup import spread  # noqa: E402

from autotune.passes import MIN_WINDOW, _first_token_at, _tokens_between, windows  # noqa: E402
from backends import describe  # noqa: E402

# (begin, length) as shares of the width: ramp-up finishes before the window, its finishes.
CANDIDATES = [(1.0, 1.0), (0.5, 1.0), (0.5, 0.5), (0.25, 0.5), (0.5, 0.25), (0.25, 0.25)]


def window_between(completions, first: int, last: int) -> tuple[float, float]:
    """(tokens/s generated between the ``first``-th and the ``last``-th finish, each request's
    tokens spread evenly from its first token to its finish as `windows` counts them; seconds
    from the pass's start to the ``last``-th finish)."""
    answered = [c for c in completions if c.error is None]
    start = min(c.finished_at - c.latency_s for c in answered)
    ends = sorted(c.finished_at for c in answered)
    low, high = ends[first - 1], ends[last - 1]
    spans = [(_first_token_at(c), c.finished_at, len(c.token_ids)) for c in answered]
    return sum(_tokens_between(span, low, high) for span in spans) / (high - low), high - start


def main() -> int:
    args = options(__doc__, passes=2, layouts="2x1b8,2x1b16,2x1b32")
    print(f"{'layout':<22} {'begin x length':>14} {'ratio':>7} {'sd':>6} {'s to its end':>12}")
    for config, width, passes in layout_passes(args, windows_a_pass=3):
        found: dict[tuple[float, float], list[tuple[float, float]]] = {}
        references = []
        for completions in passes:
            reference = statistics.fmean(windows(completions, width)[1:])
            references.append(reference)
            for begin, length in CANDIDATES:
                first = max(1, round(begin * width))
                last = first + max(MIN_WINDOW, round(length * width))
                rate, seconds = window_between(completions, first, last)
                found.setdefault((begin, length), []).append((rate / reference, seconds))
        print(f"{describe(config):<22} reference {statistics.fmean(references):.1f} tokens/s")
        for (begin, length), rows in found.items():
            ratios = [ratio for ratio, _ in rows]
            geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
            seconds = statistics.fmean(s for _, s in rows)
            label = f"{begin:g} x {length:g}"
            print(f"{'':<22} {label:>14} {geo:>7.3f} {spread(ratios):>6.1%} {seconds:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
