"""The report's documents: the tables (the top configs with only the columns that vary, the
failures, the machine), and report.md and report.html built from the same sections."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from autotune.console import layout_text
from autotune.report.data import Study
from autotune.report.figures import CAPTIONS, FIGURES
from autotune.stats import describe_speedup
from autotune.study import TrialState

__all__ = ["html_text", "markdown_text", "sections", "top_rows"]


# Config fields shown as columns, when a backend in the table reads them and they vary.
_COLUMNS = (
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
    """The best ``count`` configs, with only the config columns that vary among them (and
    that one of their backends reads)."""
    from backends import fields_read

    best = sorted(study.done, key=lambda t: t.value, reverse=True)[:count]
    read = set().union(*(fields_read(t.backend) for t in best)) if best else set()
    columns = ["backend"] if len({t.backend for t in best}) > 1 else []
    columns += [
        c for c in _COLUMNS if c in read and len({str(getattr(t.config, c)) for t in best}) > 1
    ]
    base = study.baseline.value if study.baseline else None
    header = [
        "trial",
        *columns,
        "tokens/s",
        "x baseline",
        "window spread",
        "top-1 / KL vs source",
        "answers identical",
        "peak memory (GiB)",
    ]
    rows = []
    for trial in best:
        result = trial.result or {}
        memory = result.get("peak_memory_bytes")
        spread = result.get("window_spread")
        identical = (trial.agreement or {}).get("identical")
        quality = trial.quality
        scored = "-" if quality is None else f"{quality.top1:.1%} / {quality.kld_mean:.4f}"
        if quality is not None and quality.requantized_from:
            scored += f" (requantized from {quality.requantized_from})"
        rows.append(
            [
                str(trial.number),
                *(str(getattr(trial.config, c)) for c in columns),
                f"{trial.value:.1f}",
                f"{trial.value / base:.2f}" if base else "-",
                "-"
                if spread is None
                # Not stable: its passes disagreed (one pass is not compared).
                else f"{spread:.1%}" + (" (not stable)" if result.get("stable") is False else ""),
                scored,
                f"{identical:.0%}" if identical is not None else "-",
                f"{memory / 2**30:.2f}" if memory else "-",
            ]
        )
    return header, rows


def sections(study: Study) -> list[tuple[str, list]]:
    """(title, blocks) where a block is ("p", text), ("table", header, rows), ("img", name)."""
    summary = study.summary
    counts = {s.value: sum(t.state is s for t in study.trials) for s in TrialState}
    winner = study.winner
    intro = [
        (
            "p",
            f"{counts['complete']} trials measured, {counts['fail']} failed, "
            f"{counts['pruned']} pruned"
            + (
                " — the sweep was interrupted; this covers what finished."
                if summary is None or summary.interrupted or not summary.winner
                else "."
            ),
        )
    ]
    if winner:
        line = (
            f"Winner: trial {winner.number}, {layout_text(winner.config)}, "
            f"{winner.value:.1f} tokens/s"
        )
        if winner.paired:
            line += f"; against the naive baseline {describe_speedup(winner.paired)}"
        intro.append(("p", line + "."))
    if study.baseline:
        intro.append(
            (
                "p",
                f"Naive baseline (trial {study.baseline.number}): "
                f"{layout_text(study.baseline.config)}, "
                f"{study.baseline.value:.1f} tokens/s.",
            )
        )
    sections = [("Summary", intro)]
    header, rows = top_rows(study)
    sections.append(
        ("Top configurations", [("table", header, rows)] if rows else [("p", "No trial finished.")])
    )
    sections.append(("Figures", [("img", figure.name) for figure in FIGURES]))
    failed = [
        [
            str(t.number),
            layout_text(t.config) if t.config else "-",
            t.failure_class or "-",
            _one_line(t.stderr_tail),
        ]
        for t in study.trials
        if t.state is TrialState.FAIL
    ]
    pruned = [
        [str(t.number), layout_text(t.config) if t.config else "-", t.reason or "-"]
        for t in study.trials
        if t.state is TrialState.PRUNED
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
    # What the search itself left out: backends dominated after their climb, recipes that no
    # longer fitted the time left (`autotune.sweep`).
    left_out = [
        [f"backend {name}", why] for name, why in (summary.dropped if summary else {}).items()
    ]
    left_out += [[name, why] for name, why in (summary.skipped if summary else {}).items()]
    if left_out:
        blocks.append(("table", ["not searched further", "why"], left_out))
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


def markdown_text(study: Study, sections) -> str:
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
                out += [f"### {CAPTIONS[name]}", "", f"![{CAPTIONS[name]}]({name})", ""]
    return "\n".join(out)


def html_text(study: Study, sections, directory: Path) -> str:
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
                    f"<h3>{e(CAPTIONS[name])}</h3>"
                    f"<img alt='{e(CAPTIONS[name])}' src='data:image/png;base64,{data}'>"
                )
    out.append("</body></html>")
    return "\n".join(out)
