"""How long balancing a workload takes as the file grows (issue 27, item 8).

Every timed pass balances the whole workload (`Workload.balanced`) before the model loads, and
that time is part of a trial's cost. Prints seconds per size for the current O(n log n)
balancing and for the first, quadratic one, and the ratio of each from one size to the next
(x2 prompts: about x2 for n log n, x4 for quadratic).

    python experiments/bench_workload.py [--sizes 2000,4000,8000,50000] [--block 4]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

from autotune.passes import MIN_WINDOW
from autotune.workload import DEFAULT_WORKLOAD, Prompt, load_workload


def quadratic(prompts, block: int) -> list:
    """The first `Workload.balanced`: every block scanned for each prompt."""
    blocks: list[list] = [[] for _ in range(-(-len(prompts) // block))]
    text = [0] * len(blocks)
    for prompt in sorted(prompts, key=lambda p: -len(p.text)):
        room = [i for i, members in enumerate(blocks) if len(members) < block]
        lightest = min(room, key=lambda i: text[i])
        blocks[lightest].append(prompt)
        text[lightest] += len(prompt.text)
    return [p for members in blocks for p in members]


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,4000,8000,50000")
    parser.add_argument("--block", type=int, default=MIN_WINDOW)
    parser.add_argument(
        "--quadratic-up-to", type=int, default=8000, help="skip the slow reference above this"
    )
    args = parser.parse_args()
    base = load_workload(DEFAULT_WORKLOAD)
    rng = random.Random(0)
    texts = [p.text for p in base.prompts]
    previous: dict[str, float] = {}
    print(f"{'prompts':>8} {'n log n s':>10} {'ratio':>6} {'quadratic s':>12} {'ratio':>6}")
    for size in (int(s) for s in args.sizes.split(",")):
        prompts = tuple(Prompt(id=str(i), text=rng.choice(texts), record={}) for i in range(size))
        workload = replace(base, prompts=prompts)
        now = {"fast": timed(lambda w=workload: w.balanced(args.block))}
        if size <= args.quadratic_up_to:
            now["slow"] = timed(lambda p=prompts: quadratic(p, args.block))
        cells = []
        for key in ("fast", "slow"):
            if key in now:
                ratio = now[key] / previous[key] if key in previous else None
                cells += [f"{now[key]:.3f}", f"x{ratio:.1f}" if ratio else "-"]
            else:
                cells += ["(skipped)", "-"]
        print(f"{size:>8} {cells[0]:>10} {cells[1]:>6} {cells[2]:>12} {cells[3]:>6}")
        previous = now


if __name__ == "__main__":
    main()
