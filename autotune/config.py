"""`TrialConfig`: one configuration of every tunable, carried from the search to the backend.

The search builds it, the trial runner passes it to the child as JSON, the backend reads it.
Each field carries its own help text and CLI flag in its metadata, so the command line is
generated from this one definition.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Collection
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

from autotune.errors import ConfigError
from autotune.placement import parse_placement
from autotune.workload import GenerationSettings

__all__ = [
    "DTYPES",
    "FAULTS",
    "PARTITIONS",
    "PINNING",
    "QUANTS",
    "TrialConfig",
    "env_name",
    "field_default",
]

# GGUF weight types llama.cpp can make from any GGUF (llama_ftype names, lower case).
QUANTS = ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_1", "q4_0")
DTYPES = ("float32", "bfloat16", "float16")
PINNING = ("none", "compact", "spread")
PARTITIONS = ("uniform", "memory", "compute", "custom")
# Failures the fake backend produces on request, for tests of everything above the backends.
FAULTS = ("none", "crash", "oom", "sigill", "hang", "error")


def _field(default: Any, flag: str | None, help: str, **extra: Any):
    return field(default=default, metadata={"flag": flag, "help": help, **extra})


@dataclass(frozen=True, kw_only=True)
class TrialConfig:
    """Every tunable of one trial; validated on construction."""

    backend: str = _field("llamacpp", "--backend", "backend to run")
    workers: int = _field(1, "--workers", "processes (llama.cpp workers, DDP ranks)")
    threads_per_worker: int = _field(1, "--threads", "threads in each worker process")
    batch_size: int = _field(1, "--batch-size", "sequences decoded together per worker")
    prefill_threads: int | None = _field(
        None,
        "--prefill-threads",
        "llama.cpp threads for prompt processing (n_threads_batch; default: --threads)",
    )
    quant: str | None = _field(
        None,
        "--quant",
        "GGUF weight type for llama.cpp (default: the model file's own)",
        choices=QUANTS,
    )
    dtype: str = _field("float32", "--dtype", "torch dtype for the torch backends", choices=DTYPES)
    n_batch: int = _field(512, "--n-batch", "llama.cpp prompt tokens per decode step (-b)")
    ctx_per_sequence: int = _field(
        1024, "--ctx-per-sequence", "KV cache tokens per sequence (prompt + new tokens)"
    )
    pinning: str = _field(
        "none",
        "--pinning",
        "CPU pinning of workers: none, compact (SMT siblings together), "
        "spread (physical cores first)",
        choices=PINNING,
    )
    placement: str | None = _field(
        None,
        "--placement",
        "the device of each process in order, comma separated: cpu, cuda:0, or a block of GPUs "
        "cuda:0+1; a GPU named twice is shared (default: the GPUs split evenly over the "
        "processes, shared round robin where they are fewer, seed 003)",
    )
    gpu_layers: int = _field(
        0,
        "--gpu-layers",
        "llama.cpp layers offloaded to the GPU (n_gpu_layers; -1: all); needs a CUDA build "
        "of llama-cpp-python",
    )
    extra_buffers: bool | None = _field(
        None,
        None,
        "llama.cpp's extra buffer types for the weights (AMX, CPU repack); default: on, "
        "unless autotune's probe found that they trap on this CPU (then off)",
        on_flag="--extra-buffers",
        on_help="llama.cpp: load the weights into the extra buffer types (AMX, CPU repack), "
        "as llama.cpp does by default (default: on unless they trap on this CPU)",
        off_flag="--no-extra-buffers",
        off_help="llama.cpp: keep the weights out of the extra buffer types (AMX, CPU repack); "
        "the fix where the CPU advertises AMX but traps it (SIGILL)",
    )
    stages: int = _field(1, "--stages", "pipeline stages (pipeline backend)")
    partition: str = _field(
        "uniform", "--partition", "how the pipeline splits layers", choices=PARTITIONS
    )
    boundaries: str | None = _field(
        None, "--boundaries", "layers of each stage for --partition custom, e.g. 0-13,14-29"
    )
    stage_memory_gb: float | None = _field(
        None,
        "--stage-memory-gb",
        "memory cap per pipeline stage in GB, weights + KV cache "
        "(default: available memory / stages)",
    )
    kv_cache: bool = _field(
        True,
        None,
        "keep each stage's KV cache between steps (pipeline backend)",
        off_flag="--no-kv-cache",
        off_help="pipeline: recompute the whole sequence every step "
        "(to measure what the cache gives)",
    )
    model: str | None = _field(None, "--model", "GGUF file or HF directory (default: embedded)")
    max_new_tokens: int = _field(64, "--max-new-tokens", "tokens to generate per prompt")
    temperature: float = _field(0.0, "--temperature", "0 = greedy")
    top_p: float = _field(1.0, "--top-p", "nucleus sampling threshold")
    seed: int = _field(0, "--seed", "sampling seed")
    chat_template: bool = _field(
        True,
        None,
        "format prompts with the model's chat template",
        off_flag="--no-chat-template",
        off_help="send prompts as raw text, without the model's chat template",
    )
    ignore_eos: bool = _field(
        False,
        None,
        "generate exactly max_new_tokens for every prompt",
        on_flag="--ignore-eos",
        on_help="generate exactly --max-new-tokens for every prompt (end-of-sequence does not "
        "stop it), so every layout does the same work",
    )
    fault: str = _field("none", "--fault", "fake backend only: fail on purpose", choices=FAULTS)

    def __post_init__(self) -> None:
        # Field by field only: which fields a backend reads (and so may differ from their
        # defaults) is the backend's to check (`backends.check_config`).
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"backend must be a name, got {self.backend!r}")
        for name in (
            "workers",
            "threads_per_worker",
            "batch_size",
            "n_batch",
            "stages",
            "ctx_per_sequence",
            "max_new_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            # numpy's default_rng, which every llama.cpp worker seeds from it, refuses < 0.
            raise ConfigError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if self.prefill_threads is not None and (
            not isinstance(self.prefill_threads, int) or self.prefill_threads < 1
        ):
            raise ConfigError(
                f"prefill_threads must be a whole number >= 1, got {self.prefill_threads!r}"
            )
        if (
            not isinstance(self.gpu_layers, int)
            or isinstance(self.gpu_layers, bool)
            or self.gpu_layers < -1
        ):
            raise ConfigError(
                f"gpu_layers must be -1 (all) or a whole number >= 0, got {self.gpu_layers!r}"
            )
        if self.extra_buffers is not None and not isinstance(self.extra_buffers, bool):
            raise ConfigError(
                f"extra_buffers must be true, false or unset, got {self.extra_buffers!r}"
            )
        if self.placement is not None:
            parse_placement(self.placement)  # the syntax; the devices are the machine's to check
        if self.quant is not None:
            object.__setattr__(self, "quant", self.quant.lower())
        for name, allowed in (
            ("quant", QUANTS),
            ("dtype", DTYPES),
            ("pinning", PINNING),
            ("partition", PARTITIONS),
            ("fault", FAULTS),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.workers > 1 and self.stages > 1:
            raise ConfigError(
                f"workers ({self.workers}) and stages ({self.stages}) cannot both be above 1: "
                "a layout runs data-parallel workers or pipeline stages"
            )
        if self.boundaries is not None and not re.fullmatch(r"\d+-\d+(,\d+-\d+)*", self.boundaries):
            raise ConfigError(f"boundaries must look like 0-13,14-29, got {self.boundaries!r}")
        if (self.partition == "custom") != (self.boundaries is not None):
            raise ConfigError(
                "--partition custom and --boundaries go together "
                f"(got partition {self.partition!r}, boundaries {self.boundaries!r})"
            )
        if self.stage_memory_gb is not None and not self.stage_memory_gb > 0:
            raise ConfigError(f"stage_memory_gb must be > 0, got {self.stage_memory_gb!r}")
        if self.stage_memory_gb is not None and self.partition != "memory":
            raise ConfigError("--stage-memory-gb is the cap of --partition memory")
        _ = self.generation  # building the generation settings validates temperature, top_p

    @property
    def generation(self) -> GenerationSettings:
        """The generation settings part of this config."""
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            chat_template=self.chat_template,
            ignore_eos=self.ignore_eos,
        )

    @property
    def processes(self) -> int:
        """Model processes the layout runs: workers x stages (a backend reads one of the two,
        the other stays 1)."""
        return self.workers * self.stages

    @property
    def total_threads(self) -> int:
        """Threads over all processes: INFERENCE_NUM_THREADS as seed 001 uses it."""
        return self.processes * self.threads_per_worker

    def to_env(self, only: Collection[str] | None = None) -> dict[str, str]:
        """The env var contract (shared/DESIGN.md). With ``only`` (the fields a backend reads,
        `backends.fields_read`), just those; fields left out are at their defaults, so
        `from_env` still restores the config.

        ``PARALLEL_WORKERS`` counts processes (the pipeline's stages); ``INFERENCE_NUM_THREADS``
        is the total over them, as seed 001 uses it; ``OMP_NUM_THREADS`` is per process.
        """
        env = {
            "PARALLEL_WORKERS": str(self.processes),
            "INFERENCE_NUM_THREADS": str(self.total_threads),
            "OMP_NUM_THREADS": str(self.threads_per_worker),
        }
        for f in fields(self):
            name = env_name(f.name)
            value = getattr(self, f.name)
            if name is None or value is None or (only is not None and f.name not in only):
                continue
            env[name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TrialConfig:
        """A TrialConfig from the env var contract; a bad value is a ConfigError naming the
        variable. Variables left out keep the field defaults."""
        import os

        env = os.environ if env is None else env
        given: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            if name is None or name not in env or env[name] == "":
                continue
            raw = env[name]
            kind = str(f.type).split(" |")[0]
            try:
                if kind == "bool":
                    if raw not in ("0", "1", "true", "false"):
                        raise ValueError
                    given[f.name] = raw in ("1", "true")
                else:
                    given[f.name] = {"int": int, "float": float}.get(kind, str)(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: not a valid {kind}") from None
        # PARALLEL_WORKERS counts processes: the pipeline's stages where PIPELINE_STAGES is set
        # (checked below to agree), else the workers.
        if "PARALLEL_WORKERS" in env and given.get("stages", 1) == 1:
            try:
                given["workers"] = int(env["PARALLEL_WORKERS"])
            except ValueError:
                raise ConfigError(
                    f"PARALLEL_WORKERS={env['PARALLEL_WORKERS']!r}: not a valid int"
                ) from None
        for name in ("workers", "stages"):  # before any arithmetic on them
            if given.get(name, 1) < 1:
                variable = env_name(name) or "PARALLEL_WORKERS"
                raise ConfigError(f"{variable}={given[name]!r}: must be >= 1")
        if "THREADS_PER_WORKER" not in env and env.get("INFERENCE_NUM_THREADS"):
            # Seed 001 sets only the total: threads per worker = total / workers.
            processes = given.get("workers", 1) * given.get("stages", 1)
            try:
                total = int(env["INFERENCE_NUM_THREADS"])
            except ValueError:
                total = -1
            if total < processes or total % processes:
                raise ConfigError(
                    f"INFERENCE_NUM_THREADS={env['INFERENCE_NUM_THREADS']!r}: must be a multiple "
                    f"of PARALLEL_WORKERS ({processes})"
                )
            given["threads_per_worker"] = total // processes
        try:
            config = cls(**given)
        except ConfigError as error:
            raise ConfigError(f"env: {error}") from None
        for name, expected in (
            ("PARALLEL_WORKERS", config.processes),
            ("INFERENCE_NUM_THREADS", config.total_threads),
            ("OMP_NUM_THREADS", config.threads_per_worker),
        ):
            if env.get(name) and env[name] != str(expected):
                raise ConfigError(
                    f"{name}={env[name]!r} disagrees with the other variables "
                    f"(they give {expected})"
                )
        return config

    @cached_property
    def key(self) -> str:
        """One string per distinct config, `autotune.space.config_key`: made once per config
        (a sweep looks its layouts up by it a million times; cached_property writes the
        instance's dict, which a frozen dataclass allows, and `replace` makes a new one)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict:
        """JSON-ready dict of every field."""
        # Every field is a scalar: no copies to make (`dataclasses.asdict` deep-copies each
        # value, and a simulated sweep keys hundreds of thousands of configs).
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> TrialConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrialConfig:
        """A validated copy with some fields changed."""
        return replace(self, **changes)


# The names of the env var contract; other fields travel as AUTOTUNE_<FIELD>.
_ENV_NAMES = {
    "backend": "AUTOTUNE_BACKEND",
    "workers": None,  # PARALLEL_WORKERS, which counts the pipeline's stages too
    "threads_per_worker": "THREADS_PER_WORKER",
    "batch_size": "BATCH_SIZE",
    "quant": "MODEL_QUANT",
    "dtype": "TORCH_DTYPE",
    "stages": "PIPELINE_STAGES",
    "partition": "PIPELINE_PARTITION",
    "boundaries": "PIPELINE_BOUNDARIES",
    "pinning": "CPU_PINNING",
    "extra_buffers": "LLAMA_EXTRA_BUFFERS",
    "model": "MODEL_PATH",
}


def env_name(field_name: str) -> str | None:
    """The variable that carries a field in the env var contract (None for ``workers``, which
    travels as PARALLEL_WORKERS)."""
    return _ENV_NAMES.get(field_name, f"AUTOTUNE_{field_name.upper()}")


def field_default(name: str) -> Any:
    """The default of a TrialConfig field."""
    return TrialConfig.__dataclass_fields__[name].default


# --------------------------------------------------------------------------- CLI


def add_config_arguments(parser: argparse.ArgumentParser, backends: dict[str, str]) -> None:
    """Add one flag per TrialConfig field that has one, with its help and type; ``backends``
    (name -> one line) are listed in the help of ``--backend``."""
    for f in fields(TrialConfig):
        # A switch: --ignore-eos turns on what is off by default, --no-kv-cache the reverse.
        for key, action in (("on", "store_true"), ("off", "store_false")):
            if f"{key}_flag" in f.metadata:
                parser.add_argument(
                    f.metadata[f"{key}_flag"],
                    dest=f.name,
                    action=action,
                    default=None,
                    help=f.metadata[f"{key}_help"],
                )
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        text = f.metadata["help"]
        if f.name == "backend":
            text += ": " + "; ".join(f"{name} ({line})" for name, line in backends.items())
        elif "choices" in f.metadata:
            text += f"; one of {', '.join(f.metadata['choices'])}"
        if f.default not in (None, MISSING) and "default" not in text:
            text += f" (default: {f.default})"
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=None,
            metavar=flag.lstrip("-").upper().replace("-", "_"),
            help=text,
        )


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    """A TrialConfig from parsed flags; flags left out keep the field defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in fields(TrialConfig)
        if getattr(args, f.name, None) is not None
    }
    return TrialConfig(**given)
