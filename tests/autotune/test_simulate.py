"""Simulated machines (autotune.simulate): the speed model's shape, and `sweep --machine` on it:
a big machine's sweep in seconds, warm starts, refused suggestions that do not end a search."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path

import pytest

from autotune.config import TrialConfig
from autotune.machine_file import load_machine
from autotune.models import ModelShape
from autotune.simulate import MachineModel
from autotune.space import config_key
from autotune.study import TrialRecord
from autotune.sweep.steps import _BEAM
from autotune.sweep.surrogate import pooled

MACHINES = Path(__file__).resolve().parents[1] / "fixtures" / "machines"
EPYC = MACHINES / "epyc_16c32t"  # 16 cores, 32 threads
VM = MACHINES / "vm_2vcpu"
GPU_NODE = MACHINES / "gpu_node_8x_h100.json"
SMALL = ModelShape(
    file_bytes=98_000_000, parameters=134_500_000, layers=30, kv_heads=3, head_dim=64
)
# The lent H100's random-weight 1.07 B Llama (bf16), as issue 12 measured it.
ONE_B = ModelShape(
    file_bytes=2_140_000_000, parameters=1_070_000_000, layers=16, kv_heads=8, head_dim=64
)


def model(path=EPYC, shape=SMALL, **data) -> MachineModel:
    return MachineModel.of(load_machine(path), shape, data)


def rate(machine, **fields) -> float:
    return machine.tokens_per_s(TrialConfig(**fields))


def test_an_smt_sibling_adds_a_fraction_of_a_core():
    machine = model()
    cores = rate(machine, workers=16, threads_per_worker=1, pinning="spread")
    siblings = rate(machine, workers=32, threads_per_worker=1, pinning="spread")
    assert 1.1 <= siblings / cores <= 1.3
    # Past the CPUs, threads wait for each other: slower than filling them.
    assert rate(machine, workers=32, threads_per_worker=2, pinning="spread") < siblings


def test_processes_share_the_memory_bandwidth_and_batching_flattens():
    slow_memory = model(memory_bandwidth_gb_s=4.0)  # the machine file's measured figure
    assert slow_memory.bandwidth_gb_s == 4.0
    one = rate(slow_memory, workers=4, threads_per_worker=1)
    two = rate(slow_memory, workers=8, threads_per_worker=1)
    assert two / one < 1.2, "decode saturates the shared bandwidth"
    fast_memory = model()
    assert (
        rate(fast_memory, workers=8, threads_per_worker=1)
        / rate(fast_memory, workers=4, threads_per_worker=1)
        > 1.7
    ), "with bandwidth to spare, processes scale"
    # Batching reads the weights once for the batch: it pays while memory-bound, then flattens.
    by_batch = [
        rate(slow_memory, workers=8, threads_per_worker=1, batch_size=b) for b in (1, 2, 32, 64)
    ]
    assert by_batch[1] / by_batch[0] > 1.5
    assert by_batch[3] / by_batch[2] < 1.1


def test_threads_scale_worse_than_processes_and_compact_pinning_uses_fewer_cores():
    machine = model()
    assert rate(machine, workers=8, threads_per_worker=1) > rate(
        machine, workers=1, threads_per_worker=8
    )
    spread = rate(machine, workers=4, threads_per_worker=2, pinning="spread")
    compact = rate(machine, workers=4, threads_per_worker=2, pinning="compact")
    assert compact < spread


def test_a_gpu_layout_is_launch_bound_at_small_batches_as_measured_on_the_h100():
    machine = model(GPU_NODE, ONE_B)
    figure = rate(machine, backend="hf", batch_size=48, dtype="bfloat16")
    assert 1500 <= figure <= 4000, "measured 2 080-2 840 tokens/s there (issue 12)"
    assert rate(machine, backend="hf", batch_size=96, dtype="bfloat16") > 1.6 * figure
    one = rate(
        machine, backend="ddp", workers=1, batch_size=16, dtype="bfloat16", placement="cuda:0"
    )
    shared = rate(
        machine,
        backend="ddp",
        workers=2,
        batch_size=16,
        dtype="bfloat16",
        placement="cuda:0,cuda:0",
    )
    own = rate(
        machine,
        backend="ddp",
        workers=2,
        batch_size=16,
        dtype="bfloat16",
        placement="cuda:0,cuda:1",
    )
    assert one < shared < own <= 2 * one * 1.001


def test_measurements_are_noisy_like_a_real_machine_and_repeatable_by_seed():
    machine = model()
    config = TrialConfig(workers=8, threads_per_worker=2)
    draws = [machine.measured(config, random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(1)
    logs = [
        math.log(machine.measured(config, rng) / machine.tokens_per_s(config)) for _ in range(2000)
    ]
    assert 0.03 < statistics.pstdev(logs) < 0.12
    assert min(logs) < math.log(0.8), "now and then a pass is clearly slow"


def test_a_simulated_trial_draws_each_pass_and_stops_early_as_a_real_one_does():
    """Each pass is its own noisy draw with its wall time (what a pair is priced from); with a
    leader's bar far above it, the trial stops after its first pass (`measure.clearly_below`)."""
    from autotune.measure import Pacing
    from autotune.simulate import FakeClock, SimulatedTrials

    machine = model()
    config = TrialConfig(workers=8, threads_per_worker=2)
    spec = {"config": config.to_dict(), "pacing": Pacing(repeats=3, windows=1).to_dict()}
    runner = SimulatedTrials(FakeClock(), machine.topology, machine, seed=3)
    full = runner(spec, 1e6).result
    assert len(full["samples"]) == 3 and full["stopped"] is None
    figures = [s["tokens_per_s"] for s in full["samples"]]
    assert len(set(figures)) == 3 and all(s["wall_s"] > 0 for s in full["samples"])
    assert full["tokens_per_s"] == pytest.approx(statistics.fmean(figures[-2:]))
    stopped = runner({**spec, "stop_below": 10 * max(figures)}, 1e6).result
    assert len(stopped["samples"]) == 1 and "leader's lower bound" in stopped["stopped"]


