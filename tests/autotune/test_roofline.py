"""Roofline bounds arithmetic, and a small real measurement."""

from __future__ import annotations

import pytest

from autotune.models import WeightsSummary
from autotune.roofline import bounds, measure

WEIGHTS = WeightsSummary(
    parameters_total=150_000_000,
    parameters_per_token=100_000_000,
    bytes_per_token=50_000_000,
    file_bytes=60_000_000,
    weight_type="Q4_0",
    layers=10,
)


def test_bounds_follow_from_bandwidth_and_flops():
    batch1, compute = bounds(bandwidth_gb_s=10.0, gflops=200.0, weights=WEIGHTS)
    assert batch1 == pytest.approx(10e9 / 50e6)  # 200 tokens/s
    assert compute == pytest.approx(200e9 / 2e8)  # 1000 tokens/s


def test_small_measurement_keeps_raw_samples():
    roof = measure(
        threads=1,
        buffer_bytes=16 * 2**20,
        gemm_size=128,
        repeats=3,
        weights=WEIGHTS,
        model_name="m",
    )
    assert len(roof.bandwidth_samples_gb_s) == 3 and len(roof.gemm_samples_gflops) == 3
    assert roof.memory_bandwidth_gb_s > 0 and roof.gemm_gflops > 0
    assert (
        min(roof.bandwidth_samples_gb_s)
        <= roof.memory_bandwidth_gb_s
        <= max(roof.bandwidth_samples_gb_s)
    )
    # 50 MB of weights read per token; 2 x 100 M multiply-adds per token.
    assert roof.bound_batch1_tokens_per_s == pytest.approx(roof.memory_bandwidth_gb_s * 1e9 / 50e6)
    assert roof.bound_compute_tokens_per_s == pytest.approx(roof.gemm_gflops * 1e9 / 2e8)
    data = roof.to_dict()
    assert data["model"] == "m" and data["bytes_per_token"] == 50_000_000
