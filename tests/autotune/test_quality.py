"""Per-token quality (autotune.quality): the KL divergence and top-1 agreement of a layout
against the reference's distributions, the floor of --min-quality, and both on a real
llama.cpp layout of the tiny model (the batch, workers and threads change nothing, to the bit;
damaged weights score clearly worse), and a sweep scoring each weights once."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.measure import Pacing, benchmark
from autotune.quality import Quality, QualityFloor, ReferenceScores, compare
from autotune.workload import load_workload
from backends.base import TokenScores, top_k_scores
from backends.llamacpp import LlamaCppBackend


def _scores(logits_rows, k, asked=None) -> TokenScores:
    found = [
        top_k_scores(np.asarray(row), k, None if asked is None else asked[i])
        for i, row in enumerate(logits_rows)
    ]
    return TokenScores(
        id="p",
        top_ids=tuple(f[0] for f in found),
        top_logprobs=tuple(f[1] for f in found),
        logprobs=None if asked is None else tuple(f[2] or () for f in found),
    )


def test_the_same_distribution_scores_full_agreement_and_no_divergence():
    rows = np.random.default_rng(0).standard_normal((5, 50)) * 3
    reference = _scores(rows, 8)
    candidate = _scores(rows, 1, reference.top_ids)
    found = compare([reference], [candidate])
    assert found.top1 == 1.0 and found.positions == 5
    assert abs(found.kld_mean) < 1e-12 and found.kld_p99 < 1e-12
    assert 0 < found.tail_mass < 1, "the top-8 of 50 tokens leaves mass out"


def test_the_divergence_is_the_top_k_plus_one_tail_bucket():
    p = np.log(np.array([0.5, 0.3, 0.1, 0.1]))  # top-2 kept: the rest, 0.2, is one bucket
    q = np.log(np.array([0.3, 0.5, 0.1, 0.1]))
    reference = _scores([p], 2)
    candidate = _scores([q], 1, reference.top_ids)
    found = compare([reference], [candidate])
    expected = 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.5)  # tail 0.2 vs 0.2: 0
    assert found.kld_mean == pytest.approx(expected)
    assert found.top1 == 0.0, "the candidate's most likely token is another"
    full = sum(a * math.log(a / b) for a, b in zip(np.exp(p), np.exp(q), strict=True))
    assert found.kld_mean <= full + 1e-12, "a lower bound of the full divergence"


@pytest.mark.parametrize(
    ("text", "floor"),
    [
        ("top1=0.95", QualityFloor(top1=0.95)),
        ("kld=0.05", QualityFloor(kld=0.05)),
        ("top1=0.9, kld=0.1", QualityFloor(top1=0.9, kld=0.1)),
        ("none", QualityFloor()),
    ],
)
def test_a_floor_parses(text, floor):
    assert QualityFloor.parse(text) == floor
    assert QualityFloor.parse(floor.as_flag()) == floor


@pytest.mark.parametrize("text", ["top1=1.5", "kld=-1", "top2=0.9", "kld", "top1=x", ""])
def test_a_bad_floor_names_the_flag(text):
    with pytest.raises(ConfigError, match="--min-quality"):
        QualityFloor.parse(text)


def test_a_layout_under_the_floor_says_why_and_an_unscored_one_is_not_judged():
    quality = Quality(top1=0.8, kld_mean=0.2, kld_p99=1.0, positions=100, tail_mass=0.01)
    assert "top-1 agreement 80.0%" in QualityFloor(top1=0.9).why_below(quality)
    assert "KL divergence 0.2000" in QualityFloor(kld=0.1).why_below(quality)
    assert QualityFloor(top1=0.5, kld=0.5).why_below(quality) is None
    assert QualityFloor(top1=0.99).why_below(None) is None


def test_cli_refuses_a_bad_floor_in_one_line(cli):
    result = cli("sweep", "--min-quality", "top1=2", "--budget", "10s")
    assert result.returncode == 2
    assert "--min-quality" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- a real layout (llama.cpp)

# Batching and more workers run the same weights: their distributions may differ only by
# rounding. Measured on the tiny model: exactly 0 for all four layouts (a prompt is scored in
# one prompt-processing pass, whatever the layout's decode batch; batching's effect on the
# answers themselves is the agreement figure).
SAME_WEIGHTS_KLD = 1e-3


def _damaged(tiny_gguf, tmp_path):
    """A copy of the tiny model with one layer's feed-forward weights scrambled by noise."""
    import gguf

    from autotune.models import ModelSpec

    path = tmp_path / "damaged.gguf"
    shutil.copyfile(tiny_gguf.path, path)
    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    rng = np.random.default_rng(1)
    tensor.data[...] += rng.standard_normal(tensor.data.shape).astype(np.float32) * 0.5
    del reader  # flush the memory map
    return ModelSpec.resolve(str(path))


