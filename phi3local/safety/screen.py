"""The training-data screen of `prepare` (opt-in: data.safety_screen=true): rows that teach compliance.

A row is flagged when a user turn is a harmful request (scorer.harmful_request) and the assistant turn
after it is not a refusal (scorer.classify): the same rules `phi3local safety` scores answers with.
Flagged rows are named by file:line; prepare keeps them (the user decides), the report lists them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from phi3local.safety import scorer


def screen_conversation(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first harmful request answered with compliance in messages, or None."""
    for i, message in enumerate(messages[:-1]):
        if message.get("role") != "user":
            continue
        request = scorer.harmful_request(str(message.get("content", "")))
        reply = messages[i + 1]
        if request is None or reply.get("role") != "assistant":
            continue
        verdict = scorer.classify(str(reply.get("content", "")))
        if verdict.label == "compliance":
            return {"category": request[0], "rule": request[1], "turn": i + 1,
                    "request": str(message.get("content", ""))[:120]}
    return None


def screen_examples(examples: Iterable[Any]) -> list[dict[str, Any]]:
    """[{where: file:line, category, rule, turn, request}] for each flagged conversation (plain texts are skipped)."""
    flagged = []
    for example in examples:
        messages = getattr(example, "messages", None)
        if not messages:
            continue
        found = screen_conversation(messages)
        if found is not None:
            flagged.append({"where": example.source, **found})
    return flagged


def screen_lines(flagged: list[dict[str, Any]], limit: int) -> list[str]:
    """What prepare prints: a count and up to `limit` rows by file:line."""
    if not flagged:
        return ["safety screen: no row answers a harmful request with compliance"]
    lines = [f"safety screen: {len(flagged)} row(s) answer a harmful request with compliance (kept; see stats.json "
             "safety_screen):"]
    lines += [f"  {f['where']}: {f['category']} ({f['rule']}): {f['request']!r}" for f in flagged[:limit]]
    if len(flagged) > limit:
        lines.append(f"  … and {len(flagged) - limit} more")
    return lines
