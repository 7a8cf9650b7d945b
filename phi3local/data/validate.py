"""Row rules: each bad row gets one `RowProblem` naming its file, line (or row index), field and reason.

The rules run before any cleaning, on the data as the user wrote it, and report the first problem of a row.
`collect_or_raise` applies `data.on_error`: `fail` raises a `DataError` listing the first `max_errors_shown`
problems and the total count (after ALL rows were checked); `skip` returns them so that the report lists
every skipped row. Nothing is dropped silently.
"""

from __future__ import annotations

import re
from typing import Any

from phi3local.data.formats import REQUIRED_FIELDS
from phi3local.data.records import DataError, Location, RowProblem

__all__ = [
    "ROLES",
    "DataError",
    "RowProblem",
    "check_messages",
    "check_record",
    "collect_or_raise",
    "invalid_unicode",
    "resolve_label",
]

ROLES = ("system", "user", "assistant")
# JSON joins an escaped UTF-16 pair (\ud83d\ude00) into one character, so any surrogate left is alone.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def invalid_unicode(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone UTF-16 surrogate, which neither a tokenizer nor a UTF-8 file
    can hold), or None."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (f"not valid Unicode: a lone surrogate \\u{ord(found.group()):04x} at character {found.start()} "
            "(half of a UTF-16 pair, e.g. a JSON escape \\ud800 without its partner)")


def _check_text(value: Any, field: str, loc: Location, required: bool = True) -> RowProblem | None:
    if value is None:
        return RowProblem(loc, field, "missing") if required else None
    if not isinstance(value, str):
        return RowProblem(loc, field, f"must be a string, got {_type_name(value)} {_short(value)}")
    if required and not value.strip():
        return RowProblem(loc, field, "empty")
    invalid = invalid_unicode(value)
    if invalid:
        return RowProblem(loc, field, invalid)
    return None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_messages(messages: Any, loc: Location, field: str = "messages") -> RowProblem | None:
    """The first problem of a chat: shape, roles, contents, order, and that it ends with an assistant turn."""
    if messages is None:
        return RowProblem(loc, field, "missing")
    if not isinstance(messages, list):
        return RowProblem(loc, field, f"must be a list of {{role, content}} objects, got {_type_name(messages)}")
    if not messages:
        return RowProblem(loc, field, "no messages")
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            return RowProblem(loc, where, f"must be an object with role and content, got {_type_name(m)}")
        role = m.get("role")
        if role is None:
            return RowProblem(loc, f"{where}.role", "missing")
        if role not in ROLES:
            return RowProblem(loc, f"{where}.role", f"unknown role {_short(role)} (expected system, user or assistant)")
        content = m.get("content")
        if content is None:
            return RowProblem(loc, f"{where}.content", "missing")
        if not isinstance(content, str):
            hint = " (multi-part content lists are not supported)" if isinstance(content, list) else ""
            return RowProblem(loc, f"{where}.content", f"must be a string, got {_type_name(content)}{hint}")
        if not content.strip():
            return RowProblem(loc, f"{where}.content", "empty content")
        invalid = invalid_unicode(content)
        if invalid:
            return RowProblem(loc, f"{where}.content", invalid)
        weight = m.get("weight")
        if weight is not None:
            if role != "assistant":
                return RowProblem(loc, f"{where}.weight", "only assistant turns can have a weight")
            if isinstance(weight, bool) or weight not in (0, 1):
                return RowProblem(loc, f"{where}.weight", f"must be 0 or 1, got {_short(weight)}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return RowProblem(loc, field, "no assistant turn")
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            if roles[i] == "system":
                reason = "a system message may only come first"
            else:
                previous = roles[i - 1] if i else "the start"
                reason = f"roles out of order: expected {expected} after {previous}, got {roles[i]}"
            return RowProblem(loc, f"{field}[{i}].role", reason)
    if roles[-1] != "assistant":
        return RowProblem(loc, f"{field}[{len(roles) - 1}].role",
                          f"the conversation must end with an assistant turn, it ends with {roles[-1]}")
    if weight_all_zero(messages):
        return RowProblem(loc, field, "every assistant turn has weight 0: nothing to train")
    return None


def weight_all_zero(messages: list[dict]) -> bool:
    return all(m.get("weight") == 0 for m in messages if m["role"] == "assistant")


def resolve_label(value: Any, labels: list[str]) -> int | None:
    """The class index of a label: its name in `labels`, or an index (int or digit string) into them."""
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        stripped = value.strip()
        if stripped in labels:
            return labels.index(stripped)
        if stripped.isdigit() and not any(name.isdigit() for name in labels):
            value = int(stripped)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    return None


def check_record(data: Any, fmt: str, loc: Location, labels: list[str] | None = None) -> RowProblem | None:
    """The first problem of a raw record in format `fmt`, or None when it can be converted and trained."""
    if not isinstance(data, dict):
        return RowProblem(loc, "row", f"must be a JSON object, got {_type_name(data)}")
    if fmt == "messages":
        return check_messages(data.get("messages"), loc)
    for name in REQUIRED_FIELDS[fmt]:
        if name not in data:
            present = ", ".join(sorted(map(str, data))) or "none"
            return RowProblem(loc, name, f"missing (the row has: {present})")
    if fmt == "alpaca":
        for name, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
            problem = _check_text(data.get(name), name, loc, required)
            if problem:
                return problem
        history = data.get("history")
        if history is not None:
            if not isinstance(history, list):
                return RowProblem(loc, "history", f"must be a list of [user, assistant] pairs, got {_type_name(history)}")
            for i, pair in enumerate(history):
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                    return RowProblem(loc, f"history[{i}]", "must be a [user, assistant] pair")
                for j, part in enumerate(pair):
                    problem = _check_text(part, f"history[{i}][{j}]", loc)
                    if problem:
                        return problem
        return None
    if fmt == "prompt_completion":
        for name, required in (("prompt", True), ("completion", True), ("system", False)):
            problem = _check_text(data.get(name), name, loc, required)
            if problem:
                return problem
        return None
    if fmt == "text":
        return _check_text(data.get("text"), "text", loc)
    if fmt == "classification":
        problem = _check_text(data.get("text"), "text", loc)
        if problem:
            return problem
        value = data.get("label")
        if value is None or (isinstance(value, str) and not value.strip()):
            return RowProblem(loc, "label", "missing")
        if resolve_label(value, labels or []) is None:
            return RowProblem(loc, "label", f"unknown label {_short(value)} (model.labels: {labels or []})")
        return None
    raise ValueError(f"unknown format {fmt!r}")


def collect_or_raise(problems: list[RowProblem], on_error: str, max_shown: int = 20) -> list[RowProblem]:
    """With on_error=fail, raise a DataError when there is any problem; with skip, return them."""
    if problems and on_error == "fail":
        raise DataError(
            problems, max_shown,
            hint="Fix these rows, or set data.on_error=skip to leave them out "
                 "(every skipped row is then listed in stats.json).",
        )
    return problems
