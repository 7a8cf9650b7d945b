"""The small value types the data stage passes around: where a row came from, the examples, the problems.

Kept apart from the readers and the rules so that every data module can import them without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phi3local.errors import Phi3LocalError


@dataclass(frozen=True)
class Location:
    """Where a row sits in the user's data: a line of a JSON/JSONL file or a row index of a table.

    `row` is 0-based (row 0 is the first data row, under the header for CSV), as `datasets` counts.
    """

    file: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file}:row {self.row}"
        return self.file


@dataclass
class Conversation:
    """A chat example: messages [{role, content}] (optionally `weight` 0/1 on assistant turns)."""

    messages: list[dict[str, Any]]
    source: str  # "file:line" or "file:row N"
    loc: Location | None = None


@dataclass
class TextExample:
    """A plain text (task causal_lm, all tokens trained) or a classification example (label set)."""

    text: str
    source: str
    label: str | int | None = None
    loc: Location | None = None


Example = Conversation | TextExample


@dataclass
class RawRecord:
    """One parsed row before validation: a mapping with the user's column names already mapped to ours."""

    data: Any
    loc: Location


@dataclass(frozen=True)
class RowProblem:
    """One bad row: where it is, which field, and why."""

    where: Location
    field: str
    reason: str

    @property
    def file(self) -> str:
        return self.where.file

    @property
    def line(self) -> int | None:
        return self.where.line

    @property
    def row(self) -> int | None:
        return self.where.row

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"where": str(self.where), "file": self.file, "line": self.line, "row": self.row,
                "field": self.field, "reason": self.reason}


class DataError(Phi3LocalError, ValueError):
    """The data cannot be used as it is. The message lists the first problems and the total count."""

    def __init__(self, problems: list[RowProblem], max_shown: int = 20, header: str | None = None,
                 hint: str | None = None):
        self.problems = list(problems)
        self.total = len(self.problems)
        shown = self.problems[: max(0, max_shown)]
        files = sorted({p.file for p in self.problems})
        head = header or f"{self.total} bad row{'s' if self.total != 1 else ''} in {', '.join(files)}"
        lines = [head + (f" (showing the first {len(shown)}):" if len(shown) < self.total else ":")]
        lines += [f"  {p}" for p in shown]
        if len(shown) < self.total:
            lines.append(f"  ... and {self.total - len(shown)} more ({self.total} in total)")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class FormatError(Phi3LocalError, ValueError):
    """A whole file cannot be read as any supported format; the message says what was found and what to set."""


@dataclass
class StepCounts:
    """Row counts of the cleaning steps for one input file (what `stats.json` reports under `steps`)."""

    read: int = 0
    invalid: int = 0
    whitespace_normalized: int = 0
    system_prompt_added: int = 0
    duplicates: int = 0
    over_length: int = 0
    too_short: int = 0
    too_long: int = 0
    truncated: int = 0
    kept: int = 0
    extra: dict[str, int] = field(default_factory=dict)
