"""Rich tables for the terminal; every command's ``--json`` prints the same data unformatted."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from autotune.models import ModelSpec, WeightsSummary
from autotune.roofline import Roofline
from autotune.topology import Topology, format_cpulist

console = Console()
errors = Console(stderr=True)


_SCREENED = "screened on a CPU host: every value measured on the backend's fastest layout first"
_WEIGHTS = (
    "changes the weights: each value scored against the source weights by teacher forcing "
    "(top-1, KL), pruned under --min-quality"
)


def gib(value: int | None) -> str:
    """Bytes as GiB with two decimals, or '-'."""
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def key_value_table(title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    return table


def show_topology(topo: Topology, extra_buffers=None) -> None:
    """Print the machine table; ``extra_buffers``: the llama.cpp probe's verdict
    (`backends.llamacpp.probe.ExtraBuffersVerdict`), where it ran."""
    table = key_value_table("Machine")
    table.add_row("CPU", topo.cpu_model)
    table.add_row("Sockets", str(topo.sockets))
    table.add_row("Physical cores", str(topo.physical_cores))
    table.add_row("Logical CPUs", str(topo.logical_cpus))
    smt = f"on ({topo.threads_per_core} threads per core)" if topo.smt_enabled else "off"
    table.add_row("SMT", smt)
    if topo.smt_enabled:
        groups = topo.smt_siblings
        shown = ", ".join("+".join(map(str, g)) for g in groups[:4])
        table.add_row(
            "SMT siblings", shown + (f", ... ({len(groups)} cores)" if len(groups) > 4 else "")
        )
    for node in topo.numa_nodes:
        table.add_row(
            f"NUMA node {node.id}",
            f"CPUs {format_cpulist(node.cpus)}, {gib(node.memory_total_bytes)}",
        )
    usable = f"{topo.usable_cpus} (affinity {format_cpulist(topo.affinity_cpus)}"
    usable += f", cgroup quota {topo.cpu_quota:g} CPUs)" if topo.cpu_quota is not None else ")"
    table.add_row("Usable CPUs", usable)
    table.add_row("Memory total", gib(topo.memory_total_bytes))
    if topo.memory_limit_bytes is not None:
        table.add_row("cgroup memory limit", gib(topo.memory_limit_bytes))
    table.add_row("Memory available", gib(topo.memory_available_bytes))
    table.add_row("ISA", " ".join(topo.cpu_flags) or "-")
    gpus = ", ".join(f"{g.index}: {g.name} ({gib(g.memory_bytes)})" for g in topo.gpus)
    table.add_row("GPUs", gpus or "none")
    if topo.gpus:
        table.add_row(
            "llama.cpp offload",
            "yes (a CUDA build)"
            if topo.llama_gpu_offload
            else 'no: a CPU build (CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python)',
        )
    if extra_buffers is not None:
        table.add_row("llama.cpp extra buffers (AMX/repack)", extra_buffers.describe())
    table.add_row("Fingerprint", topo.fingerprint())
    console.print(table)


def show_roofline(roof: Roofline) -> None:
    """Print the measured limits and the model's bounds."""
    table = key_value_table(f"Limits ({roof.threads} threads)")
    spread = f"{min(roof.bandwidth_samples_gb_s):.1f}-{max(roof.bandwidth_samples_gb_s):.1f}"
    table.add_row(
        "Memory read bandwidth", f"{roof.memory_bandwidth_gb_s:.1f} GB/s (median; {spread})"
    )
    spread = f"{min(roof.gemm_samples_gflops):.1f}-{max(roof.gemm_samples_gflops):.1f}"
    table.add_row(
        f"fp32 GEMM {roof.gemm_size}^3", f"{roof.gemm_gflops:.1f} GFLOP/s (median; {spread})"
    )
    if roof.model is not None:
        table.add_row("Model", roof.model)
        table.add_row("Weights read per token", f"{roof.bytes_per_token / 1e6:.1f} MB")
        table.add_row("Parameters per token", f"{roof.parameters_per_token / 1e6:.1f} M")
        table.add_row(
            "Bound, batch 1 (bandwidth)", f"{roof.bound_batch1_tokens_per_s:.0f} tokens/s"
        )
        table.add_row(
            "Bound, any batch (compute)", f"{roof.bound_compute_tokens_per_s:.0f} tokens/s"
        )
    console.print(table)


def show_model(spec: ModelSpec, weights: WeightsSummary, cache: str) -> None:
    """Print what a model is and where its converted copy stands."""
    table = key_value_table("Model")
    table.add_row("Name", spec.name)
    table.add_row("Path", str(spec.path))
    table.add_row("Format", spec.format)
    table.add_row("Weights", weights.weight_type)
    table.add_row("Layers", str(weights.layers) if weights.layers is not None else "-")
    table.add_row("Parameters", f"{weights.parameters_total / 1e6:.1f} M")
    table.add_row("Size on disk", f"{weights.file_bytes / 1e6:.1f} MB")
    table.add_row("HF cache", cache)
    console.print(table)


