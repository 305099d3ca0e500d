"""Parsing the durations and sizes people type: ``90s``, ``30m``, ``1h30m``; ``8G``, ``512M``."""

from __future__ import annotations

import re

from autotune.errors import ConfigError

__all__ = ["format_duration", "parse_duration", "parse_size"]

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_duration(text: str, what: str = "--budget") -> float:
    """Seconds in ``90s``, ``30m``, ``1h30m``, ``2h`` (a bare number is seconds)."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value)
        if not value or not match or not any(match.groups()):
            raise ConfigError(f"{what} {text!r}: use a duration like 90s, 30m or 1h30m")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise ConfigError(f"{what} {text!r}: must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """``5m03s``-style text for a number of seconds."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def parse_size(text: str, what: str = "--memory-limit") -> int:
    """Bytes in ``8G``, ``512M``, ``1.5g``, ``123456`` (binary units; a trailing B is allowed)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.strip().lower())
    if not match:
        raise ConfigError(f"{what} {text!r}: use a size like 8G or 512M")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError(f"{what} {text!r}: must be more than zero")
    return size
