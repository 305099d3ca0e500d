"""This machine's limits, measured, and the tokens/s bounds they put on a model.

- Memory read bandwidth: a parallel reduction over a buffer far larger than any cache.
- fp32 GEMM GFLOP/s: square matrix products.

Both run on all usable CPUs through torch's intra-op thread pool. The bounds follow:
batch-1 decode reads every weight once per token, so it cannot beat
``bandwidth / bytes_per_token``; no batch size can beat ``GFLOP/s / (2 * parameters)``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from autotune.models import WeightsSummary

__all__ = ["Roofline", "bounds", "measure"]


@dataclass(frozen=True, kw_only=True)
class Roofline:
    """Measured limits (medians of the raw samples kept beside them) and the model's bounds."""

    threads: int
    memory_bandwidth_gb_s: float
    gemm_gflops: float
    bandwidth_samples_gb_s: tuple[float, ...]
    gemm_samples_gflops: tuple[float, ...]
    buffer_bytes: int
    gemm_size: int
    model: str | None = None
    bytes_per_token: int | None = None
    parameters_per_token: int | None = None
    bound_batch1_tokens_per_s: float | None = None
    bound_compute_tokens_per_s: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict; keys are the field names."""
        data = asdict(self)
        data["bandwidth_samples_gb_s"] = list(self.bandwidth_samples_gb_s)
        data["gemm_samples_gflops"] = list(self.gemm_samples_gflops)
        return data


def bounds(bandwidth_gb_s: float, gflops: float, weights: WeightsSummary) -> tuple[float, float]:
    """(batch-1 bandwidth bound, compute bound) in tokens/s for a model's weights."""
    batch1 = bandwidth_gb_s * 1e9 / weights.bytes_per_token
    compute = gflops * 1e9 / (2 * weights.parameters_per_token)
    return batch1, compute


def _median_rate(run, work: float, repeats: int) -> tuple[float, tuple[float, ...]]:
    run()  # warmup: first touch of pages, thread pool start, kernel selection
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(work / (time.perf_counter() - start))
    return statistics.median(samples), tuple(samples)


def measure(
    *,
    threads: int,
    buffer_bytes: int = 2**30,
    gemm_size: int = 2048,
    repeats: int = 7,
    weights: WeightsSummary | None = None,
    model_name: str | None = None,
) -> Roofline:
    """Measure bandwidth and GEMM rate on ``threads`` threads; add bounds for ``weights``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            buffer = torch.ones(buffer_bytes // 4, dtype=torch.float32)
            bandwidth, bandwidth_samples = _median_rate(
                buffer.sum, buffer.numel() * 4 / 1e9, repeats
            )
            del buffer
            a = torch.randn(gemm_size, gemm_size)
            b = torch.randn(gemm_size, gemm_size)
            out = torch.empty(gemm_size, gemm_size)
            gflops, gemm_samples = _median_rate(
                lambda: torch.mm(a, b, out=out), 2 * gemm_size**3 / 1e9, repeats
            )
    finally:
        torch.set_num_threads(previous)

    batch1 = compute = None
    if weights is not None:
        batch1, compute = bounds(bandwidth, gflops, weights)
    return Roofline(
        threads=threads,
        memory_bandwidth_gb_s=bandwidth,
        gemm_gflops=gflops,
        bandwidth_samples_gb_s=bandwidth_samples,
        gemm_samples_gflops=gemm_samples,
        buffer_bytes=buffer_bytes,
        gemm_size=gemm_size,
        model=model_name,
        bytes_per_token=weights.bytes_per_token if weights else None,
        parameters_per_token=weights.parameters_per_token if weights else None,
        bound_batch1_tokens_per_s=batch1,
        bound_compute_tokens_per_s=compute,
    )