def show_summary(title: str, summary: dict) -> None:
    """Print a flat dict as a two-column table."""
    table = key_value_table(title)
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def describe_figure(result) -> str:
    """A RunResult's tokens/s and what it is: the mean of its last passes (each the mean of
    its windows), their 95% interval, whether they agree, and how its windows spread."""
    from autotune.passes import STABLE_PASSES, describe_stability

    passes = min(result.repeats, STABLE_PASSES)
    each = "each the mean of its windows" if result.steady else "whole passes: no window"
    text = f"{result.tokens_per_s:.1f} (mean of the last {passes} pass(es), {each}"
    if result.tokens_per_s_low is not None:
        text += f"; 95% interval {result.tokens_per_s_low:.1f}-{result.tokens_per_s_high:.1f}"
    text += f"; {describe_stability(result.stable, result.pass_spread)}"
    if result.steady:
        text += f"; its windows spread {result.window_spread:.1%}"
    return text + ")"


def show_result(result) -> None:
    """Print one measured configuration."""
    from autotune.agreement import describe_agreement

    layout = layout_text(result.config)
    if result.details.get("boundaries"):  # a split the backend chose while loading
        layout += f" (layers {result.details['boundaries']})"
    table = key_value_table(f"Result ({layout})")
    table.add_row("Tokens/s", describe_figure(result))
    table.add_row(
        "Tokens/s, whole passes",
        f"{result.pass_tokens_per_s:.1f} (ramp-up and tail included; {result.repeats} passes "
        f"of {result.prompts} prompts)",
    )
    table.add_row("Requests/s", f"{result.requests_per_s:.2f}")
    if result.latency_p50_s is not None:
        table.add_row(
            "Latency p50 / p95", f"{result.latency_p50_s:.2f} s / {result.latency_p95_s:.2f} s"
        )
    table.add_row("Prefill tokens/s", f"{result.prefill_tokens_per_s:.1f} (prompt tokens computed)")
    if result.ttft_p50_s is not None:
        table.add_row(
            "Time to first token p50 / p95",
            f"{result.ttft_p50_s:.3f} s / {result.ttft_p95_s:.3f} s",
        )
    if result.tpot_p50_s is not None:
        table.add_row("Time per output token p50", f"{result.tpot_p50_s * 1000:.1f} ms")
    table.add_row("Load time", f"{result.load_time_s:.2f} s")
    table.add_row("Peak memory (PSS, all processes)", gib(result.peak_memory_bytes))
    if result.peak_gpu_memory_bytes:
        table.add_row(
            "Peak GPU memory (all processes)",
            ", ".join(f"GPU {g}: {gib(b)}" for g, b in result.peak_gpu_memory_bytes.items()),
        )
    if result.gpu_utilisation is not None:
        table.add_row("GPU utilisation", f"{result.gpu_utilisation:.0%} (nvidia-smi, mean)")
    table.add_row("CPU utilisation", f"{result.cpu_utilisation:.0%} of usable CPUs")
    table.add_row("Workload", f"{result.workload} ({result.prompts} prompts)")
    if result.failed_requests:
        table.add_row("Failed requests", str(result.failed_requests))
    if result.agreement and result.agreement["compared"]:
        table.add_row("Agreement with batch 1", describe_agreement(result.agreement))
    console.print(table)


def layout_text(config) -> str:
    """A config in a few words, as its backend describes it: ``llamacpp 2x1 b4 q4_0``."""
    from backends import describe

    return describe(config)


def show_report(study, report) -> None:
    """The report's top configurations and where its files are."""
    table = Table(title=f"Report {study.name}: top configurations", title_justify="left")
    base = study.baseline.value if study.baseline else None
    for column in ("trial", "layout", "tokens/s", "x baseline", "identical", "peak GiB"):
        table.add_column(column)
    for trial in report.top:
        memory = (trial.result or {}).get("peak_memory_bytes")
        identical = (trial.agreement or {}).get("identical")
        table.add_row(
            str(trial.number),
            layout_text(trial.config),
            f"{trial.value:.1f}",
            f"{trial.value / base:.2f}" if base else "-",
            f"{identical:.0%}" if identical is not None else "-",
            f"{memory / 2**30:.2f}" if memory else "-",
        )
    console.print(table if report.top else "no trial finished")
    console.print(f"report: {report.markdown}  {report.html}  ({len(report.figures)} figures)")


class _Advance:
    """The callable(done, total) `progress_bar` yields: the bar appears at its first call, so
    a job that fails before any progress (its output held by another run, a worker that will
    not load) prints its one error line and no bar."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.progress: Any = None  # a rich Progress, from the first call
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.progress = Progress(
                f"[bold]{self.label}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=errors,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=None)
        self.progress.update(self.task, completed=done, total=total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def progress_bar(label: str):
    """A rich progress bar (on stderr) as a context manager; yields a callable(done, total)
    (`_Advance`)."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        advance = _Advance(label)
        try:
            yield advance
        finally:
            advance.stop()

    return bar()


