"""`autotune export`: a study's winner as env vars, in the format a deployment wants.

Formats: ``env`` (KEY=value, what best.env holds), ``shell`` (export KEY='value'), ``json``,
``systemd`` (Environment= lines for a unit's [Service]), ``docker`` (--env-file lines, which
take no comments and no quotes). Only the variables the winner's backend reads are written
(`backends.fields_read`), and ``MODEL_PATH`` only when the study's model was not the embedded
default. The measured figures (`figures`: tokens/s, the paired speedup and its interval, the
machine fingerprint, library versions) go in a comment header, or beside the variables in
``json``.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics

from autotune.agreement import describe_agreement
from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.passes import describe_stability
from autotune.quality import Quality
from autotune.stats import describe_speedup
from autotune.study import TrialRecord
from autotune.summary import SweepSummary
from backends import fields_read

__all__ = ["FORMATS", "figures", "parse_header", "render", "variables", "winner_config"]

FORMATS = ("env", "shell", "json", "systemd", "docker")


def winner_config(summary: SweepSummary) -> TrialConfig:
    """The winner's TrialConfig, with a layer split it chose while measuring (the pipeline's
    ``compute`` partition) written out, so the variables reproduce what was measured."""
    winner = summary.winner
    if not winner:
        raise ConfigError(f"study {summary.study}: no trial finished, nothing to export")
    config = winner.config
    details = (winner.result or {}).get("details") or {}
    if details.get("boundaries"):
        config = config.replace(
            partition="custom", boundaries=details["boundaries"], stage_memory_gb=None
        )
    return config


def variables(summary: SweepSummary) -> dict[str, str]:
    """The env vars of the winner: only what its backend reads."""
    config = winner_config(summary)
    return config.to_env(only=fields_read(config.backend))


def figures(summary: SweepSummary, fingerprint: str | None) -> dict:
    """What was measured, for the header and the JSON: tokens/s of the winner's trial, its
    paired speedup over the naive baseline with the interval and the number of pairs (or a
    single-run ratio, marked unconfirmed), the machine fingerprint and library versions."""
    from autotune.provenance import versions

    winner: TrialRecord = summary.winner
    baseline = summary.baseline
    data = {
        "study": summary.study,
        "trial": winner.number,
        "tokens_per_s": winner.value,
        # What the winner measured in the paired runs against the baseline: the fairer figure
        # to check it against later (the search trial is one run, picked as the best of many).
        "paired_tokens_per_s": (
            statistics.median(winner.paired["candidate"])
            if winner.paired and winner.paired.get("candidate")
            else None
        ),
        # Each paired run's figure: their spread is what `autotune verify` accepts.
        "paired_runs": list((winner.paired or {}).get("candidate") or []),
        "baseline_tokens_per_s": baseline.value if baseline else None,
        "confirmed": bool(winner.paired),
        "speedup": None,
        "ci_low": None,
        "ci_high": None,
        "pairs": None,
        "machine_fingerprint": fingerprint,
        "versions": {k: v for k, v in versions().items() if v is not None},
    }
    data["chosen_among"] = None
    data["note"] = summary.note
    # Where the probe ran: whether llama.cpp's extra buffers run on the machine measured.
    data["llama_extra_buffers"] = summary.extra_buffers if winner.backend == "llamacpp" else None
    data["agreement"] = winner.agreement  # its answers against the batch-1 reference run
    # Its next-token distributions against the source weights' (`autotune.quality`).
    data["quality"] = (winner.result or {}).get("quality")
    data["stable"] = (winner.result or {}).get("stable")
    data["window_spread"] = (winner.result or {}).get("window_spread")
    data["pass_spread"] = (winner.result or {}).get("pass_spread")
    if winner.paired:
        paired = winner.paired
        data.update(
            speedup=paired["speedup"],
            ci_low=paired.get("ci_low"),
            ci_high=paired.get("ci_high"),
            pairs=paired["pairs"],
            chosen_among=paired.get("chosen_among"),
        )
    elif baseline and baseline.value:
        data["speedup"] = winner.value / baseline.value
    return data


def _header(found: dict) -> list[str]:
    lines = [f"autotune study {found['study']}: the fastest layout measured"]
    if found["machine_fingerprint"]:
        lines.append(f"machine fingerprint: {found['machine_fingerprint']}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in found["versions"].items()))
    measured = f"measured: {found['tokens_per_s']:.1f} tokens/s (trial {found['trial']})"
    if found["paired_tokens_per_s"] is not None:
        runs = ", ".join(f"{rate:.1f}" for rate in found["paired_runs"])
        measured += f"; paired runs: {found['paired_tokens_per_s']:.1f} tokens/s (median of {runs})"
    if found.get("window_spread") is not None:
        stability = describe_stability(found.get("stable"), found.get("pass_spread"))
        measured += f"; {stability}; its windows spread {found['window_spread']:.1%}"
    lines.append(measured)
    if (quality := Quality.from_dict(found.get("quality"))) is not None:
        lines.append(
            "tokens against the source weights (teacher forcing, "
            f"{quality.positions} positions): {quality.describe()}"
        )
    if found.get("agreement") and found["agreement"].get("compared"):
        lines.append(f"answers against batch 1 greedy: {describe_agreement(found['agreement'])}")
    if found.get("llama_extra_buffers"):
        lines.append(f"llama.cpp extra buffers (AMX/repack): {found['llama_extra_buffers']}")
    if found["note"]:
        lines.append(found["note"])
    if found["confirmed"]:
        paired = {k: found[k] for k in ("speedup", "pairs", "ci_low", "ci_high", "chosen_among")}
        lines.append(f"speedup over the naive baseline: {describe_speedup(paired)}")
    elif found["speedup"] is not None:
        lines.append(
            f"speedup over the naive baseline: x{found['speedup']:.2f} (single runs, not confirmed)"
        )
    return lines


def parse_header(comments: list[str]) -> dict:
    """What `_header` recorded, read back from an env file's comment lines: fingerprint,
    tokens/s, the paired runs' figures, speedup and its interval (for `autotune verify`)."""
    found: dict = {}
    for line in comments:
        if match := re.match(r"machine fingerprint: (\S+)", line):
            found["fingerprint"] = match.group(1)
        elif match := re.match(r"measured: ([\d.]+) tokens/s", line):
            found["tokens_per_s"] = float(match.group(1))
            if paired := re.search(
                r"paired runs: ([\d.]+) tokens/s(?: \(median of ([^)]*)\))?", line
            ):
                found["paired_tokens_per_s"] = float(paired.group(1))
                if paired.group(2):
                    found["paired_runs"] = [float(x) for x in paired.group(2).split(",")]
        elif match := re.search(
            r"x([\d.]+) over (\d+) A B pairs(?:, 95% CI ([\d.]+)-([\d.]+))?", line
        ):
            found["speedup"] = float(match.group(1))
            if match.group(3):
                found["ci"] = (float(match.group(3)), float(match.group(4)))
    return found


def render(summary: SweepSummary, *, fingerprint: str | None, fmt: str) -> str:
    """The winner of ``summary`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    env = variables(summary)
    found = figures(summary, fingerprint)
    if fmt == "json":
        return json.dumps({"variables": env, **found}, indent=2) + "\n"
    header = [f"# {line}" for line in _header(found)]
    if fmt == "env":
        body = [f"{key}={value}" for key, value in env.items()]
    elif fmt == "shell":
        body = [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    elif fmt == "systemd":
        body = ["[Service]"] + [f'Environment="{key}={value}"' for key, value in env.items()]
    else:  # docker --env-file: no comments, no quotes
        header, body = [], [f"{key}={value}" for key, value in env.items()]
    return "\n".join(header + body) + "\n"
