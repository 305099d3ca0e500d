"""Every backend on this machine's GPUs: placement, shared GPUs, a GPU + CPU pipeline, llama.cpp
offload, and the measured GPU memory. Marked ``gpu``: they skip, saying so, without CUDA (see
tests/conftest.py) and run with ``pytest -m gpu`` on a GPU host."""

from __future__ import annotations

import pytest

from autotune.config import TrialConfig
from autotune.knobs import Target
from autotune.measure import Pacing, benchmark
from autotune.memory_plan import MemoryPlanner
from autotune.models import model_shape
from autotune.space import SearchSpace
from autotune.workload import GenerationSettings, Prompt, Workload
from backends import backend_class, create_backend

pytestmark = pytest.mark.gpu

PROMPTS = tuple(
    Prompt(id=f"q{i}", text=f"Question {i}: what is {i} plus {2 * i}? Say it in words.")
    for i in range(9)
)
SETTINGS = GenerationSettings(max_new_tokens=8)


def answers(config: TrialConfig, model, topology) -> list[tuple[int, ...]]:
    with create_backend(config, model, topology) as backend:
        completions = backend.generate(PROMPTS, SETTINGS)
    assert [c.id for c in completions] == [p.id for p in PROMPTS]
    return [c.token_ids for c in completions]


def identical(a, b) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def on_gpu(tiny_gguf, topology):
    """hf's greedy tokens on cuda:0, float32 (the reference of the layouts below)."""
    assert topology.gpus, "detect() lists the GPU torch sees"
    config = TrialConfig(backend="hf", threads_per_worker=1, batch_size=2)
    assert backend_class("hf").devices(config, topology) == ["cuda:0"]
    return answers(config, tiny_gguf, topology)


def test_hf_on_the_gpu_answers_as_on_the_cpu(tiny_gguf, topology, on_gpu):
    cpu = TrialConfig(backend="hf", threads_per_worker=1, batch_size=2, placement="cpu")
    # float32 both; different kernels may flip a near tie of the random model, rarely.
    assert identical(answers(cpu, tiny_gguf, topology), on_gpu) >= 7


def test_ddp_ranks_on_the_gpus_or_sharing_one(tiny_gguf, topology, on_gpu):
    config = TrialConfig(backend="ddp", workers=2, threads_per_worker=1, batch_size=2)
    devices = backend_class("ddp").devices(config, topology)
    if len(topology.gpus) == 1:
        assert devices == ["cuda:0", "cuda:0"], "seed 003's fallback: the ranks share it"
    assert identical(answers(config, tiny_gguf, topology), on_gpu) >= 7


def test_a_pipeline_over_the_gpu_and_the_cpu(tiny_gguf, topology, on_gpu):
    config = TrialConfig(
        backend="pipeline", stages=2, placement="cuda:0,cpu", threads_per_worker=1, batch_size=2
    )
    assert identical(answers(config, tiny_gguf, topology), on_gpu) >= 7


def test_gpu_memory_is_measured_and_corrects_the_planner(tiny_gguf, topology):
    config = TrialConfig(backend="hf", threads_per_worker=1, batch_size=4, max_new_tokens=8)
    workload = Workload(name="gpu-test", prompts=PROMPTS)
    result = benchmark(config, workload, tiny_gguf, topology, Pacing(prompts=9, warmup=0))
    measured = result.peak_gpu_memory_bytes
    assert set(measured) == {"0"} and measured["0"] > 100 * 2**20  # a CUDA context at least
    assert result.gpu_utilisation is not None
    planner = MemoryPlanner(model_shape(tiny_gguf), 2**40, topology)
    before = planner.predict_gpus(config)[0]
    planner.observe_gpus(config, measured)
    # Corrected: what was measured where the prediction was lower, else unchanged.
    assert planner.predict_gpus(config)[0] == pytest.approx(max(before, measured["0"]), rel=0.01)


def test_llamacpp_offloads_every_layer(tiny_gguf, topology):
    if not topology.llama_gpu_offload:
        pytest.skip("the installed llama-cpp-python is a CPU build (autotune detect says so)")
    cpu = TrialConfig(backend="llamacpp", threads_per_worker=1, batch_size=2)
    config = cpu.replace(gpu_layers=-1)
    assert backend_class("llamacpp").devices(config, topology)[0].startswith("cuda:")
    workload = Workload(name="gpu-test", prompts=PROMPTS)
    result = benchmark(config, workload, tiny_gguf, topology, Pacing(prompts=9, warmup=0))
    assert result.peak_gpu_memory_bytes, "the worker holds memory on its GPU"
    assert identical(answers(config, tiny_gguf, topology), answers(cpu, tiny_gguf, topology)) >= 7


def test_the_space_on_this_gpu_host_runs_only_what_fits(tiny_gguf, topology):
    shape = model_shape(tiny_gguf)
    planner = MemoryPlanner(shape, int(topology.memory_available_bytes * 0.8), topology)
    space = SearchSpace(
        Target(topology, shape.layers), ["hf", "ddp", "pipeline"], TrialConfig(), planner
    )
    baseline = space.baseline().config
    assert baseline.backend == "hf" and backend_class("hf").devices(baseline, topology) == [
        "cuda:0"
    ]
    for config in space.examples(30):
        assert space.refusal(config) is None
        if config.backend != "pipeline" or config.placement is None:
            assert config.threads_per_worker <= 4, "threads are not searched on a GPU"
