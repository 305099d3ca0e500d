"""The seeds' layouts measured on this machine, in one run, with ratios to the naive baseline.

    python experiments/bench_seeds.py [--prompts 32] [--max-new-tokens 64] [--batches 1,4,8,16,32]

- llama.cpp (seeds 000/001): 1 worker x 2 threads and 2 workers x 1 thread, batch sizes
  1/4/8/16/32 (threads per worker scaled to the usable CPUs);
- transformers batching (seed 000): float32, batch sizes 1/4/8/16/32;
- with ``--backends ...,ddp,pipeline``: DDP (seeds 002/003), one rank per CPU x 1 thread, and
  the layer pipeline (seed 004), 2 stages split by measured compute, at the same batch sizes.

Every layout runs through `autotune.measure.benchmark` (one warmup, one timed pass) on the
same prompts. The naive baseline is llama.cpp, 1 worker, llama-cpp-python's default thread
count (half the CPUs), batch 1: what a user gets without tuning.
"""

from __future__ import annotations

import argparse
import sys

from autotune.config import TrialConfig
from autotune.knobs import Target
from autotune.measure import Pacing, benchmark
from autotune.models import ModelSpec
from autotune.topology import detect
from autotune.workload import load_workload
from backends.llamacpp import LlamaCppBackend


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--backends", default="llamacpp,hf")
    args = parser.parse_args()

    topology = detect()
    model = ModelSpec.resolve()
    workload = load_workload().head(args.prompts)
    cpus = topology.usable_cpus
    batches = [int(b) for b in args.batches.split(",")]
    layouts = []
    # The sweep's own naive baseline: llama-cpp-python's default threads.
    naive = LlamaCppBackend.naive(Target(topology, layers=1))
    baseline = TrialConfig(backend="llamacpp", **naive)
    layouts.append(("baseline: llamacpp 1 x default threads, batch 1", baseline))
    if "llamacpp" in args.backends:
        for workers, threads in ((1, cpus), (cpus, 1)):
            for batch in batches:
                layouts.append(
                    (
                        f"llamacpp {workers} x {threads} threads, batch {batch}",
                        TrialConfig(
                            backend="llamacpp",
                            workers=workers,
                            threads_per_worker=threads,
                            batch_size=batch,
                        ),
                    )
                )
    if "hf" in args.backends:
        for batch in batches:
            layouts.append(
                (
                    f"hf float32, {cpus} threads, batch {batch}",
                    TrialConfig(backend="hf", threads_per_worker=cpus, batch_size=batch),
                )
            )

    if "ddp" in args.backends:
        for batch in batches:
            layouts.append(
                (
                    f"ddp {cpus} ranks x 1 thread, batch {batch}",
                    TrialConfig(
                        backend="ddp", workers=cpus, threads_per_worker=1, batch_size=batch
                    ),
                )
            )
    if "pipeline" in args.backends:
        stages = 2
        for batch in batches:
            layouts.append(
                (
                    f"pipeline {stages} stages x {max(1, cpus // stages)} threads, batch {batch}",
                    TrialConfig(
                        backend="pipeline",
                        stages=stages,
                        partition="compute",
                        threads_per_worker=max(1, cpus // stages),
                        batch_size=batch,
                    ),
                )
            )

    print(
        f"{len(workload)} prompts x up to {args.max_new_tokens} new tokens, {cpus} usable CPUs",
        flush=True,
    )
    base_rate = None
    for label, config in layouts:
        config = config.replace(max_new_tokens=args.max_new_tokens)
        result = benchmark(config, workload, model, topology, Pacing())
        if base_rate is None:
            base_rate = result.tokens_per_s
        print(
            f"{label:48s} {result.tokens_per_s:7.1f} tok/s  {result.requests_per_s:5.2f} req/s  "
            f"peak {result.peak_memory_bytes / 2**20:6.0f} MiB  "
            f"x{result.tokens_per_s / base_rate:.2f} vs baseline",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
