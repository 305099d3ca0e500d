"""The search space, conditional on the backend and bounded by the machine.

`suggest` turns an Optuna trial into a TrialConfig. Parameters are named per backend
(``llamacpp.workers``, ``hf.batch_size`` ...), so each backend's sub-space is learned on its
own. A suggestion that the machine cannot run (more threads than usable CPUs, more stages than
layers) raises `Unfit` with the reason, and the sweep records it as pruned without running it.

`baseline` and `recipes` are the fixed layouts the sweep measures first: the naive baseline
every speedup is relative to, and the seeds' hand-made recipes fitted to this machine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from autotune.config import QUANTS, TrialConfig
from autotune.topology import Topology

__all__ = ["Fixed", "SearchSpace", "Unfit"]

TORCH_BACKENDS = ("hf", "ddp", "pipeline")


class Unfit(Exception):
    """The suggested config does not fit this machine; the message says why."""


@dataclass(frozen=True)
class Fixed:
    """A layout measured as it is (the baseline, a seed's recipe)."""

    name: str
    role: str  # "baseline" or "recipe"
    params: dict


class SearchSpace:
    """What may be tried on this machine, for this model."""

    def __init__(
        self,
        topology: Topology,
        backends: list[str],
        layers: int,
        base: TrialConfig,
        batch_cap: int = 64,
    ) -> None:
        self.topology = topology
        self.backends = backends
        self.layers = layers
        self.base = base  # generation settings and model, shared by every trial
        self.cpus = topology.usable_cpus
        self.batch_exponents = int(math.log2(batch_cap))
        self.smt = topology.threads_per_core > 1
        flags = set(topology.cpu_flags)
        # bfloat16 only where the CPU computes it natively (or on a GPU).
        self.dtypes = ["float32"]
        if topology.gpus or flags & {"avx512_bf16", "amx_bf16"}:
            self.dtypes.append("bfloat16")

    # ------------------------------------------------------------ suggestions

    def suggest(self, trial) -> TrialConfig:
        """A config for ``trial`` (raises Unfit for one the machine cannot run)."""
        backend = trial.suggest_categorical("backend", self.backends)
        p = f"{backend}."
        cpus = self.cpus
        batch = 2 ** trial.suggest_int(p + "batch_exp", 0, self.batch_exponents)
        changes: dict = {"backend": backend, "batch_size": batch}
        if backend == "pipeline":
            stages = trial.suggest_int(p + "stages", 2, max(2, min(cpus, self.layers, 8)))
            changes["stages"] = stages
            processes = stages
        elif backend == "hf":
            processes = 1
        else:
            low = 2 if backend == "ddp" else 1  # ddp with one rank is hf
            processes = trial.suggest_int(p + "workers", low, max(low, cpus))
            changes["workers"] = processes
        threads = trial.suggest_int(p + "threads_per_worker", 1, max(1, cpus // processes))
        changes["threads_per_worker"] = threads
        if processes * threads > cpus:
            raise Unfit(
                f"{processes} processes x {threads} threads = {processes * threads} is more than "
                f"the {cpus} usable CPUs"
            )
        if backend == "pipeline" and changes["stages"] > self.layers:
            raise Unfit(f"{changes['stages']} stages for {self.layers} layers")
        if backend == "llamacpp":
            quant = trial.suggest_categorical(p + "quant", ["model", *QUANTS])
            changes["quant"] = None if quant == "model" else quant
        if backend in TORCH_BACKENDS:
            changes["dtype"] = trial.suggest_categorical(p + "dtype", self.dtypes)
        if backend == "pipeline":
            changes.update(self._partition(trial, p, changes["stages"]))
        if backend in ("llamacpp", "ddp") and processes > 1:
            # compact keeps SMT siblings together; on a machine without SMT it equals spread.
            choices = ["none", "compact", "spread"] if self.smt else ["none", "spread"]
            changes["pinning"] = trial.suggest_categorical(p + "pinning", choices)
        return self.base.replace(**changes)

    def _partition(self, trial, p: str, stages: int) -> dict:
        """Strategy, or the uniform split shifted by an offset (custom boundaries)."""
        from backends.partition import format_boundaries, uniform

        strategy = trial.suggest_categorical(p + "partition", ["uniform", "compute", "shifted"])
        if strategy != "shifted":
            return {"partition": strategy}
        shift = trial.suggest_int(p + "boundary_shift", -3, 3)
        ranges = uniform(self.layers, stages)
        cuts = [r.stop for r in ranges[:-1]]
        # Shift every cut, keeping each stage at least one layer.
        moved = []
        for index, cut in enumerate(cuts):
            low = (moved[-1] if moved else 0) + 1
            high = self.layers - (len(cuts) - index)
            moved.append(min(max(cut + shift, low), high))
        edges = [0, *moved, self.layers]
        ranges = [range(a, b) for a, b in zip(edges, edges[1:], strict=False)]
        return {"partition": "custom", "boundaries": format_boundaries(ranges)}

    # ------------------------------------------------------------ fixed layouts

    def baseline(self) -> Fixed:
        """The naive baseline: llama.cpp, 1 worker, llama-cpp-python's default threads (half
        the CPUs it counts), batch 1 — what a user gets without tuning."""
        backend = "llamacpp" if "llamacpp" in self.backends else self.backends[0]
        default_threads = max(1, min(self.cpus, (os.cpu_count() or 2) // 2))
        params = {"backend": backend, f"{backend}.batch_exp": 0}
        params[f"{backend}.threads_per_worker"] = default_threads
        if backend == "llamacpp":
            params.update({"llamacpp.workers": 1, "llamacpp.quant": "model"})
        elif backend == "fake":
            params["fake.workers"] = 1
        else:
            params.update(self._torch_defaults(backend))
        return Fixed(
            f"naive baseline: {backend} 1 x {default_threads} threads, batch 1", "baseline", params
        )

    def _torch_defaults(self, backend: str) -> dict:
        params = {f"{backend}.dtype": "float32"}
        if backend == "ddp":
            params["ddp.workers"] = 2
            params["ddp.pinning"] = "none"
        if backend == "pipeline":
            params.update({"pipeline.stages": 2, "pipeline.partition": "uniform"})
        return params

    def recipes(self) -> list[Fixed]:
        """Seed 001's PARALLEL_WORKERS x threads grid (all usable CPUs, batch 1) and seed 000's
        transformers batch 4 and 8, for the backends in the sweep."""
        found = []
        if "llamacpp" in self.backends:
            workers = 1
            while workers <= self.cpus:
                threads = self.cpus // workers
                params = {
                    "backend": "llamacpp",
                    "llamacpp.workers": workers,
                    "llamacpp.threads_per_worker": threads,
                    "llamacpp.batch_exp": 0,
                    "llamacpp.quant": "model",
                }
                if workers > 1:
                    params["llamacpp.pinning"] = "none"
                found.append(
                    Fixed(f"seed 001: {workers} workers x {threads} threads", "recipe", params)
                )
                workers *= 2
        if "hf" in self.backends:
            for batch in (4, 8):
                params = {
                    "backend": "hf",
                    "hf.batch_exp": int(math.log2(batch)),
                    "hf.threads_per_worker": self.cpus,
                    "hf.dtype": "float32",
                }
                found.append(Fixed(f"seed 000: transformers batch {batch}", "recipe", params))
        return found