def test_sweep_machine_runs_a_big_machines_30_minute_sweep_in_seconds(cli, tmp_path):
    started = time.monotonic()
    result = cli(
        "sweep",
        "--machine",
        str(EPYC),
        "--backends",
        "llamacpp",
        "--budget",
        "30m",
        "--seed",
        "1",
        "--reports",
        str(tmp_path),
        "--study",
        "big",
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 120
    summary = json.loads((tmp_path / "big" / "summary.json").read_text())
    assert summary["note"].startswith(f"SIMULATED on {EPYC}")
    assert summary["machine"]["usable_cpus"] == 32
    assert 1500 <= summary["elapsed_s"] <= 1800 * 1.05, "the simulated clock ran the budget"
    assert summary["counts"]["complete"] >= 10
    winner = TrialConfig.from_dict(summary["winner"]["config"])
    assert winner.total_threads > 2, "a layout of the 32-thread machine, not of this one"
    machine = json.loads((tmp_path / "big" / "machine.json").read_text())
    assert machine["simulated"] == str(EPYC) and machine["topology"]["physical_cores"] == 16


def test_a_directory_that_is_no_machine_is_refused_in_one_line(cli, tmp_path):
    result = cli("sweep", "--machine", str(tmp_path), "--budget", "1m", "--reports", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"autotune sweep: error: --machine {tmp_path}: a directory without proc/ and sys/ in it"
    )


def _sweep(cli, reports, study, *extra, machine=EPYC):
    return cli(
        "sweep",
        "--machine",
        str(machine),
        "--backends",
        "llamacpp",
        "--budget",
        "10m",
        "--reports",
        str(reports),
        "--study",
        study,
        *extra,
    )


def test_a_warm_start_measures_the_previous_studys_best_layouts_first(cli, tmp_path):
    assert _sweep(cli, tmp_path, "first", "--seed", "1").returncode == 0
    first = [json.loads(line) for line in (tmp_path / "first" / "trials.jsonl").open()]
    measured = [
        r
        for r in first
        if r["state"] == "complete" and r.get("role", "search") in ("search", "recipe")
    ]
    best = sorted(measured, key=lambda r: r["value"], reverse=True)[:3]
    assert _sweep(cli, tmp_path, "second", "--seed", "2", "--warm-start", "first").returncode == 0
    second = [json.loads(line) for line in (tmp_path / "second" / "trials.jsonl").open()]
    warm = [r for r in second if r.get("role") == "warm"]
    assert all(r["name"].startswith("warm start: first trial") for r in warm)
    assert [r["number"] for r in warm] == [1, 2, 3], "right after the baseline"

    def layout(record):
        keys = ("workers", "threads_per_worker", "batch_size", "quant", "pinning")
        return {k: record["config"][k] for k in keys}

    assert [layout(r) for r in warm] == [layout(r) for r in best]
    # Another machine's study, or a study that is not there: one line, exit 2, nothing written.
    other = _sweep(cli, tmp_path, "third", "--warm-start", "first", machine=MACHINES / "vm_2vcpu")
    assert other.returncode == 2
    assert "--warm-start first: measured on machine" in other.stderr.strip().splitlines()[-1]
    missing = _sweep(cli, tmp_path, "fourth", "--warm-start", "nope")
    assert missing.returncode == 2 and "--warm-start nope: no such study" in missing.stderr
    assert not (tmp_path / "third").exists() and not (tmp_path / "fourth").exists()


def test_the_weights_are_screened_on_the_fastest_layout_before_it_climbs(cli, tmp_path):
    assert _sweep(cli, tmp_path, "vm", "--seed", "1", machine=MACHINES / "vm_2vcpu").returncode == 0
    records = [json.loads(line) for line in (tmp_path / "vm" / "trials.jsonl").open()]
    first = next(i for i, r in enumerate(records) if r.get("role", "search") == "search")
    fixed, screens = records[:first], records[first : first + 5]
    fastest = max(fixed[1:], key=lambda r: r["value"])  # the recipes (the baseline is 1x1)
    assert all(
        r["name"].startswith(f"screen: trial {fastest['number']}'s layout with quant")
        for r in screens
    ), [r["name"] for r in screens]

    def layout(record):
        return {k: v for k, v in record["config"].items() if k != "quant"}

    assert all(layout(r) == layout(fastest) for r in screens)
    # Every type but the file's own (q4_1, the layout's None), which is measured already.
    assert fastest["config"]["quant"] is None
    assert {r["config"]["quant"] for r in screens} == {"f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"}
    # The climb starts from the fastest weights, after every screen.
    climbs = [i for i, r in enumerate(records) if (r.get("name") or "").startswith("climb:")]
    assert climbs and climbs[0] == first + len(screens)
    best = max(fixed[1:] + screens, key=lambda r: r["value"])
    assert records[climbs[0]]["name"].startswith(f"climb: trial {best['number']}'s layout")


def test_the_close_weights_are_screened_again_once_the_batch_climbed(cli, tmp_path):
    # On this machine q4_0 is the fastest weights at batch 1 and q8_0 from batch 2 on (a
    # batch shares one dequantisation): a screen at batch 1 alone picks the wrong ones.
    assert _sweep(cli, tmp_path, "r", "--seed", "0", "--budget", "5m").returncode == 0
    records = [json.loads(line) for line in (tmp_path / "r" / "trials.jsonl").open()]
    by_number = {r["number"]: r for r in records}
    at = [i for i, r in enumerate(records) if (r.get("name") or "").startswith("rescreen: ")]
    assert at, [r.get("name") for r in records]
    origin = by_number[int(records[at[0]]["name"].split()[2].removesuffix("'s"))]
    assert origin["config"]["batch_size"] > 1, "from a climbed layout"
    assert (origin.get("name") or "").startswith("climb: ")
    screens = [r for r in records if (r.get("name") or "").startswith("screen: ")]
    screened = {r["config"]["quant"]: r["value"] for r in screens if r.get("value")}
    best = max(screened.values())
    for i in at:
        record = records[i]
        config = {**record["config"], "quant": origin["config"]["quant"]}
        assert config == origin["config"], "the climbed layout with other weights"
        value = record["config"]["quant"]
        assert value != origin["config"]["quant"]
        # Only the weights that came close at the screen (the file's own, None, is the
        # screen's origin and may come back too).
        assert value is None or screened[value] >= 0.6 * best, (value, screened)


def test_the_weights_are_screened_again_at_the_narrowest_batch_the_climb_measured(cli, tmp_path):
    # Seed 6 on the 2-vCPU VM: the climb of 2x1 q8_0 went from batch 1 to 4 and on to 16,
    # which led; the rescreen measured the other weights at batch 16 (four trials of 96
    # requests each in a 5-minute sweep), where batch 4 tells the weights' order as well.
    assert _sweep(cli, tmp_path, "w", "--seed", "6", "--budget", "5m", machine=VM).returncode == 0
    records = [json.loads(line) for line in (tmp_path / "w" / "trials.jsonl").open()]
    by_number = {r["number"]: r for r in records}
    at = next(i for i, r in enumerate(records) if (r.get("name") or "").startswith("rescreen: "))
    origin = by_number[int(records[at]["name"].split()[2].removesuffix("'s"))]

    def rest(config):  # the layout but its batch and weights
        return {**config, "batch_size": None, "quant": None}

    climbed = sorted(
        r["config"]["batch_size"]
        for r in records[:at]
        if r["state"] == "complete" and rest(r["config"]) == rest(origin["config"])
        and r["config"]["quant"] == origin["config"]["quant"]
    )  # fmt: skip
    assert climbed[0] == 1 and len(climbed) >= 3, climbed  # it climbed past its first step
    assert origin["config"]["batch_size"] == climbed[1], (origin["config"], climbed)


def test_the_fastest_layout_climbs_even_after_two_others_did(cli, tmp_path):
    # Seed 1: the file's own weights and q4_0 climb from batch 1; the rescreen at batch 4 then
    # finds q8_0 fastest, and it climbs too (it did not: 96% of the optimum at batch 4, where
    # its batch 16 is 99%).
    assert _sweep(cli, tmp_path, "c", "--seed", "1").returncode == 0
    records = [json.loads(line) for line in (tmp_path / "c" / "trials.jsonl").open()]
    by_number = {r["number"]: r for r in records}
    climbs = [r for r in records if (r.get("name") or "").startswith("climb: ")]
    origins = [by_number[int(r["name"].split()[2].removesuffix("'s"))] for r in climbs]
    started = [o for o in origins if o["config"]["batch_size"] == 1]
    assert len({o["config"]["quant"] for o in started}) == 2, "two lineages from batch 1"
    rescreened = [o for o in origins if (o.get("name") or "").startswith("rescreen: ")]
    assert rescreened, [r["name"] for r in climbs]


def test_the_fastest_layouts_neighbours_are_measured_after_the_climbs(cli, tmp_path):
    # Seed 0: once the leader's neighbours were measured, none faster, the sampler drew; now
    # the neighbours of the layouts within `_BEAM` of the leader come first (one at 95% of
    # the leader, one window's noise away, here).
    assert _sweep(cli, tmp_path, "n", "--seed", "0").returncode == 0
    records = [json.loads(line) for line in (tmp_path / "n" / "trials.jsonl").open()]
    by_number = {r["number"]: r for r in records}
    at = [i for i, r in enumerate(records) if (r.get("name") or "").startswith("neighbour: ")]
    assert at, [r.get("name") for r in records]
    climbs = [i for i, r in enumerate(records) if (r.get("name") or "").startswith("climb: ")]
    assert climbs and climbs[0] < at[0], "the climbs come first"
    layout = ("workers", "threads_per_worker", "batch_size", "quant", "pinning")

    def origin_of(record):  # "neighbour: trial 12's layout with pinning spread"
        return by_number[int(record["name"].split()[2].removesuffix("'s"))]

    for i in at:
        record, origin = records[i], origin_of(records[i])
        config, was = record["config"], origin["config"]
        changed = {k for k in layout if config[k] != was[k]}
        if " split " in record["name"]:  # "neighbour: trial 12's split 16x1 batch 8"
            # The same cores split another way, as many requests at once (the batch stays at
            # 1 or the list's widest: the width moves).
            cores = config["workers"] * config["threads_per_worker"]
            assert cores == was["workers"] * was["threads_per_worker"], record["name"]
            assert config["workers"] in (2 * was["workers"], was["workers"] / 2), record["name"]
            assert changed <= {"workers", "threads_per_worker", "batch_size", "pinning"}
            continue
        knob, value = record["name"].split()[-2:]
        assert knob in changed and str(config[knob]) == value, record["name"]
        # One knob, and a later one only where the move left it no room (workers x threads).
        assert changed <= {knob, "threads_per_worker", "pinning"}, (changed, record["name"])
        assert config["batch_size"] == was["batch_size"]
        # The origin was the fastest layout measured when its first neighbour was queued, or
        # (the leader's neighbours measured) within `_BEAM` of it, by the pooled estimates the
        # search ranks by (not its own single pass).
        first = next(j for j in at if origin_of(records[j]) is origin)
        earlier = [
            TrialRecord.from_dict(r)
            for r in records[:first]
            if r.get("value") and r.get("role") != "reference"
        ]
        estimates = pooled(earlier)
        own = estimates[config_key(origin["config"])]
        assert own >= _BEAM * max(estimates.values()), record["name"]
    # Not the leader's alone.
    near = [origin_of(records[i]) for i in at]
    assert len({o["number"] for o in near}) >= 2, [r["name"] for r in records if r.get("name")]
    # The first neighbours are the leader's.
    first = origin_of(records[at[0]])
    earlier = [
        TrialRecord.from_dict(r)
        for r in records[: at[0]]
        if r.get("value") and r.get("role") != "reference"
    ]
    estimates = pooled(earlier)
    assert max(estimates, key=estimates.get) == config_key(first["config"])


def test_no_search_trial_is_expected_to_take_more_than_a_fifth_of_the_search(cli, tmp_path):
    # On the 2-vCPU machine model a batch-64 step costs minutes; a 10-minute sweep must not
    # spend a third of its search on one (it did on this machine).
    assert _sweep(cli, tmp_path, "vm", "--seed", "1", machine=MACHINES / "vm_2vcpu").returncode == 0
    records = [json.loads(line) for line in (tmp_path / "vm" / "trials.jsonl").open()]
    search = [r for r in records if r.get("role", "search") == "search" and r.get("duration_s")]
    assert search
    cap = 0.2 * 600 * 0.75
    assert max(r["duration_s"] for r in search) < 1.5 * cap


@pytest.mark.slow  # 20-30 s each
@pytest.mark.parametrize("seed", [0, 1])
def test_refused_suggestions_on_an_8_gpu_node_do_not_end_the_search_early(cli, tmp_path, seed):
    # The GPU memory planner refuses wide layouts; the sampler, told nothing by a refusal,
    # asked for them again and again until the sweep gave up an eighth into its budget.
    result = cli(
        "sweep",
        "--machine",
        str(GPU_NODE),
        "--backends",
        "hf,ddp,pipeline",
        "--budget",
        "10m",
        "--seed",
        str(seed),
        "--reports",
        str(tmp_path),
        "--study",
        "gpu",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["elapsed_s"] >= 0.9 * 600
    records = [json.loads(line) for line in (tmp_path / "gpu" / "trials.jsonl").open()]
    refused = [
        r
        for r in records
        if r["state"] == "pruned" and "compute times the layers" in (r.get("reason") or "")
    ]
    assert not refused, "the pipeline space offers no partition its validation refuses"
    # No weights screen on a GPU host (every dtype is alike at the recipes' batches there),
    # and no backend dropped before its climb.
    assert not [r for r in records if (r.get("name") or "").startswith("screen:")]
    assert not [why for why in summary["dropped"].values() if "or less, under" in why]


def _vm_sweep(tmp_path, *, stop_at=None, on_event=None, **changes):
    """A `Sweep` of the 2-vCPU VM simulated (seed 1, 10 minutes, llama.cpp and hf unless
    ``changes`` say otherwise); with ``stop_at`` the sweep process dies (as by SIGKILL:
    nothing of it runs on) when its trial number ``stop_at`` runs."""
    from autotune.models import ModelSpec, model_shape
    from autotune.sweep import Sweep, SweepOptions

    model = ModelSpec.resolve()
    shape = model_shape(model)
    machine = MachineModel.load(str(MACHINES / "vm_2vcpu"), shape)
    simulation = machine.simulation(1)
    runner, calls = simulation["runner"], []

    def dies(spec, deadline_s):
        calls.append(spec)
        if stop_at is not None and len(calls) > stop_at:
            raise SystemExit("killed")
        return runner(spec, deadline_s)

    settings = {
        "study": "vm",
        "reports_dir": tmp_path,
        "budget_s": 600.0,
        "backends": ["llamacpp", "hf"],
        "seed": 1,
        "simulated": str(MACHINES / "vm_2vcpu"),
        **changes,
    }
    return Sweep(
        SweepOptions(**settings),
        topology=machine.topology,
        model=model,
        shape=shape,
        clock=simulation["clock"],
        runner=dies,
        on_event=on_event,
    )


def _sweep_with_verdict(tmp_path, works: bool):
    """A simulated 10-minute llama.cpp sweep of the 2-vCPU VM given the probe's verdict."""
    from backends.llamacpp.probe import ExtraBuffersVerdict

    verdict = ExtraBuffersVerdict(works, "the test's verdict", "key")
    _vm_sweep(tmp_path, backends=["llamacpp"], extra_buffers=verdict).run()
    directory = tmp_path / "vm"
    records = [json.loads(line) for line in (directory / "trials.jsonl").open()]
    machine_json = json.loads((directory / "machine.json").read_text())
    return records, (directory / "best.env").read_text(), machine_json


def test_where_the_extra_buffers_trap_every_layout_runs_without_them(tmp_path):
    records, best_env, machine_json = _sweep_with_verdict(tmp_path, works=False)
    configs = [r["config"] for r in records if r.get("config")]
    assert configs and all(c["extra_buffers"] is False for c in configs)
    assert "LLAMA_EXTRA_BUFFERS=0" in best_env.splitlines()
    assert "# llama.cpp extra buffers (AMX/repack): trap here (the test's verdict), off" in best_env
    assert machine_json["llama_extra_buffers"]["works"] is False, "recorded in the study"


def test_where_both_run_the_extra_buffers_are_screened(tmp_path):
    records, best_env, _ = _sweep_with_verdict(tmp_path, works=True)
    assert records[0]["config"]["extra_buffers"] is True, "the baseline: llama.cpp's default"
    screens = [r for r in records if (r.get("name") or "").startswith("screen: ")]
    assert any(r["name"].endswith("with extra_buffers False") for r in screens), [
        r["name"] for r in screens
    ]
    assert any(line.startswith("LLAMA_EXTRA_BUFFERS=") for line in best_env.splitlines())


def test_the_search_ends_only_when_no_unmeasured_layout_fits(tmp_path):
    """Long trials (256 new tokens on the 2-vCPU VM): the sampler keeps asking for layouts too
    long for a trial's share of the budget; the search explores the ones that fit instead of
    ending (it ended at 321 s of 1800 with 66 layouts of 44-52 s unmeasured)."""
    from autotune.space import config_key
    from autotune.sweep import SearchEnded

    left_when_ended = []

    def on_event(event):
        if isinstance(event, SearchEnded):
            room = sweep.budget.room_s()
            left_when_ended.extend(
                config
                for config in sweep.space.layouts()
                if config_key(config) not in sweep.ledger.seen
                and sweep.budget.cost_s(config) <= room
            )

    sweep = _vm_sweep(
        tmp_path, on_event=on_event, budget_s=1800.0, base=TrialConfig(max_new_tokens=256)
    )
    summary = sweep.run()
    assert summary.elapsed_s > 900, "most of the search's share of the budget was used"
    assert left_when_ended == [], f"{len(left_when_ended)} layouts that fit were never tried"


@pytest.mark.parametrize("stop_at", [0, 2])
def test_a_resumed_sweep_runs_each_fixed_layout_once_baseline_first(tmp_path, stop_at):
    with pytest.raises(SystemExit):
        _vm_sweep(tmp_path, stop_at=stop_at).run()
    sweep = _vm_sweep(tmp_path, resume=True)
    summary = sweep.run()
    fixed = [r for r in summary.trials if r.role.value in ("baseline", "recipe")]
    assert fixed[0].role.value == "baseline" and summary.trials[0] is fixed[0], "baseline first"
    names = [r.name for r in fixed]
    assert len(names) == len(set(names)), f"a fixed layout ran twice: {names}"
    from backends import backend_class

    hf_recipes = {name for name, _ in backend_class("hf").recipes(sweep.target)}
    assert hf_recipes
    # Every recipe of the other backend is measured or named as not run, never forgotten.
    assert hf_recipes <= set(names) | set(summary.skipped), (names, summary.skipped)


def test_resume_on_another_machine_is_refused_and_changes_nothing(cli, tmp_path):
    def sweep(machine, *extra):
        return cli(
            "sweep",
            "--machine",
            str(MACHINES / machine),
            "--backends",
            "fake",
            "--budget",
            "5m",
            "--study",
            "s1",
            "--reports",
            str(tmp_path),
            *extra,
        )

    assert sweep("vm_2vcpu").returncode == 0
    before = (tmp_path / "s1" / "machine.json").read_text()
    result = sweep("desktop_8c16t", "--resume")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "the same machine only" in result.stderr
    old = json.loads(before)["fingerprint"]
    new = load_machine(MACHINES / "desktop_8c16t").fingerprint()
    assert old in result.stderr and new in result.stderr, result.stderr
    assert (tmp_path / "s1" / "machine.json").read_text() == before, "machine.json untouched"


def test_a_torn_last_line_is_cut_before_resuming(cli, tmp_path):
    def sweep(*extra):
        return cli(
            "sweep",
            "--machine",
            str(MACHINES / "vm_2vcpu"),
            "--backends",
            "fake",
            "--trials",
            "4",
            "--budget",
            "5m",
            "--study",
            "t",
            "--reports",
            str(tmp_path),
            *extra,
        )

    assert sweep().returncode == 0
    log = tmp_path / "t" / "trials.jsonl"
    whole = log.read_text().splitlines()
    with log.open("a") as handle:
        handle.write('{"number": 99, "state": "compl')  # killed mid-write
    result = sweep("--trials", "6", "--resume")
    assert result.returncode == 0, result.stderr
    assert "cut off a torn last line" in result.stdout
    lines = log.read_text().splitlines()
    assert lines[: len(whole)] == whole and len(lines) > len(whole)
    assert all(json.loads(line) for line in lines), "every line a record"
    assert sweep("--trials", "8", "--resume").returncode == 0
    assert (
        cli("report", "--study", "t", "--reports", str(tmp_path), "--no-roofline").returncode == 0
    )


@pytest.mark.slow  # 10 s
def test_on_an_8_gpu_node_the_gpu_start_walks_the_ranks_to_where_the_speed_is(cli, tmp_path):
    # ddp's recipe runs 8 ranks; on this node it is fastest at 24 (3 a GPU) at batch 512, the
    # most ranks at which that batch fits a GPU's memory. One rank either side of 8 left the
    # sweep at 106 000 tokens/s of 281 000 (38%).
    result = cli(
        "sweep", "--machine", str(GPU_NODE), "--backends", "ddp", "--budget", "5m",
        "--seed", "3", "--reports", str(tmp_path), "--study", "g",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "g" / "trials.jsonl").open()]
    walk = [r for r in records if (r.get("name") or "").startswith("gpu ranks:")]
    ranks = [r["config"]["workers"] for r in walk]
    assert max(ranks) >= 16, ranks
    # Twice as far each step while faster: from 8, far fewer trials than one rank a step.
    assert len(walk) < 12, ranks
    measured = [r for r in records if r["state"] == "complete" and r.get("role") != "reference"]
    best = max(measured, key=lambda r: r["value"])
    assert best["config"]["workers"] >= 20 and best["config"]["batch_size"] == 512, best


H200_HOST = MACHINES / "host_16c_1xh200.json"


def test_a_gpu_backend_whose_only_trial_stopped_early_still_gets_its_gpu_start(cli, tmp_path):
    # On the 16-core + H200 host, with the GPU's settling passes, seed 8's one ddp draw (2
    # ranks at batch 32, launch-bound) stopped under hf's batch 512, and without a complete
    # trial ddp got no GPU start: the sweep confirmed hf at a quarter of ddp's optimum (4
    # ranks at batch 512).
    result = cli(
        "sweep", "--machine", str(H200_HOST), "--budget", "10m", "--seed", "8",
        "--max-new-tokens", "32", "--reports", str(tmp_path), "--study", "h",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "h" / "trials.jsonl").open()]
    ddp = [r for r in records if r.get("config") and r["config"]["backend"] == "ddp"]
    stopped = [r for r in ddp if (r.get("reason") or "").startswith("stopped:")]
    assert stopped, [r.get("name") for r in ddp]
    starts = [r for r in ddp if (r.get("name") or "").startswith("gpu start:")]
    assert starts and starts[0]["number"] > stopped[0]["number"], [r.get("name") for r in ddp]
    summary = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert summary["winner"]["config"]["backend"] == "ddp", summary["winner"]["config"]


