"""The sweep on the terminal: a line per event while it runs (`SweepProgress`), the outcome
when it ends (`show_sweep`)."""

from __future__ import annotations

from autotune.console import console, key_value_table, layout_text
from autotune.failures import fix_for

__all__ = ["SweepProgress", "show_sweep"]


class SweepProgress:
    """Live progress of a sweep, a line per event: elapsed / budget, trials done / failed /
    pruned, the best so far and the trial running now. Lines (not a redrawn panel) so that a
    log file or CI output shows the same."""

    def __init__(self, budget_s: float, study: str) -> None:
        import time

        self.started = time.monotonic()
        self.budget_s = budget_s
        self.study = study
        self.counts = {"complete": 0, "fail": 0, "pruned": 0}
        self.best: tuple[float, str] | None = None
        self.baseline: float | None = None
        self._fixes_told: set[str] = set()  # failure classes whose fix was printed

    @staticmethod
    def _say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)  # one event, one line

    def _clock(self) -> str:
        import time

        from autotune.units import format_duration

        elapsed = time.monotonic() - self.started
        return f"[{format_duration(elapsed)} / {format_duration(self.budget_s)}]"

    def __call__(self, event) -> None:
        from autotune import sweep
        from autotune.study import Role

        c = self.counts
        tally = f"done {c['complete']} failed {c['fail']} pruned {c['pruned']}"
        if isinstance(event, sweep.TrialStarted):
            label = f" ({event.name})" if event.name else ""
            self._say(
                f"{self._clock()} {tally} | trial {event.number}{label}: "
                f"{layout_text(event.config)} ...",
            )
        elif isinstance(event, sweep.TrialEnded):
            record = event.record
            self.counts[record.state.value] += 1
            if record.state.value == "pruned" and not record.result:
                return  # never ran: counted; a line each would drown the trials that ran
            if record.state.value == "pruned":
                line = f"{record.result['tokens_per_s']:.1f} tok/s, pruned: {record.reason}"
                if record.quality is not None and "--min-quality" not in (record.reason or ""):
                    line += f" ({record.quality.describe()})"
            elif record.complete:
                if record.role is Role.BASELINE:
                    self.baseline = record.value
                if self.best is None or record.value > self.best[0]:
                    self.best = (record.value, layout_text(record.config))
                ratio = f" (x{record.value / self.baseline:.2f} baseline)" if self.baseline else ""
                line = f"{record.value:.1f} tok/s{ratio}"
                if (record.result or {}).get("stable") is False:  # its passes disagree
                    line += f" (passes spread {record.result['pass_spread']:.0%}: not stable)"
                if record.quality is not None:
                    line += f", {record.quality.describe()}"
                elif record.answers is not None:  # it is its family's reference
                    line += ", the reference of per-token quality"
                elif any("quality not measured" in w for w in record.result.get("warnings") or ()):
                    line += ", quality not measured (its backend cannot score)"
                if record.agreement and record.agreement.get("identical") is not None:
                    line += f", answers {record.agreement['identical']:.0%} identical"
            else:
                line = f"FAILED: {record.failure_class}"
                fix = fix_for(record.failure_class)
                if fix and record.failure_class not in self._fixes_told:  # once a sweep
                    self._fixes_told.add(record.failure_class)
                    line += f" ({fix})"
            best = f" | best {self.best[0]:.1f} tok/s: {self.best[1]}" if self.best else ""
            self._say(f"{self._clock()}   trial {record.number} {line}{best}")
        elif isinstance(event, sweep.ConfirmStarted):
            self._say(
                f"{self._clock()} re-measuring trial {event.number} "
                f"({layout_text(event.config)}) against the baseline, {event.pairs} A B pairs",
            )
        elif isinstance(event, sweep.ConfirmSkipped):
            self._say(f"{self._clock()} no time left to re-measure trial {event.number}")
        elif isinstance(event, sweep.ConfirmFailed):
            self._say(
                f"{self._clock()} re-measuring trial {event.number} failed: {event.failure_class}"
            )
        elif isinstance(event, sweep.Interrupted):
            self._say(f"{self._clock()} interrupted: keeping the finished trials")
        elif isinstance(event, sweep.LogRepaired):
            self._say(
                f"{self._clock()} {event.path}: cut off a torn last line ({len(event.dropped)} "
                "characters, a sweep killed while writing it); its trial is in the study"
            )
        elif isinstance(event, sweep.BackendDropped):
            self._say(f"{self._clock()} no more {event.backend} trials: {event.reason}")
        elif isinstance(event, sweep.SearchEnded):
            self._say(f"{self._clock()} search ended: {event.reason}; on to re-measuring")


def show_sweep(summary) -> None:
    """The sweep's outcome: winner, speedups, counts, files."""
    from autotune.agreement import describe_agreement
    from autotune.quality import describe_quality
    from autotune.stats import describe_speedup
    from autotune.study import TrialState
    from autotune.units import format_duration

    table = key_value_table(f"Sweep {summary.study} ({format_duration(summary.elapsed_s)})")
    table.add_row(
        "Trials",
        f"{summary.count(TrialState.COMPLETE)} measured, {summary.count(TrialState.FAIL)} "
        f"failed, {summary.count(TrialState.PRUNED)} pruned",
    )
    failures = [r for r in summary.trials if r.state is TrialState.FAIL]
    if failures:
        table.add_row("Failures", ", ".join(f"#{r.number} {r.failure_class}" for r in failures))
        for failure_class in sorted({r.failure_class for r in failures}):
            if fix := fix_for(failure_class):
                table.add_row(f"Fix ({failure_class})", fix)
    if summary.extra_buffers:
        table.add_row("llama.cpp extra buffers", summary.extra_buffers)
    base = summary.baseline
    if base:
        table.add_row("Naive baseline", f"{base.value:.1f} tok/s ({layout_text(base.config)})")
    top = summary.best_recipe
    if top:
        table.add_row(
            "Best seed recipe", f"{top.value:.1f} tok/s ({top.name}: {layout_text(top.config)})"
        )
    winner = summary.winner
    if winner:
        table.add_row("Winner", f"{layout_text(winner.config)} (trial {winner.number})")
        search = f"{winner.value:.1f} (its search trial)"
        if winner.paired and winner.paired.get("candidate"):
            import statistics

            median = statistics.median(winner.paired["candidate"])  # as the export header
            search += f"; {median:.1f} median of its paired runs"
        table.add_row("Winner tokens/s", search)
        if winner.quality is not None:
            table.add_row("Winner's tokens vs the source weights", describe_quality(winner))
        if winner.agreement and winner.agreement.get("compared"):
            table.add_row("Winner's answers vs batch 1", describe_agreement(winner.agreement))
        if winner.paired:
            table.add_row("Speedup vs baseline", describe_speedup(winner.paired))
        elif base:
            table.add_row(
                "Speedup vs baseline",
                f"x{winner.value / base.value:.2f} (single runs: not re-measured)",
            )
        if top and base:
            table.add_row("Winner vs best recipe", f"x{winner.value / top.value:.2f}")
        table.add_row(
            "SMT siblings",
            "used (more threads than usable physical cores)"
            if summary.uses_smt_siblings
            else "not used (threads <= usable physical cores)",
        )
    else:
        table.add_row("Winner", "none: no trial finished with every request answered")
    for backend, reason in summary.dropped.items():
        table.add_row(f"Dropped {backend}", reason)
    for name, reason in summary.skipped.items():
        table.add_row("Recipe not run", f"{name}: {reason}")
    if summary.note:
        table.add_row("Note", summary.note)
    table.add_row("Files", str(summary.directory))
    console.print(table)
