"""The report's figures: one function per figure, drawn with matplotlib on the axes it is
given; `FIGURES` lists them in the report's order, `draw` writes every one as a PNG."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autotune.console import layout_text
from autotune.quality import QualityFloor
from autotune.report.data import Study
from autotune.study import StudyDir, TrialRecord

__all__ = ["CAPTIONS", "FIGURES", "Figure", "draw"]


def _speedup_ci(study: Study, trial: TrialRecord) -> tuple[float, float, float] | None:
    """(speedup, low, high) of a trial against the baseline: the paired interval where the
    trial was re-measured, else the spread of its own samples."""
    base = study.baseline
    if not base:
        return None
    winner = study.winner
    paired = winner.paired if winner and winner.number == trial.number else None
    if paired and paired.get("ci_low") is not None:
        return paired["speedup"], paired["ci_low"], paired["ci_high"]
    spread = (trial.result or {}).get("tokens_per_s_summary") or {}
    value = trial.value / base.value
    low = spread.get("min", trial.value) / base.value
    high = spread.get("max", trial.value) / base.value
    return value, low, high


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _fig_speedup(study: Study, ax) -> None:
    best: dict[str, TrialRecord] = {}
    for trial in study.done:
        backend = trial.backend
        if backend not in best or trial.value > best[backend].value:
            best[backend] = trial
    rows = [(b, t, _speedup_ci(study, t)) for b, t in best.items()]
    rows = [r for r in rows if r[2] is not None]
    if not rows:
        _empty(ax, "no finished baseline: speedups need trial 0")
        return
    rows.sort(key=lambda r: r[2][0])
    names = [f"{b}\n{layout_text(t.config)}" for b, t, _ in rows]
    values = [c[0] for _, _, c in rows]
    errors = [[c[0] - c[1] for _, _, c in rows], [c[2] - c[0] for _, _, c in rows]]
    ax.barh(names, values, xerr=errors, capsize=4, color="#4c72b0")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("speedup over the naive baseline (x, tokens/s ratio)")
    ax.tick_params(axis="y", labelsize=7)


def _fig_workers_threads(study: Study, ax) -> None:
    from backends import fields_read

    # The backends whose layouts have workers (llama.cpp processes, DDP ranks); the one with
    # the most measured trials is drawn.
    by_backend: dict[str, list[TrialRecord]] = {}
    for trial in study.done:
        if "workers" in fields_read(trial.backend):
            by_backend.setdefault(trial.backend, []).append(trial)
    backend = max(by_backend, key=lambda b: len(by_backend[b]), default=None)
    if backend is None:
        _empty(ax, "no trial of a backend with several workers (llamacpp, ddp)")
        return
    cells: dict[tuple[int, int], float] = {}
    for trial in by_backend[backend]:
        key = (trial.config.workers, trial.config.threads_per_worker)
        cells[key] = max(cells.get(key, 0.0), trial.value)
    workers = sorted({w for w, _ in cells})
    threads = sorted({t for _, t in cells})
    grid = [[cells.get((w, t), math.nan) for t in threads] for w in workers]
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for i, w in enumerate(workers):
        for j, t in enumerate(threads):
            if (w, t) in cells:
                ax.text(j, i, f"{cells[w, t]:.0f}", ha="center", va="center", color="white")
    ax.set_xticks(range(len(threads)), [str(t) for t in threads])
    ax.set_yticks(range(len(workers)), [str(w) for w in workers])
    ax.set_xlabel("threads per worker")
    ax.set_ylabel("workers (processes)")
    ax.set_title(f"{backend}: best tokens/s of each cell", fontsize=9)
    ax.figure.colorbar(image, ax=ax, label="tokens/s")


def _fig_batch(study: Study, ax) -> None:
    lines: dict[str, dict[int, float]] = {}
    for trial in study.done:
        line = lines.setdefault(trial.backend, {})
        batch = trial.config.batch_size
        line[batch] = max(line.get(batch, 0.0), trial.value)
    if not lines:
        _empty(ax, "no finished trial")
        return
    for backend, points in sorted(lines.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=backend)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences decoded together per process)")
    ax.set_ylabel("tokens/s")
    ax.legend()


def _fig_pareto(study: Study, ax) -> None:
    points = [((t.result or {}).get("peak_memory_bytes"), t.value, t.backend) for t in study.done]
    points = [(m / 2**30, v, b) for m, v, b in points if m]
    if not points:
        _empty(ax, "no finished trial with a memory figure")
        return
    for backend in sorted({b for _, _, b in points}):
        mine = [(m, v) for m, v, b in points if b == backend]
        ax.scatter([m for m, _ in mine], [v for _, v in mine], label=backend, alpha=0.7)
    front, best = [], -1.0
    for m, v, _ in sorted(points):  # least memory first: a point is on the front if faster
        if v > best:
            front.append((m, v))
            best = v
    ax.plot(
        [m for m, _ in front],
        [v for _, v in front],
        color="black",
        drawstyle="steps-post",
        label="Pareto front",
    )
    ax.set_xlabel("peak memory, all processes (GiB, PSS)")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)


def _fig_agreement(study: Study, ax) -> None:
    # Every measured trial, pruned-for-agreement ones too: the trade-off is the point.
    points = [
        ((t.agreement or {}).get("identical"), (t.result or {}).get("tokens_per_s"), t.backend)
        for t in study.trials
        if t.result
    ]
    points = [(a, v, b) for a, v, b in points if a is not None and v]
    if not points:
        _empty(ax, "no trial with an agreement figure (no reference run finished)")
        return
    for backend in sorted({b for _, _, b in points}):
        mine = [(a, v) for a, v, b in points if b == backend]
        ax.scatter([a * 100 for a, _ in mine], [v for _, v in mine], label=backend, alpha=0.7)
    minimum = study.summary.min_agreement if study.summary else None
    if minimum is not None:
        ax.axvline(minimum * 100, color="grey", linestyle="--", label="--min-agreement")
    ax.set_xlabel("answers identical to the batch-1 greedy reference (%)")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)


def _fig_quality(study: Study, ax) -> None:
    # Every scored trial, pruned-for-quality ones too: the trade-off is the point.
    points = [
        (t.quality.kld_mean, (t.result or {}).get("tokens_per_s"), t.backend, t.quality)
        for t in study.trials
        if t.result and t.quality is not None
    ]
    points = [(k, v, b, q) for k, v, b, q in points if v]
    if not points:
        _empty(ax, "no trial scored against the reference (teacher forcing)")
        return
    for backend in sorted({b for _, _, b, _ in points}):
        mine = [(k, v) for k, v, b, _ in points if b == backend]
        ax.scatter([k for k, _ in mine], [v for _, v in mine], label=backend, alpha=0.7)
    requantized = [(k, v) for k, v, _, q in points if q.requantized_from]
    if requantized:
        source = next(q.requantized_from for _, _, _, q in points if q.requantized_from)
        ax.scatter(
            [k for k, _ in requantized], [v for _, v in requantized], facecolors="none",
            edgecolors="black", s=90, label=f"requantized from {source}",
        )  # fmt: skip
    front, best = [], -1.0
    for k, v, _, _ in sorted(points, key=lambda p: (p[0], -p[1])):  # closest first
        if v > best:
            front.append((k, v))
            best = v
    ax.plot(
        [k for k, _ in front], [v for _, v in front], color="black", drawstyle="steps-post",
        label="Pareto front",
    )  # fmt: skip
    flag = study.summary.min_quality if study.summary else None
    floor = QualityFloor.parse(flag) if flag else None  # None: a study from before the floor
    if floor is not None and floor.kld is not None:
        ax.axvline(floor.kld, color="grey", linestyle="--", label="--min-quality kld")
    ax.set_xlabel("mean KL divergence from the source weights, per token (nats)")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)


def _fig_pipeline(study: Study, ax) -> None:
    rows = []
    for trial in study.done:
        details = (trial.result or {}).get("details") or {}
        if details.get("stage_busy_s"):  # what a layer pipeline reports of its stages
            rows.append((details.get("boundaries") or "?", details["stage_busy_s"], trial))
    if not rows:
        _empty(ax, "no pipeline trial in this study")
        return
    rows = rows[:12]
    stages = max(len(busy) for _, busy, _ in rows)
    width = 0.8 / stages
    for stage in range(stages):
        xs = [i + stage * width for i in range(len(rows))]
        ys = [busy[stage] if stage < len(busy) else 0 for _, busy, _ in rows]
        ax.bar(xs, ys, width=width, label=f"stage {stage}")
    labels = [f"{b}\nb{t.config.batch_size}" for b, _, t in rows]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_xlabel("layer split (stage ranges) and micro-batch size")
    ax.set_ylabel("compute time per stage in the last timed pass (s)")
    ax.legend(fontsize=8)


def _fig_best_so_far(study: Study, axes) -> None:
    ax_n, ax_t = axes
    best, xs, ys, ts = -1.0, [], [], []
    elapsed = 0.0
    for trial in study.trials:
        elapsed = trial.ended_s if trial.ended_s is not None else elapsed + trial.duration_s
        if trial.complete and trial.value > best:
            best = trial.value
        if best > 0:
            xs.append(trial.number)
            ys.append(best)
            ts.append(elapsed / 60)
    if not xs:
        _empty(ax_n, "no finished trial")
        _empty(ax_t, "")
        return
    ax_n.step(xs, ys, where="post")
    ax_n.set_xlabel("trial number")
    ax_n.set_ylabel("best tokens/s so far")
    ax_t.step(ts, ys, where="post")
    ax_t.set_xlabel("wall time since the sweep began (min)")


def _fig_importances(study: Study, ax) -> None:
    import optuna

    database = StudyDir(study.directory).database
    if not database.is_file():
        _empty(ax, "no study.db here (a --storage study): importances need the Optuna storage")
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = optuna.load_study(study_name=study.name, storage=f"sqlite:///{database}")
    complete = [t for t in loaded.trials if t.state.name == "COMPLETE" and t.params]
    # Parameters are named per backend; rank those of the backend with the most trials.
    counts: dict[str, int] = {}
    for trial in complete:
        name = trial.params.get("backend", "?")
        counts[name] = counts.get(name, 0) + 1
    backend = max(counts, key=counts.get, default=None)
    usable = [t for t in complete if t.params.get("backend") == backend]
    # Conditional parameters (pinning only with several workers) are left out: the evaluator
    # needs every trial to have each parameter it ranks.
    shared = set.intersection(*(set(t.params) for t in usable)) if usable else set()
    params = sorted(shared - {"backend"})
    varying = [p for p in params if len({t.params[p] for t in usable}) > 1]
    if len(usable) < 3 or not varying:
        _empty(ax, f"too few search trials that vary a parameter ({len(usable)} of {backend})")
        return
    sub = optuna.create_study(direction="maximize")
    for trial in usable:
        sub.add_trial(trial)
    try:
        importances = optuna.importance.get_param_importances(sub, params=varying)
    except (ValueError, RuntimeError) as error:  # e.g. ranges that changed between trials
        _empty(ax, f"importances could not be evaluated: {error}")
        return
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="#55a868")
    ax.set_xlabel(f"importance for tokens/s (share of variance), {backend} trials")


def _fig_roofline(study: Study, ax) -> None:
    roof = study.roofline
    best = max(study.done, key=lambda t: t.value, default=None)
    if roof is None or best is None:
        _empty(ax, "no roofline measured or no finished trial")
        return
    names = ["best measured", "batch-1 bound\n(bandwidth)", "compute bound\n(GEMM)"]
    values = [
        best.value,
        roof.get("bound_batch1_tokens_per_s") or 0,
        roof.get("bound_compute_tokens_per_s") or 0,
    ]
    bars = ax.bar(names, values, color=["#4c72b0", "#c44e52", "#8172b2"])
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f}", ha="center", va="bottom")
    ax.set_ylabel("tokens/s")
    ax.set_title(
        f"{roof['memory_bandwidth_gb_s']:.1f} GB/s, {roof['gemm_gflops']:.0f} GFLOP/s "
        f"({roof['threads']} threads); best: {layout_text(best.config)}",
        fontsize=8,
    )


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its file, its caption, and what draws it on its axes."""

    name: str
    caption: str
    draw: Callable
    panels: int = 1  # side by side, sharing the y axis


