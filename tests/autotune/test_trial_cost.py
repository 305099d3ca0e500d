"""Issue 25: trials that cost what the ranking needs: a trial sized by its share of the
budget, one that stops once it is clearly slower than the leader, and a budget that always
ends in a paired winner."""

from __future__ import annotations

from pathlib import Path

import optuna

from autotune.config import TrialConfig
from autotune.measure import Pacing, benchmark, clearly_below
from autotune.passes import WINDOWS, Sample
from autotune.study import Role, TrialState
from autotune.sweep import SweepOptions
from autotune.workload import TINY_WORKLOAD, load_workload


def options(tmp_path, **changes) -> SweepOptions:
    settings = {
        "study": "s",
        "reports_dir": tmp_path,
        "budget_s": 60.0,
        "backends": ["fake"],
        "limit": 4,
        "pairs": 2,
        "seed": 1,
        **changes,
    }
    return SweepOptions(**settings)


def sample(*windows: float) -> Sample:
    return Sample(
        wall_s=1.0, generated_tokens=1, prefill_tokens=1, tokens_per_s=1.0, windows=windows
    )


def test_one_pass_is_clearly_below_only_when_its_fastest_window_is():
    assert clearly_below([sample(90.0, 110.0, 100.0)], 120.0) is not None
    assert clearly_below([sample(90.0, 110.0, 100.0)], 105.0) is None, "its best window is above"
    two = [sample(100.0, 100.0, 100.0), sample(101.0, 101.0, 101.0)]
    assert "2 pass(es)" in clearly_below(two, 110.0), "two passes: the interval's top"
    assert clearly_below(two, 100.0) is None


def test_a_measurement_stops_after_a_pass_once_clearly_below_the_bar(tiny_gguf, topology):
    config = TrialConfig(backend="fake", batch_size=2)
    workload = load_workload(TINY_WORKLOAD)
    full = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=3))
    assert full.repeats == 3 and full.stopped is None
    stopped = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=3), stop_below=1e9)
    assert stopped.repeats == 1 and "under the leader's lower bound" in stopped.stopped
    kept = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=2), stop_below=1.0)
    assert kept.repeats == 2 and kept.stopped is None, "a layout above the bar finishes"


def test_search_trials_carry_the_leaders_bar_and_a_stopped_one_is_pruned_with_its_figure(
    tmp_path, simulated_sweep
):
    def stop_batch_one(spec, outcome):
        # What a trial child says when its passes fell clearly below the bar it was given.
        if spec.get("stop_below") and spec["config"]["batch_size"] == 1 and outcome.result:
            outcome.result["stopped"] = "its upper bound is under the leader's lower bound"

    summary, _, runner = simulated_sweep(options(tmp_path), change=stop_batch_one)
    searched = [c for c in runner.calls if "stop_below" in c]
    assert searched and all(c["stop_below"] > 0 for c in searched[1:])
    fixed = [c for c in runner.calls if not c.get("paired") and "stop_below" not in c]
    assert fixed, "the baseline, recipes and reference runs are never stopped early"
    stopped = [r for r in summary.trials if (r.reason or "").startswith("stopped:")]
    assert stopped and all(r.state is TrialState.PRUNED for r in stopped)
    assert all(r.result["tokens_per_s"] > 0 and r.role is Role.SEARCH for r in stopped)
    assert summary.winner not in stopped
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    pruned = [t for t in study.trials if t.state is optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.intermediate_values for t in pruned), "each pass was reported"


def test_a_trial_measures_the_windows_its_share_of_the_budget_fits(tmp_path, simulated_sweep):
    def windows_asked(budget_s: float) -> list[int]:
        _, _, runner = simulated_sweep(options(tmp_path / str(budget_s), budget_s=budget_s))
        return [c["pacing"]["windows"] for c in runner.calls if not c.get("paired")]

    long = windows_asked(3000.0)
    short = windows_asked(20.0)
    assert set(long) <= {WINDOWS, 1} and long.count(WINDOWS) >= len(long) - 2
    assert min(short) == 1 and len(short) > 1, "a short budget measures more, more roughly"


def test_the_confirmation_is_always_spent_and_ends_in_a_paired_winner(tmp_path, simulated_sweep):
    for budget_s in (20.0, 120.0):
        summary, clock, runner = simulated_sweep(
            options(tmp_path / str(budget_s), budget_s=budget_s)
        )
        assert summary.winner.confirmed and summary.winner.paired["pairs"] >= 1
        assert summary.elapsed_s <= budget_s
        paired = [c for c in runner.calls if c.get("paired")]
        assert paired, "at least one pair, whatever the time left"


H200_HOST = Path(__file__).resolve().parents[1] / "fixtures" / "machines" / "host_16c_1xh200.json"


def test_a_gpu_host_starts_where_the_gpu_speed_is_and_cpu_trials_do_not_settle(cli, tmp_path):
    """The issue's 16-core + H200 host, simulated: hf was dropped at its recipe's batch 8 as
    x0.41 llama.cpp, and every llama.cpp trial settled 30 s there."""
    import json

    result = cli(
        "sweep", "--machine", str(H200_HOST), "--backends", "llamacpp,hf,ddp",
        "--budget", "5m", "--seed", "0", "--reports", str(tmp_path), "--study", "h",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "h" / "trials.jsonl").open()]
    started = [r for r in records if (r.get("name") or "").startswith("gpu start:")]
    assert started and started[0]["config"]["backend"] == "hf"
    assert started[0]["config"]["dtype"] in ("bfloat16", "float16"), "the cheapest weights"
    assert started[0]["config"]["batch_size"] >= 32, "a wide batch, not the recipes' 4-8"
    measured = [r for r in records if r["state"] == "complete" and r.get("role") != "reference"]
    cpu = [r for r in measured if r["config"]["backend"] == "llamacpp"]
    gpu = [r for r in measured if r["config"]["backend"] == "hf"]
    assert cpu and all(len(r["samples"]) == 1 for r in cpu), "a CPU layout does not settle"
    assert gpu and all(len(r["samples"]) >= 3 for r in gpu), "a GPU layout settles"
    summary = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert summary["winner"]["config"]["backend"] in ("hf", "ddp")
    assert summary["winner"]["config"]["batch_size"] >= 128
