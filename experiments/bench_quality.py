"""Speed and per-token quality of the embedded model's quantizations, measured in one run.

    python experiments/bench_quality.py [--workers 2] [--threads 1] [--batch-size 4]

The reference is the model's own weights at 1 worker x 1 thread, batch 1, greedy (as a
sweep's): it answers the first 8 prompts of the shipped workload and scores its answers by
teacher forcing, keeping its top 32 tokens per position. Then each weight type runs the same
layout (a trial's measurement: warmup, one pass of three windows) and, after its timed pass,
scores the reference's answers (`autotune.quality`): top-1 agreement, mean and p99 KL
divergence. It prints one table, with what scoring cost beside what the trial cost.

The embedded model is a Q4_1 file: its --quant variants are requantized from Q4_1 (f16 is the
same weights dequantized, so it scores ~0), which the table says; the figures of a model that
was not quantized already would be lower for every type.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUANTS = (None, "f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from autotune.config import TrialConfig
    from autotune.measure import Pacing, benchmark
    from autotune.models import ModelSpec, model_shape
    from autotune.quality import DEFAULT_FLOOR, Quality, ReferenceScores, requantized
    from autotune.topology import detect
    from autotune.workload import load_workload

    model, topology, workload = ModelSpec.resolve(), detect(), load_workload(None)
    shape = model_shape(model)
    started = time.monotonic()
    reference = benchmark(
        TrialConfig(backend="llamacpp"),
        workload,
        model,
        topology,
        Pacing(prompts=8, warmup=0),
        keep_reference=True,
    )
    scores = ReferenceScores.from_dict(reference.reference_scores)
    print(
        f"reference: {model.path.name} ({shape.weight_type}), llamacpp 1x1 b1 greedy, "
        f"{len(scores.scores)} prompts scored ({time.monotonic() - started:.0f} s)"
    )
    print(
        f"layout: llamacpp {args.workers}x{args.threads} batch {args.batch_size}; "
        f"default --min-quality: {DEFAULT_FLOOR.describe()}"
    )
    print(
        f"{'weights':<22}{'tokens/s':>9}{'top-1':>8}{'KL mean':>9}{'KL p99':>8}"
        f"{'scoring s':>10}{'trial s':>9}{'share':>7}  floor"
    )
    for quant in QUANTS:
        config = TrialConfig(
            backend="llamacpp",
            workers=args.workers,
            threads_per_worker=args.threads,
            batch_size=args.batch_size,
            quant=quant,
        )
        began = time.monotonic()
        result = benchmark(config, workload, model, topology, Pacing(), quality_reference=scores)
        took = time.monotonic() - began
        quality = Quality.from_dict(result.quality)
        if quality is None:
            print(f"{quant or 'own':<22} not scored: {result.warnings}")
            continue
        name = quant or f"own ({shape.weight_type})"
        if own := requantized(config, shape):
            name += f" from {own}"
        below = DEFAULT_FLOOR.why_below(quality)
        print(
            f"{name:<22}{result.tokens_per_s:>9.1f}{quality.top1:>8.1%}{quality.kld_mean:>9.4f}"
            f"{quality.kld_p99:>8.3f}{quality.scoring_s:>10.2f}{took:>9.1f}"
            f"{quality.scoring_s / took:>7.0%}  {'pruned' if below else 'kept'}"
        )
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