# The figures, in the order of the report.
FIGURES = (
    Figure(
        "speedup_by_backend.png",
        "Speedup over the naive baseline, best config of each backend",
        _fig_speedup,
    ),
    Figure(
        "workers_threads.png",
        "Tokens/s by workers x threads per worker (seed 001's question)",
        _fig_workers_threads,
    ),
    Figure("batch_size.png", "Tokens/s against batch size, best per backend", _fig_batch),
    Figure(
        "memory_pareto.png",
        "Tokens/s against peak memory, every trial, Pareto front marked",
        _fig_pareto,
    ),
    Figure(
        "agreement.png",
        "Tokens/s against the share of answers identical to the batch-1 reference",
        _fig_agreement,
    ),
    Figure(
        "quality.png",
        "Tokens/s against KL divergence from the source weights (teacher forcing), "
        "Pareto front marked",
        _fig_quality,
    ),
    Figure(
        "pipeline_stages.png",
        "Pipeline: compute time per stage for each split tried",
        _fig_pipeline,
    ),
    Figure(
        "best_so_far.png",
        "Best tokens/s so far against trial number and wall time",
        _fig_best_so_far,
        panels=2,
    ),
    Figure(
        "importances.png", "Parameter importances (Optuna's fANOVA evaluator)", _fig_importances
    ),
    Figure("roofline.png", "The best result beside the machine's roofline bounds", _fig_roofline),
)
CAPTIONS = {figure.name: figure.caption for figure in FIGURES}


def draw(study: Study, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for figure_spec in FIGURES:
        if figure_spec.panels > 1:
            figure, axes = plt.subplots(1, figure_spec.panels, figsize=(9, 3.8), sharey=True)
        else:
            figure, axes = plt.subplots(figsize=(7.5, 4.2))
        figure_spec.draw(study, axes)
        figure.suptitle(figure_spec.caption, fontsize=10)
        figure.tight_layout()
        path = directory / figure_spec.name
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
