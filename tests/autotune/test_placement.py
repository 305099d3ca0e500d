"""Where each process computes (seed 003's split of the GPUs, sharing, a GPU + CPU pipeline),
the space on a GPU host and the GPU memory planner. No GPU needed: the machines are the
fixtures' `detect --json`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import psutil
import pytest

from autotune import gpu_usage
from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.knobs import Target
from autotune.machine_file import load_machine
from autotune.measure import TreeSampler
from autotune.memory_plan import MemoryPlanner
from autotune.models import ModelShape
from autotune.placement import (
    Device,
    default_placement,
    format_placement,
    parse_placement,
    shared_gpus,
)
from autotune.space import SearchSpace
from autotune.topology import detect
from backends import backend_class

GPU_NODE = "gpu_node_8x_h100.json"
# A 1.07 B Llama (the lent machine's test model): 16 layers, 8 KV heads of 64.
SHAPE = ModelShape(
    file_bytes=2_140_000_000, parameters=1_070_000_000, layers=16, kv_heads=8, head_dim=64
)


@pytest.fixture
def node(machine):
    """The 8-GPU node; ``node(gpus=1, offload=True)`` changes it."""

    def make(gpus: int = 8, offload: bool = False):
        topology = load_machine(machine(GPU_NODE))
        return dataclasses.replace(topology, gpus=topology.gpus[:gpus], llama_gpu_offload=offload)

    return make


@pytest.fixture
def vm(machine):
    return detect(machine("vm_2vcpu"), probe_gpus=False)


def place(backend: str, topology, **fields) -> list[str]:
    config = TrialConfig(backend=backend, **fields)
    backend_class(backend).validate(config, topology)
    return backend_class(backend).devices(config, topology)


# ---------------------------------------------------------------- the placement string


def test_a_placement_reads_back_as_written():
    text = "cuda:0+1,cuda:2,cpu"
    devices = parse_placement(text)
    assert devices == (Device((0, 1)), Device((2,)), Device())
    assert format_placement(devices) == text
    assert [d.visible for d in devices] == ["0,1", "2", ""]
    assert [d.torch for d in devices] == ["cuda:0", "cuda:2", "cpu"]


@pytest.mark.parametrize(
    ("text", "word"), [("gpu0", "'gpu0' is not a device"), ("cuda:1+1", "names a GPU twice")]
)
def test_a_bad_placement_names_the_entry(text, word):
    with pytest.raises(ConfigError, match=word):
        TrialConfig(backend="hf", placement=text)


def test_seed_003_splits_the_gpus_evenly_and_shares_when_they_are_fewer():
    # Seed 003: 8 GPUs, 4 workers -> 2 each (0-1, 2-3, 4-5, 6-7).
    assert format_placement(default_placement(8, 4)) == "cuda:0+1,cuda:2+3,cuda:4+5,cuda:6+7"
    assert format_placement(default_placement(8, 3)) == "cuda:0+1,cuda:2+3,cuda:4+5"
    assert format_placement(default_placement(2, 3)) == "cuda:0,cuda:1,cuda:0"  # fallback
    assert format_placement(default_placement(8, 2, blocks=False)) == "cuda:0,cuda:1"
    assert format_placement(default_placement(0, 2)) == "cpu,cpu"
    assert shared_gpus(default_placement(2, 3)) and not shared_gpus(default_placement(8, 4))


# ---------------------------------------------------------------- each backend's devices


def test_each_backend_places_its_processes(node):
    eight, one = node(), node(gpus=1)
    assert place("hf", eight) == ["cuda:0"], "what model.to('cuda') gives"
    assert place("ddp", eight, workers=4) == ["cuda:0+1", "cuda:2+3", "cuda:4+5", "cuda:6+7"]
    assert place("ddp", one, workers=2) == ["cuda:0", "cuda:0"]
    assert place("pipeline", eight, stages=2) == ["cuda:0", "cuda:1"]
    assert place("pipeline", one, stages=2, placement="cuda:0,cpu") == ["cuda:0", "cpu"]
    assert place("llamacpp", eight, workers=2) == ["cpu", "cpu"], "no --gpu-layers: the CPU"
    offload = node(offload=True)
    assert place("llamacpp", offload, workers=2, gpu_layers=-1) == ["cuda:0+1+2+3", "cuda:4+5+6+7"]


@pytest.mark.parametrize(
    ("backend", "fields", "word"),
    [
        ("hf", {"placement": "cuda:8"}, "GPU 8 does not exist"),
        ("ddp", {"workers": 2, "placement": "cuda:0"}, "1 devices for 2 processes"),
        ("pipeline", {"stages": 2, "placement": "cuda:0+1,cpu"}, "one device"),
        ("pipeline", {"stages": 2, "placement": "cuda:0,cpu", "partition": "compute"}, "compute"),
        ("llamacpp", {"gpu_layers": -1}, "CPU build"),
        ("llamacpp", {"placement": "cuda:0"}, "--gpu-layers is 0"),
    ],
)
def test_a_placement_the_machine_cannot_give_is_refused_with_the_reason(
    node, backend, fields, word
):
    with pytest.raises(ConfigError, match=word):
        backend_class(backend).validate(TrialConfig(backend=backend, **fields), node())


def test_a_cpu_host_has_no_gpu_to_place_on(vm):
    with pytest.raises(ConfigError, match="no GPU"):
        backend_class("hf").validate(TrialConfig(backend="hf", placement="cuda:0"), vm)
    with pytest.raises(ConfigError, match="no GPU to offload to"):
        backend_class("llamacpp").validate(TrialConfig(gpu_layers=4), vm)
    assert place("ddp", vm, workers=2) == ["cpu", "cpu"]


def test_placement_travels_in_the_env_contract():
    config = TrialConfig(backend="pipeline", stages=2, placement="cuda:0,cpu")
    assert config.to_env()["AUTOTUNE_PLACEMENT"] == "cuda:0,cpu"
    assert TrialConfig.from_env(config.to_env()) == config
    llama = TrialConfig(gpu_layers=-1)
    assert TrialConfig.from_env(llama.to_env()) == llama


# ---------------------------------------------------------------- the space on a GPU host


def knobs_of(space: SearchSpace, backend: str) -> dict:
    return {k.name: k for k in space.spaces[backend].knobs}


def test_the_gpu_space_fixes_threads_and_widens_batch_and_dtype(node):
    topology = node(gpus=1, offload=True)
    target = Target(topology, SHAPE.layers)
    space = SearchSpace(target, ["llamacpp", "hf", "ddp", "pipeline"], TrialConfig())
    hf = knobs_of(space, "hf")
    assert hf["threads_per_worker"].allowed({}) == (4,), "min(4, CPUs / processes)"
    assert hf["batch_size"].values[-1] == 512
    assert hf["dtype"].values == ("float32", "bfloat16", "float16")
    ddp = knobs_of(space, "ddp")
    assert ddp["workers"].values == (2, 3, 4) and "share GPUs" in ddp["workers"].note
    pipeline = knobs_of(space, "pipeline")
    assert pipeline["cpu_stages"].allowed({"stages": 2}) == (0, 1)
    assert pipeline["threads_per_worker"].allowed({"stages": 2, "cpu_stages": 1})[-1] == 112
    llamacpp = knobs_of(space, "llamacpp")
    assert llamacpp["gpu_layers"].values == (0, 4, 8, 12, -1)
    assert llamacpp["gpu_layers"].allowed({"workers": 5}) == (0,), "4 offloading workers a GPU"
    assert space.baseline().config.backend == "hf", "transformers on the GPU, batch 1"
    names = [fixed.name for fixed in space.recipes()]
    assert any(n.startswith("seed 004") and "cuda:0,cpu" in n for n in names)
    assert any(n.startswith("seed 003") for n in names)


def test_a_pipeline_stage_on_the_cpu_is_a_point_of_the_space(node):
    topology = node(gpus=1)
    space = SearchSpace(Target(topology, SHAPE.layers), ["pipeline"], TrialConfig())
    chosen = {"stages": 3, "cpu_stages": 1, "threads_per_worker": 8, "batch_size": 4}
    chosen |= {"dtype": "bfloat16", "partition": "uniform"}
    config = space.build("pipeline", chosen)
    assert config.placement == "cuda:0,cuda:0,cpu"
    params = space.params(config)
    assert params["pipeline.cpu_stages"] == 1
    assert space.step(config, "batch_size", 1).placement == "cuda:0,cuda:0,cpu"


def test_the_eight_gpu_node_seeds_its_recipes(node):
    space = SearchSpace(Target(node(), SHAPE.layers), ["ddp", "pipeline"], TrialConfig())
    recipes = {fixed.name: fixed.config for fixed in space.recipes()}
    ddp = recipes["seed 002: torchrun, 8 ranks, one GPU each, batch 16"]
    assert backend_class("ddp").devices(ddp, node()) == [f"cuda:{i}" for i in range(8)]
    pipeline = next(c for n, c in recipes.items() if n.startswith("seed 004"))
    assert backend_class("pipeline").devices(pipeline, node()) == ["cuda:0", "cuda:1"]


# ---------------------------------------------------------------- GPU memory


def test_the_planner_refuses_what_a_gpu_cannot_hold(node):
    topology = node(gpus=1)
    planner = MemoryPlanner(SHAPE, 2**40, topology)
    small = TrialConfig(backend="hf", batch_size=64, dtype="bfloat16")
    assert planner.refusal(small) is None
    predicted = planner.predict_gpus(small)[0]
    assert 2.1e9 < predicted < 20e9  # 2.1 GB of weights, a CUDA context, 4 GiB of cache
    shared = TrialConfig(backend="ddp", workers=4, batch_size=512, ctx_per_sequence=4096)
    assert "on GPU 0 is over its" in planner.refusal(shared)
    # A trial that held twice what was predicted makes the next prediction twice as large.
    planner.observe_gpus(small, {"0": 2 * predicted})
    assert planner.predict_gpus(small)[0] == pytest.approx(2 * predicted, rel=0.01)


def test_gpu_memory_comes_from_nvidia_smi_per_process(monkeypatch):
    answers = {
        "--query-gpu=index,uuid,utilization.gpu": "0, GPU-a, 80\n1, GPU-b, 0\n",
        "--query-compute-apps=pid,gpu_uuid,used_memory": "100, GPU-a, 1000\n"
        "101, GPU-a, 500\n999, GPU-b, 7000\n",
    }

    def fake_run(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 0, stdout=answers[argv[1]], stderr="")

    monkeypatch.setattr(gpu_usage.subprocess, "run", fake_run)
    reading = gpu_usage.sample({100, 101})
    assert reading.memory == {0: 1500 * 2**20}, "process 999 is not ours"
    assert reading.utilisation == {0: 80.0}

    monkeypatch.setattr(gpu_usage, "available", lambda: True)
    monkeypatch.setattr("autotune.measure._tree", lambda: [_Pid(100), _Pid(101)])
    sampler = TreeSampler(gpus=True)
    sampler.sample()
    assert sampler.peak_gpu_bytes == {0: 1500 * 2**20} and sampler.gpu_utilisation == 0.8


class _Pid:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def memory_info(self):  # no /proc entry for a made-up pid: no host memory to read
        raise psutil.Error


def test_plan_shows_the_gpu_memory_of_each_example(cli, node, tmp_path):
    path = tmp_path / "one_gpu.json"
    path.write_text(json.dumps(node(gpus=1).to_dict()))
    result = cli("plan", "--machine", str(path), "--json", "--examples", "20")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["baseline"]["backend"] == "hf"
    for example in data["examples"]:
        if any(device.startswith("cuda") for device in example["devices"]):
            assert example["predicted_gpu_memory_bytes"]["0"] > 0


FAKE_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=*) printf '%s\\n' '0, GPU-aaaa, 10' '1, GPU-bbbb, 20' '2, GPU-cccc, 30' \\
    '3, GPU-dddd, 40' ;;
  --query-compute-apps=*) printf '%s\\n' '4242, GPU-cccc, 1000' '4242, GPU-dddd, 2000' \\
    '7, GPU-aaaa, 5' ;;
esac
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An nvidia-smi on PATH that reports 4 GPUs; process 4242 holds memory on GPUs 2 and 3."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(FAKE_SMI)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")


@pytest.mark.parametrize("visible", ["2,3", "GPU-cccc,GPU-dddd", "GPU-cc,3"])
def test_gpu_numbers_follow_cuda_visible_devices(fake_nvidia_smi, monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    # torch sees 2 GPUs, numbered 0 and 1: a worker placed on torch's GPU 0 must be given the
    # machine's GPU 2, named as the parent's list names it, not physical GPU 0.
    assert Device((0,)).visible == visible.split(",")[0]
    assert Device((0, 1)).visible == visible
    reading = gpu_usage.sample({4242})
    assert reading.memory == {0: 1000 * 2**20, 1: 2000 * 2**20}, "keyed by torch's numbers"
    assert reading.utilisation == {0: 30.0, 1: 40.0}


def test_without_cuda_visible_devices_numbers_are_the_machines(fake_nvidia_smi, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert Device((2, 3)).visible == "2,3"
    assert gpu_usage.sample({4242}).memory == {2: 1000 * 2**20, 3: 2000 * 2**20}


def test_a_gpu_beyond_cuda_visible_devices_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ConfigError, match="shows 2 GPUs"):
        _ = Device((2,)).visible
