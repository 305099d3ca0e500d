"""The GPU check: does the sweep find what a hand grid finds on this GPU host?

    python experiments/bench_gpu_grid.py --model DIR [--batches 1,4,16,64,256]
        [--dtypes bfloat16,float16,float32] [--settle 60s] [--study NAME] [--reports reports]

Runs ``autotune bench --backend hf`` (the GPU baseline's backend) for every batch x dtype of
the grid, each in its own process, fixed-length generation (``--ignore-eos``), and prints
tokens/s with the window spread, and the best cell. With ``--study NAME`` (a finished
``autotune sweep --model DIR --budget 10m --study NAME``, run in the same session) it also
prints the sweep's winner, its ratio to the grid's best (the goal: at least 0.9) and the
trials that failed as invalid (the goal: none; the space should have refused them).

A 10-minute sweep and a grid of 15 cells together run past one device call (10 minutes):
start the sweep in the background in one call and read it in the next.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def bench(model: str, batch: int, dtype: str, settle: str) -> dict | str:
    """One grid cell's result dict, or the error line."""
    command = [
        sys.executable,
        "-m",
        "autotune",
        "bench",
        "--backend",
        "hf",
        "--model",
        model,
        "--dtype",
        dtype,
        "--batch-size",
        str(batch),
        "--max-new-tokens",
        "64",
        "--ignore-eos",
        "--settle",
        settle,
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {done.returncode}"
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF directory of the model")
    parser.add_argument("--batches", default="1,4,16,64,256")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--settle", default="60s")
    parser.add_argument("--study", default=None, help="a finished sweep to compare")
    parser.add_argument("--reports", default="reports")
    args = parser.parse_args()

    best = None
    print(f"{'batch':>5} {'dtype':>9} {'tokens/s':>9} {'passes':>7}  note (passes: their spread)")
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            result = bench(args.model, batch, dtype, args.settle)
            if isinstance(result, str):
                print(f"{batch:>5} {dtype:>9} {'-':>9} {'-':>7}  {result}", flush=True)
                continue
            rate = result["tokens_per_s"]
            # Stable: its last two passes (the same requests each) agree within 5%.
            note = {True: "", False: "not stable", None: "one pass"}[result["stable"]]
            gpu = result.get("peak_gpu_memory_bytes") or {}
            if gpu:
                note += f" GPU {max(gpu.values()) / 2**30:.1f} GiB"
            spread = result.get("pass_spread")
            spread_text = f"{spread:7.1%}" if spread is not None else f"{'-':>7}"
            print(f"{batch:>5} {dtype:>9} {rate:9.1f} {spread_text}  {note}")
            if best is None or rate > best[0]:
                best = (rate, batch, dtype)
    if best is None:
        print("no grid cell ran")
        return 1
    print(f"grid best: {best[0]:.1f} tokens/s (hf batch {best[1]} {best[2]})")
    if not args.study:
        return 0

    from autotune.failures import FailureClass
    from autotune.study import StudyDir, TrialState
    from autotune.summary import SweepSummary
    from backends import describe

    directory = StudyDir(Path(args.reports) / args.study)
    winner = SweepSummary.load(directory).winner
    records = directory.records()
    invalid = [
        r for r in records if r.state is TrialState.FAIL and r.failure_class is FailureClass.INVALID
    ]
    if winner is None:
        print("the study has no winner")
        return 1
    paired = statistics.median(winner.paired["candidate"]) if winner.paired else None
    figure = paired or winner.value
    print(
        f"sweep winner: {figure:.1f} tokens/s ({describe(winner.config)}; "
        f"{'paired median' if paired else 'search trial'})"
    )
    ratio = figure / best[0]
    print(f"sweep / grid best: x{ratio:.2f} ({'met' if ratio >= 0.9 else 'NOT met'}: >= 0.9)")
    print(f"trials failed as invalid: {len(invalid)}")
    for record in invalid:
        print(f"  trial {record.number}: {describe(record.config)}: {record.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