@pytest.mark.slow
def test_batching_workers_and_threads_score_alike_and_damaged_weights_clearly_worse(
    tiny_gguf, topology, tmp_path
):
    workload = load_workload(None)
    reference = benchmark(
        TrialConfig(backend="llamacpp", max_new_tokens=24),
        workload,
        tiny_gguf,
        topology,
        Pacing(prompts=8, warmup=0),
        keep_reference=True,
    )
    scores = ReferenceScores.from_dict(reference.reference_scores)
    path = tmp_path / "reference.json"
    scores.save(path)
    scores = ReferenceScores.load(path)
    assert len(scores.scores) >= 3 and all(len(s.top_ids[0]) == 32 for s in scores.scores)

    def quality(config, model=tiny_gguf) -> Quality:
        result = benchmark(
            config, workload, model, topology, Pacing(prompts=8, warmup=0),
            quality_reference=scores,
        )  # fmt: skip
        assert not [w for w in result.warnings if "quality" in w], result.warnings
        return Quality.from_dict(result.quality)

    for workers, batch in ((1, 1), (4, 1), (1, 8), (4, 8)):
        found = quality(TrialConfig(backend="llamacpp", workers=workers, batch_size=batch))
        assert found.top1 >= 0.99 and found.kld_mean < SAME_WEIGHTS_KLD, (workers, batch, found)
        assert found.scoring_s is not None and found.positions >= 30
    damaged = _damaged(tiny_gguf, tmp_path)
    # The fields llama.cpp's scoring pass does not read (`unscored`, whose figures a sweep
    # gives every layout that differs only in them) change none of its figures, to the bit.
    unscored = ({}, {"workers": 2, "batch_size": 4, "pinning": "spread"},
                {"threads_per_worker": 2, "prefill_threads": 1, "batch_size": 8})  # fmt: skip
    assert {k for fields in unscored for k in fields} == LlamaCppBackend.unscored
    alike = [
        replace(quality(TrialConfig(backend="llamacpp", **fields), damaged), scoring_s=None)
        for fields in unscored
    ]
    assert alike[0].kld_mean > 100 * SAME_WEIGHTS_KLD and alike[0].top1 < 0.95, alike[0]
    assert all(each == alike[0] for each in alike), alike


def test_a_sweep_prunes_layouts_under_the_floor_and_they_cannot_win(tmp_path, simulated_sweep):
    """Each trial's child reports its quality (here: worse the wider the batch, as if the
    batch changed the weights); --min-quality prunes those under it, with the reason and the
    figure, and the winner is above it."""
    from autotune.study import TrialState
    from autotune.sweep import SweepOptions

    def scored(spec, outcome):
        if outcome.result and not spec.get("paired"):
            batch = spec["config"]["batch_size"]
            quality = Quality(
                top1=1.0 - 0.05 * (batch - 1), kld_mean=0.02 * batch, kld_p99=0.1 * batch,
                positions=100, tail_mass=0.01, scoring_s=0.1,
            )  # fmt: skip
            outcome.result["quality"] = quality.to_dict()

    options = SweepOptions(
        study="s", reports_dir=tmp_path, budget_s=120.0, backends=["fake"],
        min_quality=QualityFloor(top1=0.9),
    )  # fmt: skip
    summary, _, _ = simulated_sweep(options, change=scored)
    pruned = [r for r in summary.trials if r.state is TrialState.PRUNED and r.result]
    assert pruned and all("under --min-quality top1=0.9" in r.reason for r in pruned)
    assert all(r.config.batch_size >= 3 for r in pruned)
    measured = [r for r in summary.trials if r.complete and r.config.batch_size > 1]
    assert measured and all(r.quality.top1 >= 0.9 for r in measured)
    assert summary.winner.quality is None or summary.winner.quality.top1 >= 0.9
    assert summary.winner.config.batch_size <= 2


