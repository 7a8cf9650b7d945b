"""Cleaning steps on validated examples; each returns what it changed or dropped, so every count is reported.

- normalize_whitespace: `\\r\\n` and lone `\\r` become `\\n`; each message / text is stripped at both ends
  (inner spacing, indentation and blank lines are kept).
- system_prompt: added to conversations that have no system message.
- dedupe: exact duplicate conversations (same roles, contents, weights; same text and label) after the steps
  above; the first one is kept and every later copy is listed with the row it duplicates.
- min/max token filters (`length_filter`): on the token count before any truncation.
"""

from __future__ import annotations

import json
from dataclasses import replace

from phi3local.data.records import Conversation, Example


def normalize_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def normalize_example(example: Example) -> tuple[Example, bool]:
    """The example with normalised whitespace, and whether anything changed."""
    if isinstance(example, Conversation):
        messages = [{**m, "content": normalize_text(m["content"])} for m in example.messages]
        changed = any(a["content"] != b["content"] for a, b in zip(messages, example.messages))
        return (replace(example, messages=messages) if changed else example), changed
    text = normalize_text(example.text)
    changed = text != example.text
    return (replace(example, text=text) if changed else example), changed


def add_system_prompt(example: Example, system_prompt: str | None) -> tuple[Example, bool]:
    if not system_prompt or not isinstance(example, Conversation):
        return example, False
    if example.messages and example.messages[0]["role"] == "system":
        return example, False
    messages = [{"role": "system", "content": system_prompt}] + example.messages
    return replace(example, messages=messages), True


def example_key(example: Example) -> str:
    if isinstance(example, Conversation):
        return json.dumps([[m["role"], m["content"], m.get("weight", 1)] for m in example.messages],
                          ensure_ascii=False)
    return json.dumps([example.text, example.label], ensure_ascii=False)


def dedupe(examples: list[Example]) -> tuple[list[Example], list[tuple[Example, Example]]]:
    """(unique examples in order, [(dropped duplicate, the earlier row it repeats)])."""
    seen: dict[str, Example] = {}
    kept, dropped = [], []
    for ex in examples:
        key = example_key(ex)
        if key in seen:
            dropped.append((ex, seen[key]))
        else:
            seen[key] = ex
            kept.append(ex)
    return kept, dropped


def length_filter(n_tokens: int, min_tokens: int, max_tokens: int | None) -> str | None:
    """The reason a row of n_tokens is filtered out ('too_short' / 'too_long'), or None."""
    if n_tokens < min_tokens:
        return "too_short"
    if max_tokens is not None and n_tokens > max_tokens:
        return "too_long"
    return None


__all__ = [
    "add_system_prompt",
    "dedupe",
    "example_key",
    "length_filter",
    "normalize_example",
    "normalize_text",
]
