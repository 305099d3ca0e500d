"""Which trial measurement predicts the production job's order of layouts?

    python experiments/bench_measurement.py [--prompts 320] [--max-new-tokens 32] [--layouts ...]

For a few llama.cpp layouts on the embedded model, in one run, three figures each:

- old: what a sweep trial measured before issue 12 (``--limit 12 --repeats 1``): the first 12
  prompts, one warmup wave, one timed pass, that whole pass's tokens/s;
- new: what a trial measures now (the sweep's default pacing): the workload cycled to a
  ramp-up wave, 3 windows and a tail per pass, passes until the last 3 windows agree within
  5% (up to 10 s), the mean of those windows;
- production: ``autotune run`` over --prompts lines (the shipped workload cycled under new
  ids) with the layout's env file; generated tokens / wall time of the whole command (start,
  load and all, as a user waits for it).

Every request generates exactly --max-new-tokens (``ignore_eos`` in all three), so the three
count the same work. Then the order of the layouts by each figure, and Kendall's tau of the
old and of the new order against production (1: the same order; -1: reversed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

from autotune.config import TrialConfig
from autotune.measure import Pacing, benchmark
from autotune.models import ModelSpec
from autotune.topology import detect
from autotune.workload import load_workload
from backends import describe, fields_read


def layouts(cpus: int) -> list[TrialConfig]:
    """Layouts whose order is worth predicting: processes against threads, batch 1 to 32."""
    shapes = [(1, cpus, 1), (cpus, 1, 1), (1, cpus, 8), (cpus, 1, 8), (1, cpus, 32)]
    return [
        TrialConfig(backend="llamacpp", workers=w, threads_per_worker=t, batch_size=b)
        for w, t, b in shapes
    ]


def production(config: TrialConfig, lines: Path, scratch: Path) -> float:
    """Generated tokens/s of ``autotune run`` over ``lines`` with ``config``'s env file."""
    env_file = scratch / "layout.env"
    env = config.to_env(only=fields_read(config.backend))
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    output = scratch / "answers.jsonl"
    output.unlink(missing_ok=True)
    command = [sys.executable, "-m", "autotune", "run", "--env", str(env_file)]
    command += ["--input", str(lines), "--output", str(output)]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - started
    answered = sum(json.loads(line)["success"] for line in output.read_text().splitlines())
    return answered * config.max_new_tokens / wall


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two rankings of the same items."""
    pairs = list(combinations(range(len(a)), 2))
    agree = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs)
    disagree = sum((a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs)
    return (agree - disagree) / len(pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=320, help="lines of the production run")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    topology = detect()
    model = ModelSpec.resolve()
    workload = load_workload()
    configs = [
        c.replace(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        for c in layouts(topology.usable_cpus)
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-measurement-") as scratch:
        lines = Path(scratch) / "job.jsonl"
        lines.write_text(
            "".join(
                json.dumps({"id": f"job{i}", "prompt": p.text}) + "\n"
                for i, p in enumerate(workload.cycled(args.prompts).prompts)
            )
        )
        print(
            f"{len(configs)} llama.cpp layouts, embedded model, {args.max_new_tokens} tokens per "
            f"request (ignore_eos), {topology.usable_cpus} usable CPUs; production: "
            f"autotune run over {args.prompts} lines",
            flush=True,
        )
        for config in configs:
            old = benchmark(config, workload.head(12), model, topology, Pacing(prompts=12))
            new = benchmark(config, workload, model, topology, Pacing(settle_s=10.0))
            made = production(config, lines, Path(scratch))
            rows.append((describe(config), old.pass_tokens_per_s, new.tokens_per_s, made))
            print(
                f"  {rows[-1][0]:28s} old {old.pass_tokens_per_s:6.1f}  new {new.tokens_per_s:6.1f}"
                f" (spread {new.window_spread:.1%}, {new.repeats} passes of {new.prompts})  "
                f"production {made:6.1f} tok/s",
                flush=True,
            )
    print()
    print(f"{'layout':28s} {'old':>7s} {'new':>7s} {'production':>10s}  old/prod  new/prod")
    for name, old, new, made in rows:
        print(
            f"{name:28s} {old:7.1f} {new:7.1f} {made:10.1f}  {old / made:8.2f}  {new / made:8.2f}"
        )

    def order(column: int) -> str:
        ranked = sorted(rows, key=lambda row: row[column], reverse=True)
        return " > ".join(row[0] for row in ranked)

    print(f"\nproduction order: {order(3)}")
    print(f"old order:        {order(1)}")
    print(f"new order:        {order(2)}")
    made = [row[3] for row in rows]
    tau_old = kendall_tau([row[1] for row in rows], made)
    tau_new = kendall_tau([row[2] for row in rows], made)
    print(f"Kendall's tau against production: old {tau_old:+.2f}, new {tau_new:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
