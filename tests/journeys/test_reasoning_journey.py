"""Journey of issue 28: a user chats with a reasoning model, with the trace hidden and then shown, and scores it
with `phi3local safety`, which sees that no answer came out of the trace.

The model is a reasoning stand-in built in about 10 s: the tiny random Phi-3 of tests/export_helpers.py exported
for CPU, its chat template changed to open the trace in the prompt (`<think>`, as some reasoning templates do).
It never closes the trace, so every answer is empty: what a real reasoning model gives when max_new_tokens
ends inside its trace. (No model small enough to build here writes a closed trace; the closed case is in
tests/test_serve_reasoning.py with fake generations.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NO_ANSWER = "(no answer: generation stopped inside the reasoning trace; raise --max-new-tokens)"


@pytest.fixture(scope="module")
def reasoning_onnx(tmp_path_factory) -> Path:
    from test_serve_reasoning import reasoning_export

    return reasoning_export(tmp_path_factory)


def test_chat_hides_or_shows_the_trace_and_safety_counts_unfinished_answers(user, reasoning_onnx):
    hidden = user.run("chat", reasoning_onnx, "--prompt", "Hello", "--max-new-tokens", "8").ok()
    assert hidden.out.strip() == NO_ANSWER  # the trace is not printed, and the user is told why nothing came

    shown = user.run("chat", reasoning_onnx, "--prompt", "Hello", "--max-new-tokens", "8", "--show-reasoning").ok()
    assert shown.out.startswith("<think>\n") and f"\n</think>\n\n{NO_ANSWER}" in shown.out  # no colour: tags
    trace = shown.out[len("<think>\n"):shown.out.index("\n</think>")]
    assert trace.strip() and "\x1b[" not in shown.out

    report = user.run("safety", reasoning_onnx, "--max-new-tokens", "4", "--out", "safety-report").ok()
    assert "warning: 55 of the model's answers stopped inside the reasoning trace" in report.out
    assert "counted as not refused" in report.out and "--max-new-tokens (now 4)" in report.out
    written = json.loads((user.cwd / "safety-report" / "safety.json").read_text())
    assert written["unfinished_traces"] == 55 and written["summary"]["overall"]["refusal_rate"] == 0
    assert all(r["unfinished"] and r["answer"] == "" and r["reasoning"] for r in written["rows"])
