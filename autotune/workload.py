"""Workloads: the prompts a user pushes through a model, and the settings to generate them.

One loader reads the JSONL shapes users already have (see shared/seeds):

- questions (seed 000): ``{"questionID": ..., "question": ...}``
- contexts (seed 003): ``{"id": ..., "query": ..., "context": ..., <other fields kept>}``
- parallel (seed 002): ``{"main": ..., "branches": [...]}`` (each branch becomes a prompt
  that follows ``main``) or ``{"text": ...}``
- plain: ``{"id": ..., "prompt": ...}``

A bad line (malformed JSON, a missing field) is reported with ``file:line``; by default the
good lines still load and the bad ones are counted, ``strict=True`` makes any of them fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autotune.errors import ConfigError

__all__ = [
    "DEFAULT_WORKLOAD",
    "TINY_WORKLOAD",
    "GenerationSettings",
    "LineError",
    "Prompt",
    "Workload",
    "line_id",
    "load_workload",
]

WORKLOAD_DIR = Path(__file__).parent / "workloads"
DEFAULT_WORKLOAD = WORKLOAD_DIR / "default.jsonl"
TINY_WORKLOAD = WORKLOAD_DIR / "tiny.jsonl"

# How the contexts shape (seed 003) turns a retrieved context and a query into one prompt.
CONTEXT_TEMPLATE = (
    "Use the context to answer the question.\n\nContext:\n{context}\n\nQuestion: {query}"
)


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How every prompt of a workload is generated. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool = True
    # Generate exactly max_new_tokens for every prompt (end-of-sequence does not stop it), so
    # two layouts do the same work, as llama-bench and optimum-benchmark measure.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}"
            )
        if not 0.0 <= self.temperature <= 5.0:
            raise ConfigError(f"temperature must be in [0, 5], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding picks the most likely token (deterministic)."""
        return self.temperature == 0.0


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One request: a unique id, the text given to the model, and the input record it came from."""

    id: str
    text: str
    record: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, kw_only=True)
class LineError:
    """A line that did not load, with where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The prompts of a JSONL file; ``errors`` lists the lines that were skipped.

    How to generate for them (GenerationSettings) travels in TrialConfig, the one type that
    carries a configuration from the search to the backend.
    """

    name: str
    prompts: tuple[Prompt, ...]
    errors: tuple[LineError, ...] = ()
    shapes: dict[str, int] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, count: int) -> Workload:
        """The first ``count`` prompts (all of them if there are fewer)."""
        return replace(self, prompts=self.prompts[:count])

    def balanced(self, block: int) -> Workload:
        """The same prompts reordered so that runs of ``block`` consecutive ones hold about the
        same amount of text: longest first, each prompt goes to the block (of ``block``
        places) with the least text so far. A file often groups its prompts (long contexts
        first, short questions last); a measurement's windows must not each see one kind."""
        import heapq

        blocks: list[list[Prompt]] = [[] for _ in range(-(-len(self.prompts) // block))]
        # The blocks with room, lightest first (ties: the first block): O(n log n), where
        # scanning every block for each prompt took a minute for 50k prompts in every trial.
        room = [(0, index) for index in range(len(blocks))]
        for prompt in sorted(self.prompts, key=lambda p: -len(p.text)):
            text, lightest = heapq.heappop(room)
            blocks[lightest].append(prompt)
            if len(blocks[lightest]) < block:
                heapq.heappush(room, (text + len(prompt.text), lightest))
        return replace(self, prompts=tuple(p for members in blocks for p in members))

    def cycled(self, count: int) -> Workload:
        """Exactly ``count`` prompts: the workload over and over (``id~2`` for its second
        round), so a measurement keeps a large batch full however few prompts the file has."""
        rounds = []
        for index in range(count):
            prompt = self.prompts[index % len(self.prompts)]
            turn = index // len(self.prompts)
            rounds.append(replace(prompt, id=f"{prompt.id}~{turn}") if turn else prompt)
        return replace(self, prompts=tuple(rounds))


def _require_text(record: dict, key: str) -> str:
    if key not in record:
        raise ValueError(f'missing field "{key}"')
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'field "{key}" must be a non-empty string')
    return value


def _record_id(record: dict, key: str, line: int) -> str:
    value = record.get(key)
    if value is None:
        return f"line{line}"
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f'field "{key}" must be a string or an integer')
    return str(value)


def parse_record(record: Any, line: int) -> tuple[str, list[Prompt]]:
    """Turn one decoded JSONL record into its shape name and prompts; ValueError says why not."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "question" in record or "questionID" in record:
        text = _require_text(record, "question")
        return "questions", [
            Prompt(id=_record_id(record, "questionID", line), text=text, record=record)
        ]
    if "query" in record or "context" in record:
        query = _require_text(record, "query")
        context = _require_text(record, "context")
        text = CONTEXT_TEMPLATE.format(context=context, query=query)
        return "contexts", [Prompt(id=_record_id(record, "id", line), text=text, record=record)]
    if "main" in record:
        main = _require_text(record, "main")
        branches = record.get("branches")
        if branches is None:
            return "parallel", [Prompt(id=_record_id(record, "id", line), text=main, record=record)]
        if not isinstance(branches, list) or not branches:
            raise ValueError('field "branches" must be a non-empty list of strings')
        base = _record_id(record, "id", line)
        prompts = []
        for index, branch in enumerate(branches):
            if not isinstance(branch, str) or not branch.strip():
                raise ValueError(f"branches[{index}] must be a non-empty string")
            prompts.append(
                Prompt(
                    id=f"{base}#{index}",
                    text=f"{main}\n\n{branch}",
                    record={**record, "branch_index": index},
                )
            )
        return "parallel", prompts
    if "text" in record:
        text = _require_text(record, "text")
        return "parallel", [Prompt(id=_record_id(record, "id", line), text=text, record=record)]
    if "prompt" in record:
        text = _require_text(record, "prompt")
        return "plain", [Prompt(id=_record_id(record, "id", line), text=text, record=record)]
    raise ValueError(
        'unknown shape: expected "question", "query"+"context", "main"(+"branches"), '
        '"text" or "prompt"'
    )


def line_id(prompts) -> str:
    """The id of the input line ``prompts`` came from: its prompt's, or for a line with
    branches (prompts ``ID#0``, ``ID#1`` ...) the line's own ``ID``."""
    if "branch_index" in prompts[0].record:
        return prompts[0].id.rsplit("#", 1)[0]
    return prompts[0].id


def load_workload(
    path: str | Path | None = None,
    *,
    strict: bool = False,
    source: str = "--workload",
) -> Workload:
    """Load a JSONL workload; ``None`` is the shipped default workload.

    Raises ConfigError (exit 2) for a missing or empty file, a file with no good line, or,
    with ``strict``, the first bad line. ``source`` names the flag or variable in messages.
    """
    path = Path(path) if path is not None else DEFAULT_WORKLOAD
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source} {path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"{source} {path}: cannot read ({error.strerror})") from None

    prompts: list[Prompt] = []
    errors: list[LineError] = []
    shapes: dict[str, int] = {}
    seen: dict[str, int] = {}
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        if not line_bytes.strip():
            continue
        try:
            record = json.loads(line_bytes)
            shape, new = parse_record(record, number)
            # A line is answered under its own id (a branch line's is its prompts' id less
            # "#N"): two lines of one id, whatever their shapes, would be one output line.
            for key in {line_id(new), *(prompt.id for prompt in new)}:
                if key in seen:
                    raise ValueError(f'duplicate id "{key}" (first on line {seen[key]})')
        except UnicodeDecodeError:
            bad = LineError(path=str(path), line=number, reason="not valid UTF-8")
        except json.JSONDecodeError as exc:
            bad = LineError(path=str(path), line=number, reason=f"malformed JSON ({exc.msg})")
        except ValueError as exc:
            bad = LineError(path=str(path), line=number, reason=str(exc))
        else:
            for key in {line_id(new), *(prompt.id for prompt in new)}:
                seen[key] = number
            prompts.extend(new)
            shapes[shape] = shapes.get(shape, 0) + 1
            continue
        if strict:
            raise ConfigError(f"{bad} (--strict)")
        errors.append(bad)

    if not prompts:
        if errors:
            raise ConfigError(
                f"{source} {path}: no valid line ({len(errors)} bad; first: {errors[0]})"
            )
        raise ConfigError(f"{source} {path}: the file is empty")
    return Workload(
        name=path.stem,
        prompts=tuple(prompts),
        errors=tuple(errors),
        shapes=shapes,
    )
