"""`autotune report`: a study's figures and tables, as report.md and a standalone report.html.

Everything comes from the study's own files (summary.json, trials.jsonl, machine.json, and
study.db for parameter importances), so a report can be made of a sweep cut off midway, and
made again. Every figure is always written: where the study has nothing for it (no pipeline
trial, one backend) the figure says so instead of being left out, so links never break.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from autotune.console import layout_text
from autotune.errors import ConfigError

__all__ = ["FIGURES", "Report", "build_report", "load_study"]

# file name -> caption; the order of the report.
FIGURES = {
    "speedup_by_backend.png": "Speedup over the naive baseline, best config of each backend",
    "workers_threads.png": "Tokens/s by workers x threads per worker (seed 001's question)",
    "batch_size.png": "Tokens/s against batch size, best per backend",
    "memory_pareto.png": "Tokens/s against peak memory, every trial, Pareto front marked",
    "pipeline_stages.png": "Pipeline: compute time per stage for each split tried",
    "best_so_far.png": "Best tokens/s so far against trial number and wall time",
    "importances.png": "Parameter importances (Optuna's fANOVA evaluator)",
    "roofline.png": "The best result beside the machine's roofline bounds",
}


@dataclass
class Study:
    """What a study directory holds."""

    directory: Path
    summary: dict
    trials: list[dict]
    machine: dict
    roofline: dict | None = None

    @property
    def name(self) -> str:
        return self.summary.get("study", self.directory.name)

    @property
    def done(self) -> list[dict]:
        return [t for t in self.trials if t["state"] == "complete"]

    @property
    def baseline(self) -> dict | None:
        return self.summary.get("baseline")


@dataclass
class Report:
    """The written report: its files and the rows shown in the terminal."""

    markdown: Path
    html: Path
    figures: list[Path]
    top: list[dict] = field(default_factory=list)


def load_study(reports_dir: Path, study: str | None) -> Study:
    """The study named (default: the newest under ``reports_dir``)."""
    if study is None:
        found = sorted(reports_dir.glob("*/trials.jsonl"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"no study under {reports_dir}; run autotune sweep first")
        directory = found[-1].parent
    else:
        directory = reports_dir / study
        if not (directory / "trials.jsonl").is_file():
            raise ConfigError(f"--study {study}: no trials.jsonl in {directory}")
    trials = []
    lines = (directory / "trials.jsonl").read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            trials.append(json.loads(line))
        except json.JSONDecodeError:
            # A sweep killed mid-write leaves at most a torn last line: report the rest.
            if number != len(lines):
                raise ConfigError(f"{directory / 'trials.jsonl'}:{number}: not JSON") from None
    summary_path = directory / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.setdefault("study", directory.name)
    if not summary.get("baseline"):
        summary["baseline"] = next(
            (t for t in trials if t.get("role") == "baseline" and t["state"] == "complete"), None
        )
    machine_path = directory / "machine.json"
    machine = json.loads(machine_path.read_text()) if machine_path.is_file() else {}
    roofline_path = directory / "roofline.json"
    roofline = json.loads(roofline_path.read_text()) if roofline_path.is_file() else None
    return Study(directory, summary, trials, machine, roofline)


# ---------------------------------------------------------------- figures


def _speedup_ci(study: Study, trial: dict) -> tuple[float, float, float] | None:
    """(speedup, low, high) of a trial against the baseline: the paired interval where the
    trial was re-measured, else the spread of its own samples."""
    base = study.baseline
    if not base:
        return None
    winner = study.summary.get("winner") or {}
    paired = winner.get("paired") if winner.get("number") == trial["number"] else None
    if paired and paired.get("ci_low") is not None:
        return paired["speedup"], paired["ci_low"], paired["ci_high"]
    spread = (trial.get("result") or {}).get("tokens_per_s_summary") or {}
    value = trial["value"] / base["value"]
    low = spread.get("min", trial["value"]) / base["value"]
    high = spread.get("max", trial["value"]) / base["value"]
    return value, low, high


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _fig_speedup(study: Study, ax) -> None:
    best: dict[str, dict] = {}
    for trial in study.done:
        backend = trial["config"]["backend"]
        if backend not in best or trial["value"] > best[backend]["value"]:
            best[backend] = trial
    rows = [(b, t, _speedup_ci(study, t)) for b, t in best.items()]
    rows = [r for r in rows if r[2] is not None]
    if not rows:
        _empty(ax, "no finished baseline: speedups need trial 0")
        return
    rows.sort(key=lambda r: r[2][0])
    names = [f"{b}\n{layout_text(t['config'])}" for b, t, _ in rows]
    values = [c[0] for _, _, c in rows]
    errors = [[c[0] - c[1] for _, _, c in rows], [c[2] - c[0] for _, _, c in rows]]
    ax.barh(names, values, xerr=errors, capsize=4, color="#4c72b0")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("speedup over the naive baseline (x, tokens/s ratio)")
    ax.tick_params(axis="y", labelsize=7)


def _fig_workers_threads(study: Study, ax) -> None:
    by_backend: dict[str, list[dict]] = {}
    for trial in study.done:
        if trial["config"]["backend"] in ("llamacpp", "fake", "ddp"):
            by_backend.setdefault(trial["config"]["backend"], []).append(trial)
    backend = (
        "llamacpp"
        if "llamacpp" in by_backend
        else max(by_backend, key=lambda b: len(by_backend[b]), default=None)
    )
    if backend is None:
        _empty(ax, "no trial of a multi-process backend (llamacpp, ddp)")
        return
    cells: dict[tuple[int, int], float] = {}
    for trial in by_backend[backend]:
        key = (trial["config"]["workers"], trial["config"]["threads_per_worker"])
        cells[key] = max(cells.get(key, 0.0), trial["value"])
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
        c = trial["config"]
        line = lines.setdefault(c["backend"], {})
        line[c["batch_size"]] = max(line.get(c["batch_size"], 0.0), trial["value"])
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
    points = [
        ((t.get("result") or {}).get("peak_memory_bytes"), t["value"], t["config"]["backend"])
        for t in study.done
    ]
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


def _fig_pipeline(study: Study, ax) -> None:
    rows = []
    for trial in study.done:
        details = (trial.get("result") or {}).get("details") or {}
        if trial["config"]["backend"] == "pipeline" and details.get("stage_busy_s"):
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
    labels = [f"{b}\nb{t['config']['batch_size']}" for b, _, t in rows]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_xlabel("layer split (stage ranges) and micro-batch size")
    ax.set_ylabel("compute time per stage in the last timed pass (s)")
    ax.legend(fontsize=8)


def _fig_best_so_far(study: Study, axes) -> None:
    ax_n, ax_t = axes
    best, xs, ys, ts = -1.0, [], [], []
    elapsed = 0.0
    for trial in study.trials:
        elapsed = trial.get("ended_s", elapsed + trial.get("duration_s", 0.0))
        if trial["state"] == "complete" and trial["value"] > best:
            best = trial["value"]
        if best > 0:
            xs.append(trial["number"])
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

    database = study.directory / "study.db"
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
    best = max(study.done, key=lambda t: t["value"], default=None)
    if roof is None or best is None:
        _empty(ax, "no roofline measured or no finished trial")
        return
    names = ["best measured", "batch-1 bound\n(bandwidth)", "compute bound\n(GEMM)"]
    values = [
        best["value"],
        roof.get("bound_batch1_tokens_per_s") or 0,
        roof.get("bound_compute_tokens_per_s") or 0,
    ]
    bars = ax.bar(names, values, color=["#4c72b0", "#c44e52", "#8172b2"])
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f}", ha="center", va="bottom")
    ax.set_ylabel("tokens/s")
    ax.set_title(
        f"{roof['memory_bandwidth_gb_s']:.1f} GB/s, {roof['gemm_gflops']:.0f} GFLOP/s "
        f"({roof['threads']} threads); best: {layout_text(best['config'])}",
        fontsize=8,
    )


def _draw(study: Study, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawers = {
        "speedup_by_backend.png": _fig_speedup,
        "workers_threads.png": _fig_workers_threads,
        "batch_size.png": _fig_batch,
        "memory_pareto.png": _fig_pareto,
        "pipeline_stages.png": _fig_pipeline,
        "best_so_far.png": _fig_best_so_far,
        "importances.png": _fig_importances,
        "roofline.png": _fig_roofline,
    }
    written = []
    for name, draw in drawers.items():
        if name == "best_so_far.png":
            figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
            draw(study, axes)
        else:
            figure, ax = plt.subplots(figsize=(7.5, 4.2))
            draw(study, ax)
        figure.suptitle(FIGURES[name], fontsize=10)
        figure.tight_layout()
        path = directory / name
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


# ---------------------------------------------------------------- tables and documents


_COLUMNS = (
    "backend",
    "workers",
    "stages",
    "threads_per_worker",
    "batch_size",
    "quant",
    "dtype",
    "partition",
    "boundaries",
    "pinning",
    "kv_cache",
)


def top_rows(study: Study, count: int = 10) -> tuple[list[str], list[list[str]]]:
    """The best ``count`` configs, with only the config columns that vary among them."""
    best = sorted(study.done, key=lambda t: t["value"], reverse=True)[:count]
    columns = [c for c in _COLUMNS if len({str(t["config"].get(c)) for t in best}) > 1]
    base = study.baseline["value"] if study.baseline else None
    header = ["trial", *columns, "tokens/s", "x baseline", "peak memory (GiB)"]
    rows = []
    for trial in best:
        memory = (trial.get("result") or {}).get("peak_memory_bytes")
        rows.append(
            [
                str(trial["number"]),
                *(str(trial["config"].get(c)) for c in columns),
                f"{trial['value']:.1f}",
                f"{trial['value'] / base:.2f}" if base else "-",
                f"{memory / 2**30:.2f}" if memory else "-",
            ]
        )
    return header, rows


def _sections(study: Study) -> list[tuple[str, list]]:
    """(title, blocks) where a block is ("p", text), ("table", header, rows), ("img", name)."""
    summary = study.summary
    counts = {s: sum(t["state"] == s for t in study.trials) for s in ("complete", "fail", "pruned")}
    winner = summary.get("winner")
    intro = [
        (
            "p",
            f"{counts['complete']} trials measured, {counts['fail']} failed, "
            f"{counts['pruned']} pruned"
            + (
                " — the sweep was interrupted; this covers what finished."
                if summary.get("interrupted") or not summary.get("winner")
                else "."
            ),
        )
    ]
    if winner:
        line = (
            f"Winner: trial {winner['number']}, {layout_text(winner['config'])}, "
            f"{winner['value']:.1f} tokens/s"
        )
        paired = winner.get("paired")
        if paired:
            from autotune.sweep import describe_speedup

            line += f"; against the naive baseline {describe_speedup(paired)}"
        intro.append(("p", line + "."))
    if study.baseline:
        intro.append(
            (
                "p",
                f"Naive baseline (trial {study.baseline['number']}): "
                f"{layout_text(study.baseline['config'])}, "
                f"{study.baseline['value']:.1f} tokens/s.",
            )
        )
    sections = [("Summary", intro)]
    header, rows = top_rows(study)
    sections.append(
        ("Top configurations", [("table", header, rows)] if rows else [("p", "No trial finished.")])
    )
    sections.append(("Figures", [("img", name) for name in FIGURES]))
    failed = [
        [
            str(t["number"]),
            layout_text(t["config"]) if t.get("config") else "-",
            t.get("failure_class") or "-",
            _one_line(t.get("stderr_tail") or ""),
        ]
        for t in study.trials
        if t["state"] == "fail"
    ]
    pruned = [
        [
            str(t["number"]),
            layout_text(t["config"]) if t.get("config") else "-",
            t.get("reason") or "-",
        ]
        for t in study.trials
        if t["state"] == "pruned"
    ]
    blocks = []
    blocks.append(
        ("table", ["trial", "config", "class", "last line of stderr"], failed)
        if failed
        else ("p", "No trial failed.")
    )
    blocks.append(
        ("table", ["trial", "config", "why it was not run"], pruned)
        if pruned
        else ("p", "No trial was pruned.")
    )
    sections.append(("Failed and pruned trials", blocks))
    topo = study.machine.get("topology", {})
    machine = [
        [key, str(topo.get(key))]
        for key in (
            "cpu_model",
            "logical_cpus",
            "physical_cores",
            "threads_per_core",
            "usable_cpus",
            "memory_total_bytes",
            "memory_available_bytes",
        )
        if key in topo
    ]
    machine.append(["fingerprint", str(study.machine.get("fingerprint"))])
    machine.append(["model", str(study.machine.get("model"))])
    from autotune.provenance import versions

    machine += [[name, str(version)] for name, version in versions().items()]
    sections.append(("Machine and versions", [("table", ["", ""], machine)]))
    return sections


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:160]


def _markdown(study: Study, sections) -> str:
    out = [f"# autotune report: {study.name}", ""]
    for title, blocks in sections:
        out += [f"## {title}", ""]
        for block in blocks:
            if block[0] == "p":
                out += [block[1], ""]
            elif block[0] == "table":
                _, header, rows = block
                cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
                out.append("")
            else:
                name = block[1]
                out += [f"### {FIGURES[name]}", "", f"![{FIGURES[name]}]({name})", ""]
    return "\n".join(out)


def _html(study: Study, sections, directory: Path) -> str:
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>autotune report: {e(study.name)}</title><style>"
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>autotune report: {e(study.name)}</h1>",
    ]
    for title, blocks in sections:
        out.append(f"<h2>{e(title)}</h2>")
        for block in blocks:
            if block[0] == "p":
                out.append(f"<p>{e(block[1])}</p>")
            elif block[0] == "table":
                _, header, rows = block
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                out += [
                    "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows
                ]
                out.append("</table>")
            else:
                name = block[1]
                data = base64.b64encode((directory / name).read_bytes()).decode()
                out.append(
                    f"<h3>{e(FIGURES[name])}</h3>"
                    f"<img alt='{e(FIGURES[name])}' src='data:image/png;base64,{data}'>"
                )
    out.append("</body></html>")
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def build_report(study: Study) -> Report:
    """Draw every figure and write report.md and report.html into the study's directory."""
    figures = _draw(study, study.directory)
    sections = _sections(study)
    markdown, page = study.directory / "report.md", study.directory / "report.html"
    _write(markdown, _markdown(study, sections))
    _write(page, _html(study, sections, study.directory))
    top = sorted(study.done, key=lambda t: t["value"], reverse=True)[:10]
    return Report(markdown, page, figures, top)


def links(markdown: Path) -> list[str]:
    """The local files report.md links to (for checking that they resolve)."""
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text())