def show_run(stats, output) -> None:
    """Seed 003's summary: per worker items, errors, success rate, mean time."""
    table = Table(title=f"Run: {output}", title_justify="left")
    for column in ("worker", "items", "errors", "success rate", "mean time (s)"):
        table.add_column(column)
    for rank, mine in sorted(stats.workers.items()):
        table.add_row(
            "restarted chunk (failed)" if rank < 0 else str(rank),
            str(mine["items"]),
            str(mine["errors"]),
            f"{1 - mine['errors'] / mine['items']:.1%}",
            f"{mine['seconds'] / mine['items']:.3f}",
        )
    console.print(table)
    if stats.skipped:
        console.print(f"{stats.skipped} lines already answered in an earlier run: skipped")
    if stats.restarts:
        console.print(f"the backend was restarted {stats.restarts} times (a worker died)")


def verify_range(recorded: dict) -> tuple[float, float, str] | None:
    """The tokens/s `autotune verify` accepts for an exported config, and why: the 95%
    prediction interval of the paired runs' figures (their spread: where one more run of
    the same job falls), else +-15% of the one figure recorded; None without one."""
    from autotune.stats import prediction_interval

    runs = recorded.get("paired_runs") or []
    if len(runs) >= 2:
        low, high = prediction_interval(runs)
        return max(0.0, low), high, f"95% prediction interval of the {len(runs)} paired runs"
    expected = recorded.get("paired_tokens_per_s") or recorded.get("tokens_per_s")
    if not expected:
        return None
    return expected * 0.85, expected * 1.15, "+-15%: no spread recorded"


def show_verify(recorded: dict, result, fingerprint: str) -> tuple[list[str], bool]:
    """The exported figures beside the ones measured now; returns the warnings and whether
    the figure measured now is inside the accepted range (`verify_range`)."""
    table = key_value_table("Verify: the exported config, measured here")
    table.add_row("Measured now", describe_figure(result))
    warnings = []
    inside = True
    # The paired runs' figure where the header has it: the search trial's is one run, the
    # best of many, and so biased high.
    expected = recorded.get("paired_tokens_per_s") or recorded.get("tokens_per_s")
    accepted = verify_range(recorded)
    if expected and accepted:
        ratio = result.tokens_per_s / expected
        which = "paired runs" if recorded.get("paired_tokens_per_s") else "search trial"
        table.add_row(
            f"Recorded at export ({which})", f"{expected:.1f} tokens/s (now x{ratio:.2f})"
        )
        low, high, why = accepted
        table.add_row("Accepted range", f"{low:.1f}-{high:.1f} tokens/s ({why})")
        if not low <= result.tokens_per_s <= high:
            inside = False
            warnings.append(
                f"{result.tokens_per_s:.1f} tokens/s is outside the recorded range "
                f"({low:.1f}-{high:.1f}, {why})"
            )
    else:
        warnings.append("the env file records no measured tokens/s to compare with")
    table.add_row("Machine fingerprint", f"{fingerprint} (recorded {recorded.get('fingerprint')})")
    if recorded.get("fingerprint") and recorded["fingerprint"] != fingerprint:
        warnings.append(
            f"this machine's fingerprint {fingerprint} differs from the recorded "
            f"{recorded['fingerprint']}: the config was tuned elsewhere"
        )
    console.print(table)
    return warnings, inside


def show_plan(plan: dict) -> None:
    """`autotune plan`: per backend its knobs and values, or why it is left out."""
    machine = plan["machine"]
    console.print(
        f"Plan for {machine['source']} (fingerprint {machine['fingerprint']}): "
        f"{machine['usable_cpus']} usable CPUs, {machine['physical_cores']} physical cores, "
        f"{machine['threads_per_core']} threads per core, {machine['gpus']} GPUs, "
        f"{gib(machine['memory_available_bytes'])} available; model {plan['model']['name']} "
        f"({plan['model']['layers']} layers)",
        highlight=False,
    )
    for name, backend in plan["backends"].items():
        if "excluded" in backend:
            console.print(f"[bold]{name}[/bold]: left out: {backend['excluded']}", highlight=False)
            continue
        table = Table(title=f"{name}: {backend['size']} layouts", title_justify="left")
        for column in ("knob", "values", "constraint"):
            table.add_column(column)
        for knob in backend["knobs"]:
            values = knob["values"]
            if knob["ordered"] and len(values) > 6:
                shown = f"{values[0]}, {values[1]}, ... {values[-1]} ({len(values)} values)"
            else:
                shown = ", ".join("file's own" if v is None else str(v) for v in values)
            notes = [
                knob["note"],
                _SCREENED if knob["screen"] else "",
                _WEIGHTS if knob.get("weights") else "",
            ]
            table.add_row(knob["name"], shown, "; ".join(n for n in notes if n))
        console.print(table)
    console.print(
        f"Space: {plan['size']} layouts; memory limit {gib(plan['memory_limit_bytes'])} "
        f"(80% of available); naive baseline: {layout_text(plan['baseline'])}",
        highlight=False,
    )
    if plan["examples"]:
        console.print(
            "Drawn by the sweep's sampler: "
            + "; ".join(layout_text(example) for example in plan["examples"][:8])
            + (" ..." if len(plan["examples"]) > 8 else ""),
            highlight=False,
        )
