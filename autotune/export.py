"""`autotune export`: a study's winner as env vars, in the format a deployment wants.

Formats: ``env`` (KEY=value, what best.env holds), ``shell`` (export KEY='value'), ``json``,
``systemd`` (Environment= lines for a unit's [Service]), ``docker`` (--env-file lines, which
take no comments and no quotes). A comment header (where the format has comments) records the
machine fingerprint, library versions, the measured tokens/s and the speedup over the baseline
with its confidence interval.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from autotune.config import TrialConfig
from autotune.errors import ConfigError

__all__ = ["FORMATS", "load_summary", "parse_header", "render", "winner_config"]

FORMATS = ("env", "shell", "json", "systemd", "docker")


def load_summary(reports_dir: Path, study: str | None) -> dict:
    """The summary.json of ``study`` (default: the newest study under ``reports_dir``)."""
    if study is None:
        found = sorted(reports_dir.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"no finished study under {reports_dir}; run autotune sweep first")
        path = found[-1]
    else:
        path = reports_dir / study / "summary.json"
        if not path.is_file():
            raise ConfigError(f"--study {study}: no summary at {path}; run autotune sweep first")
    return json.loads(path.read_text())


def winner_config(summary: dict, model_path: str | None = None) -> TrialConfig:
    """The winner's TrialConfig, with the pipeline split it measured written out and the model
    named by path, so the env vars reproduce exactly what was measured."""
    winner = summary.get("winner")
    if not winner:
        raise ConfigError(f"study {summary.get('study')}: no trial finished, nothing to export")
    config = TrialConfig.from_dict(winner["config"])
    details = (winner.get("result") or {}).get("details") or {}
    if config.backend == "pipeline" and details.get("boundaries"):
        config = config.replace(
            partition="custom", boundaries=details["boundaries"], stage_memory_gb=None
        )
    if config.model is None and model_path:
        config = config.replace(model=model_path)
    return config


def _header(summary: dict, fingerprint: str | None) -> list[str]:
    from autotune.provenance import versions

    winner = summary["winner"]
    lines = [f"autotune study {summary['study']}: the fastest layout measured"]
    if fingerprint:
        lines.append(f"machine fingerprint: {fingerprint}")
    lines.append(
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v is not None)
    )
    lines.append(f"measured: {winner['value']:.1f} tokens/s (trial {winner['number']})")
    paired = winner.get("paired")
    if paired:
        from autotune.sweep import describe_speedup

        lines.append(f"speedup over the naive baseline: {describe_speedup(paired)}")
    elif summary.get("baseline"):
        ratio = winner["value"] / summary["baseline"]["value"]
        lines.append(f"speedup over the naive baseline: x{ratio:.2f} (single runs, not confirmed)")
    return lines


def parse_header(comments: list[str]) -> dict:
    """What `_header` recorded, read back from an env file's comment lines: fingerprint,
    tokens/s, speedup and its interval (for `autotune verify`)."""
    found: dict = {}
    for line in comments:
        if match := re.match(r"machine fingerprint: (\S+)", line):
            found["fingerprint"] = match.group(1)
        elif match := re.match(r"measured: ([\d.]+) tokens/s", line):
            found["tokens_per_s"] = float(match.group(1))
        elif match := re.search(
            r"x([\d.]+) over (\d+) A B pairs(?:, 95% CI ([\d.]+)-([\d.]+))?", line
        ):
            found["speedup"] = float(match.group(1))
            if match.group(3):
                found["ci"] = (float(match.group(3)), float(match.group(4)))
    return found


def render(
    summary: dict, *, topology_fingerprint: str | None, fmt: str, model_path: str | None = None
) -> str:
    """The winner of ``summary`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    env = winner_config(summary, model_path).to_env()
    if fmt == "json":
        return json.dumps(env, indent=2) + "\n"
    header = [f"# {line}" for line in _header(summary, topology_fingerprint)]
    if fmt == "env":
        body = [f"{key}={value}" for key, value in env.items()]
    elif fmt == "shell":
        body = [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    elif fmt == "systemd":
        body = ["[Service]"] + [f'Environment="{key}={value}"' for key, value in env.items()]
    else:  # docker --env-file: no comments, no quotes
        header, body = [], [f"{key}={value}" for key, value in env.items()]
    return "\n".join(header + body) + "\n"
