"""The machine, the model and a workload as autotune sees them: `autotune detect`, `autotune
model`, `autotune workload`."""

from __future__ import annotations

import argparse

from autotune.cli.common import extra_buffers_verdict, print_json, warn_bad_lines

__all__ = ["register"]


def cmd_detect(args: argparse.Namespace) -> int:
    from autotune import models, topology

    topo = topology.detect()
    data = topo.to_dict()
    verdict = extra_buffers_verdict()
    data["llama_extra_buffers"] = verdict.to_dict()
    roof = None
    if args.roofline:
        from autotune import roofline

        spec = models.ModelSpec.resolve(args.model)
        weights = models.weights_summary(spec)
        # A buffer far beyond any cache, but never more than an eighth of free memory.
        buffer_bytes = max(64 * 2**20, min(2**30, topo.memory_available_bytes // 8))
        roof = roofline.measure(
            threads=topo.usable_cpus,
            buffer_bytes=buffer_bytes,
            weights=weights,
            model_name=spec.name,
        )
        data.update(roof.to_dict())
    if args.json:
        print_json(data)
        return 0
    from autotune import console

    console.show_topology(topo, verdict)
    if roof is not None:
        console.show_roofline(roof)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from autotune import models
    from autotune.cache import cache_entry_problem

    spec = models.ModelSpec.resolve(args.model)
    weights = models.weights_summary(spec)
    if spec.format == "hf":
        cache = "not needed (an HF directory)"
    else:
        if args.prepare:  # hf_dir verifies or builds the entry: it is ready when it returns
            cache = f"{models.hf_dir(spec)} (ready)"
        else:
            sha = spec.sha256()
            entry = models.hf_cache_entry(spec, source_sha256=sha)
            problem = cache_entry_problem(entry, sha)
            cache = f"{entry} ({problem or 'ready'})"
    if args.json:
        print_json(
            {
                "name": spec.name,
                "path": str(spec.path),
                "format": spec.format,
                "embedded": spec.embedded,
                "hf_cache": cache,
                **weights.__dict__,
            }
        )
        return 0
    from autotune import console

    console.show_model(spec, weights, cache)
    return 0


def cmd_workload(args: argparse.Namespace) -> int:
    from autotune.workload import load_workload

    workload = load_workload(args.file, strict=args.strict, source="workload")
    lengths = sorted(len(p.text) for p in workload.prompts)
    summary = {
        "name": workload.name,
        "prompts": len(workload),
        "shapes": workload.shapes,
        "bad_lines": len(workload.errors),
        "prompt_chars_min": lengths[0],
        "prompt_chars_median": lengths[len(lengths) // 2],
        "prompt_chars_max": lengths[-1],
    }
    warn_bad_lines(workload)
    if args.json:
        print_json({**summary, "errors": [str(e) for e in workload.errors]})
        return 0
    from autotune import console

    console.show_summary(f"Workload {workload.name}", summary)
    return 0


def register(sub) -> None:
    """The subcommands detect, model and workload."""
    detect = sub.add_parser("detect", help="show this machine's topology and limits")
    detect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    detect.add_argument(
        "--roofline",
        action="store_true",
        help="measure memory bandwidth and fp32 GEMM GFLOP/s, and the model's tokens/s bounds",
    )
    detect.add_argument(
        "--model", metavar="M", help="GGUF file or HF directory for --roofline (default: embedded)"
    )
    detect.set_defaults(handler=cmd_detect)

    model = sub.add_parser("model", help="show a model's weights and its converted HF copy")
    model.add_argument("--model", metavar="M", help="GGUF file or HF directory (default: embedded)")
    model.add_argument(
        "--prepare", action="store_true", help="build the HF copy of a GGUF now (once, cached)"
    )
    model.add_argument("--json", action="store_true", help="print JSON instead of a table")
    model.set_defaults(handler=cmd_model)

    workload = sub.add_parser("workload", help="check a prompts JSONL and summarise it")
    workload.add_argument("file", nargs="?", help="JSONL file (default: the shipped workload)")
    workload.add_argument("--strict", action="store_true", help="any bad line is fatal (exit 2)")
    workload.add_argument("--json", action="store_true", help="print JSON instead of a table")
    workload.set_defaults(handler=cmd_workload)