def test_a_sweep_scores_the_same_weights_once_and_does_not_run_a_layout_they_failed(
    tmp_path, simulated_sweep, monkeypatch
):
    """Layouts that differ only in fields their backend's scoring pass does not read
    (`Backend.unscored`; here, as if the fake's were llama.cpp's, the batch and the threads)
    are scored once: the others carry that score and the trial it is from (``scored_by``),
    and a layout whose weights scored under the floor is pruned without running."""
    from autotune.space import config_key
    from autotune.study import TrialState
    from autotune.sweep import SweepOptions
    from autotune.sweep.ledger import scoring_key
    from backends.fake import FakeBackend

    monkeypatch.setattr(FakeBackend, "unscored", frozenset({"batch_size", "threads_per_worker"}))
    scored = []

    def score(spec, outcome):
        if not outcome.result:
            return
        if spec.get("keep_reference"):  # the reference run scores its own answers
            own = TokenScores(id="p", top_ids=((1, 2),), top_logprobs=((-0.1, -2.4),))
            reference = ReferenceScores(texts={"p": "hi"}, answers={"p": [1]}, scores=[own])
            outcome.result["reference_scores"] = reference.to_dict()
        elif spec.get("quality_reference"):  # a child scores where it is asked to
            config = TrialConfig.from_dict(spec["config"])
            scored.append(config)
            outcome.result["quality"] = Quality(
                top1=0.5 if config.workers == 2 else 1.0, kld_mean=0.01 * config.workers,
                kld_p99=0.1, positions=100, tail_mass=0.0, scoring_s=0.1,
            ).to_dict()  # fmt: skip

    extra = [
        TrialConfig(backend="fake", workers=2, batch_size=1),  # weights under the floor
        TrialConfig(backend="fake", workers=2, batch_size=2),  # the same: not run
        TrialConfig(backend="fake", workers=1, batch_size=2),  # the baseline's score
    ]
    options = SweepOptions(
        study="s", reports_dir=tmp_path, budget_s=120.0, backends=["fake"],
        min_quality=QualityFloor(top1=0.9),
    )  # fmt: skip
    summary, _, _ = simulated_sweep(options, extra=extra, change=score)

    keys = [scoring_key(config) for config in scored]
    assert len(keys) == len(set(keys)) >= 2, keys  # no weights scored twice
    numbers = {r.number: r for r in summary.trials}
    carried = [r for r in summary.trials if r.quality and r.quality.scored_by is not None]
    assert any(r.config == extra[2] for r in carried), carried
    for record in carried:
        source = numbers[record.quality.scored_by]
        assert scoring_key(source.config) == scoring_key(record.config)
        assert source.quality.scored_by is None and record.quality.scoring_s is None
        assert replace(record.quality, scored_by=None, scoring_s=0.1) == source.quality
    failed, unrun = (next(r for r in summary.trials if r.config == c) for c in extra[:2])
    assert failed.state is TrialState.PRUNED and failed.result is not None, failed
    assert unrun.state is TrialState.PRUNED and unrun.result is None, unrun
    assert f"trial {failed.number}" in unrun.reason and "--min-quality" in unrun.reason
    # Each is settled once pruned: never asked for again (no time passes, so a sweep that
    # asked again would not end).
    unrun_keys = [
        config_key(r.config)
        for r in summary.trials
        if r.result is None and "scored its weights" in (r.reason or "")
    ]
    assert len(unrun_keys) == len(set(unrun_keys)), unrun_keys
