"""Rich tables for the terminal; every command's ``--json`` prints the same data unformatted."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from autotune.models import ModelSpec, WeightsSummary
from autotune.roofline import Roofline
from autotune.topology import Topology, format_cpulist

console = Console()
errors = Console(stderr=True)


def gib(value: int | None) -> str:
    """Bytes as GiB with two decimals, or '-'."""
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def key_value_table(title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    return table


def show_topology(topo: Topology) -> None:
    """Print the machine table."""
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


def show_result(result) -> None:
    """Print one measured configuration."""
    config = result.config
    if config["backend"] == "pipeline":
        processes = f"{config['stages']} stages ({result.details.get('boundaries')})"
    else:
        processes = str(config["workers"])
    layout = (
        f"{config['backend']}: {processes} x {config['threads_per_worker']} threads, "
        f"batch {config['batch_size']}"
    )
    table = key_value_table(f"Result ({layout})")
    summary = result.tokens_per_s_summary
    table.add_row(
        "Tokens/s",
        f"{result.tokens_per_s:.1f} (median of {summary['n']}; "
        f"{summary['min']:.1f}-{summary['max']:.1f}, CV {summary['cv']:.1%})",
    )
    table.add_row("Requests/s", f"{result.requests_per_s:.2f}")
    if result.latency_p50_s is not None:
        table.add_row(
            "Latency p50 / p95", f"{result.latency_p50_s:.2f} s / {result.latency_p95_s:.2f} s"
        )
    if result.ttft_p50_s is not None:
        table.add_row("Time to first token p50", f"{result.ttft_p50_s:.3f} s")
    table.add_row("Load time", f"{result.load_time_s:.2f} s")
    table.add_row("Peak memory (PSS, all processes)", gib(result.peak_memory_bytes))
    table.add_row("CPU utilisation", f"{result.cpu_utilisation:.0%} of usable CPUs")
    table.add_row("Workload", f"{result.workload} ({result.prompts} prompts)")
    if result.failed_requests:
        table.add_row("Failed requests", str(result.failed_requests))
    console.print(table)
