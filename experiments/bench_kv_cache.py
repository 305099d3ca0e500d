"""What the pipeline's KV cache gives: per-step and total time with it and without, one run.

    python experiments/bench_kv_cache.py [--stages 2] [--prompts 4] [--batch-size 2]
                                         [--max-new-tokens 48] [--pairs 2]

Seed 004 reported 3.0x per step and 1.8x in total for its LlamaDistributor. Here both
layouts (the same stages and split, `kv_cache` on and off) are loaded side by side and timed
alternately, A B A B, on the same prompts with greedy decoding, so the ratios compare runs
made under the same machine load. Per step = the mean time between two tokens of one
micro-batch (the decode steps); total = the wall time of the whole workload. The two must also
produce the same tokens: the cache changes the cost, never the answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from autotune.config import TrialConfig
from autotune.models import ModelSpec
from autotune.topology import detect
from autotune.workload import load_workload
from backends import create_backend


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--pairs", type=int, default=2, help="A B rounds to time")
    args = parser.parse_args()

    topology = detect()
    model = ModelSpec.resolve()
    prompts = load_workload().head(args.prompts).prompts
    threads = max(1, topology.usable_cpus // args.stages)
    base = TrialConfig(
        backend="pipeline",
        stages=args.stages,
        threads_per_worker=threads,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    layouts = {"with KV cache": base, "without": base.replace(kv_cache=False)}
    backends = {name: create_backend(config, model, topology) for name, config in layouts.items()}
    print(
        f"pipeline {args.stages} stages x {threads} threads, {len(prompts)} prompts, "
        f"batch {args.batch_size}, {args.max_new_tokens} new tokens, {args.pairs} pairs",
        flush=True,
    )
    timings = {name: {"total": [], "step": []} for name in layouts}
    tokens = {}
    try:
        for backend in backends.values():
            backend.load()
            backend.generate(prompts[:1], base.generation)  # warm up
        for _ in range(args.pairs):
            for name, backend in backends.items():
                start = time.monotonic()
                completions = backend.generate(prompts, base.generation)
                timings[name]["total"].append(time.monotonic() - start)
                timings[name]["step"].append(backend.details()["decode_step_s"])
                tokens[name] = [c.token_ids for c in completions]
    finally:
        for backend in backends.values():
            backend.close()

    medians = {
        name: {kind: statistics.median(values) for kind, values in t.items()}
        for name, t in timings.items()
    }
    for name, m in medians.items():
        print(f"{name:14s} per step {m['step'] * 1000:7.1f} ms   total {m['total']:6.2f} s")
    on, off = medians["with KV cache"], medians["without"]
    print(
        f"KV cache speedup: per step x{off['step'] / on['step']:.2f}, "
        f"total x{off['total'] / on['total']:.2f}"
    )
    same = tokens["with KV cache"] == tokens["without"]
    print(f"same tokens with and without: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