@pytest.mark.slow  # 6 s
def test_the_gpu_walk_measures_a_rank_count_again_at_the_batch_that_beat_it(tmp_path):
    from autotune.models import ModelSpec, model_shape
    from autotune.sweep import Sweep, SweepOptions

    # Seed 8 without settling passes (as `experiments/bench_search.py` runs it): ddp's GPU start
    # is priced from its narrow first trial, so its walk runs 4 ranks at batch 128 beside 3
    # at 256; 3 won by their batch alone, climbed to 512, and 4 ranks at 512 (x1.33 that)
    # were never measured: 75% of the optimum.
    model = ModelSpec.resolve()
    machine = MachineModel.load(str(H200_HOST), model_shape(model))
    options = SweepOptions(
        study="w",
        reports_dir=tmp_path,
        budget_s=600.0,
        backends=["llamacpp", "hf", "ddp", "pipeline"],
        base=TrialConfig(max_new_tokens=32),
        seed=8,
        simulated=str(H200_HOST),
    )
    summary = Sweep(
        options, topology=machine.topology, model=model, shape=machine.shape,
        **machine.simulation(8),
    ).run()  # fmt: skip
    walked = [
        (r.config.workers, r.config.batch_size)
        for r in summary.trials
        if (r.name or "").startswith("gpu ranks:") and r.config.backend == "ddp"
    ]
    assert (4, 512) in walked, walked
    assert (summary.winner.config.workers, summary.winner.config.batch_size) == (4, 512)
