"""`autotune plan`: the space a sweep would search on a machine, from its `detect --json`, and
every example drawn by the sweep's sampler runnable there."""

from __future__ import annotations

import json

import pytest

from autotune.config import TrialConfig
from autotune.machine_file import load_machine, topology_from_dict
from autotune.topology import detect
from backends import backend_class

GPU_NODE = "gpu_node_8x_h100.json"
TREES = ["epyc_16c32t", "desktop_8c16t", "vm_2vcpu", "dual_socket_numa", "container_64cpu_2cpu_4g"]


@pytest.fixture
def machine_json(machine, tmp_path):
    """Path of a fixture machine's `detect --json` (written from its sysfs tree)."""

    def write(name: str):
        if name.endswith(".json"):
            return machine(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(detect(machine(name), probe_gpus=False).to_dict()))
        return path

    return write


def plan(cli, path, *extra):
    result = cli("plan", "--machine", str(path), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", [*TREES, GPU_NODE])
def test_every_example_is_runnable_on_the_machine(cli, machine_json, name):
    path = machine_json(name)
    topology = load_machine(path)
    data = plan(cli, path)
    assert len(data["examples"]) == 50
    assert data["machine"]["usable_cpus"] == topology.usable_cpus
    for example in data["examples"]:
        devices = example.pop("devices")
        predicted = example.pop("predicted_memory_bytes")
        on_gpus = example.pop("predicted_gpu_memory_bytes")
        config = TrialConfig.from_dict(example)
        cls = backend_class(config.backend)
        cls.validate(config, topology)  # fields, pinning CPUs, GPUs per rank
        assert config.total_threads <= topology.usable_cpus
        assert predicted <= data["memory_limit_bytes"]
        for gpu, used in on_gpus.items():
            assert used <= 0.9 * topology.gpus[int(gpu)].memory_bytes
        assert len(devices) == config.processes
        assert data["backends"][config.backend].get("excluded") is None


def test_the_smt_server_plan_spans_its_threads_and_siblings(cli, machine_json):
    data = plan(cli, machine_json("epyc_16c32t"))
    llamacpp = {k["name"]: k for k in data["backends"]["llamacpp"]["knobs"]}
    assert llamacpp["workers"]["values"] == list(range(1, 33)), "32 usable CPUs with SMT"
    assert llamacpp["pinning"]["values"] == ["none", "compact", "spread"]
    assert "32 usable CPUs" in llamacpp["threads_per_worker"]["note"]
    assert data["size"] == sum(b["size"] for b in data["backends"].values()) > 10_000
    assert data["baseline"]["threads_per_worker"] == 16, "llama-cpp-python: half the CPUs"
    # The embedded model is Q4_1: its own type is offered once, as the file itself (None).
    quant = llamacpp["quant"]
    assert quant["values"] == [None, "f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"]
    assert quant["screen"] and quant["note"].startswith("None: the file's own type, q4_1")
    assert quant["weights"] and "requantize a q4_1 file" in quant["note"]
    assert not llamacpp["batch_size"]["weights"], "batching does not change the weights"


def test_the_gpu_node_plan_keeps_ranks_and_stages_within_its_gpus(cli, machine_json):
    data = plan(cli, machine_json(GPU_NODE))
    knobs = {
        name: {k["name"]: k["values"] for k in backend["knobs"]}
        for name, backend in data["backends"].items()
    }
    # Up to 4 ranks a GPU (above 8 they share, round robin); 8 stages at most.
    assert max(knobs["ddp"]["workers"]) == 32 and max(knobs["pipeline"]["stages"]) == 8
    assert "bfloat16" in knobs["hf"]["dtype"], "bf16 is native on the GPU"
    assert "gpu_layers" not in knobs["llamacpp"], "the fixture's llama.cpp is a CPU build"
    ranked = [e for e in data["examples"] if e["backend"] in ("ddp", "pipeline")]
    assert ranked, "the sampler draws ddp and pipeline layouts there"
    for example in ranked:
        gpus = [d for d in example["devices"] if d != "cpu"]
        assert all(0 <= int(g) < 8 for d in gpus for g in d[5:].split("+"))
        if example["backend"] == "ddp" and example["workers"] <= 8:
            assert len(set(gpus)) == len(gpus), "no GPU shared while there are enough"


def test_a_one_gpu_host_shares_its_gpu_between_ranks(cli, machine_json, tmp_path):
    data = json.loads(machine_json(GPU_NODE).read_text())
    data["gpus"] = data["gpus"][:1]
    path = tmp_path / "one_gpu.json"
    path.write_text(json.dumps(data))
    plan_data = plan(cli, path)
    ddp = {k["name"]: k for k in plan_data["backends"]["ddp"]["knobs"]}
    assert ddp["workers"]["values"] == [2, 3, 4] and "share GPUs" in ddp["workers"]["note"]
    for example in plan_data["examples"]:
        if example["backend"] == "ddp":
            assert example["devices"] == ["cuda:0"] * example["workers"]


def test_plan_without_json_prints_the_tables(cli, machine_json):
    result = cli("plan", "--machine", str(machine_json("vm_2vcpu")), "--examples", "5")
    assert result.returncode == 0, result.stderr
    assert "llamacpp" in result.stdout and "Space:" in result.stdout


@pytest.mark.parametrize(
    ("text", "word"), [(None, "cannot read"), ("{", "not JSON"), ('{"a": 1}', "detect --json")]
)
def test_a_bad_machine_file_is_one_line_and_exit_2(cli, tmp_path, text, word):
    path = tmp_path / "m.json"
    if text is not None:
        path.write_text(text)
    result = cli("plan", "--machine", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and word in result.stderr and str(path) in result.stderr


def test_detect_json_round_trips(machine):
    topology = detect(machine("dual_socket_numa"), probe_gpus=False)
    assert topology_from_dict(json.loads(json.dumps(topology.to_dict()))) == topology


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (lambda data: [data], "expected a JSON object, got a list"),
        (lambda data: {**data, "usable_cpus": "8"}, "usable_cpus must be int, got '8'"),
        (lambda data: {**data, "cpu_quota": "2"}, "cpu_quota must be float or None"),
    ],
)
def test_a_machine_file_of_the_wrong_types_is_one_line_and_exit_2(
    cli, tmp_path, machine_json, change, word
):
    data = json.loads(machine_json("vm_2vcpu").read_text())
    path = tmp_path / "m.json"
    path.write_text(json.dumps(change(data)))
    result = cli("plan", "--machine", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and word in result.stderr, result.stderr
