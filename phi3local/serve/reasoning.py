"""Reasoning traces: a reasoning model's `<think>...</think>` before its answer, split off whole or as it streams.

Phi-4-reasoning and Phi-4-mini-reasoning answer with a trace in plain text, `<think>\n...\n</think>\n\n`, then
the answer. Some templates write `<think>` into the prompt themselves (the generation prompt opens the trace):
then the output starts inside the trace (`opened`, found by `prompt_opens_trace` on the rendered prompt).

    split_reasoning(text, opened)    (trace, answer) of a whole output; trace None when there is none
    ReasoningSplitter(opened)        the same split over streamed pieces: feed() returns ("reasoning" | "content",
                                     text) parts as soon as they are certain; a partial `</think>` (or `<think>`,
                                     or whitespace the split would strip) is held back until the next piece
                                     settles it, so the parts joined equal split_reasoning of the whole text

Output without a trace passes through unchanged (split_reasoning returns it as it is). A trace that never
closes (generation stopped inside it) is all trace and an empty answer. Torch-free (phi3local.serve); the
training side (phi3local.data.template) imports split_reasoning from here.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING, CONTENT = "reasoning", "content"  # the kinds of ReasoningSplitter's parts


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(trace, answer) of a reasoning model's output; trace None when there is none.

    `opened`: the prompt already wrote `<think>` (a template whose generation prompt opens the trace), so the
    output starts inside the trace. A trace never closed (generation stopped inside it) is all trace and no
    answer. The trace is returned without its tags and stripped; the answer is what follows, left-stripped.
    """
    if opened:
        text = THINK_OPEN + text
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return None, text
    body = stripped[len(THINK_OPEN):]
    close = body.find(THINK_CLOSE)
    if close < 0:
        return body.strip(), ""
    return body[:close].strip(), body[close + len(THINK_CLOSE):].lstrip()


def trace_unclosed(text: str, opened: bool = False) -> bool:
    """Whether the output opens a trace and never closes it: generation stopped inside the trace (no answer)."""
    if opened:
        text = THINK_OPEN + text
    stripped = text.lstrip()
    return stripped.startswith(THINK_OPEN) and THINK_CLOSE not in stripped[len(THINK_OPEN):]


def prompt_opens_trace(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an opened trace (its generation prompt writes `<think>`)."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ReasoningSplitter:
    """split_reasoning over streamed pieces: feed each piece, then flush once at the end.

    Every part is (REASONING or CONTENT, non-empty text). Joined, the REASONING parts equal split_reasoning's
    trace (nothing when it is None or empty) and the CONTENT parts its answer, whatever the pieces' boundaries.
    `had_trace`: the output opened a trace; `closed`: its `</think>` came.
    """

    _START, _TRACE, _ANSWER, _PLAIN = range(4)

    def __init__(self, opened: bool = False):
        self._state = self._TRACE if opened else self._START
        self._held = ""
        self._trace_started = False  # a non-space character of the trace was sent: its spaces are kept from now
        self._answer_started = False
        self.had_trace = opened
        self.closed = False

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self._held += piece
        parts: list[tuple[str, str]] = []
        if self._state == self._START:
            stripped = self._held.lstrip()
            if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                return parts  # only spaces, or the start of a `<think>`: the next piece settles it
            if stripped.startswith(THINK_OPEN):
                self._state, self.had_trace = self._TRACE, True
                self._held = stripped[len(THINK_OPEN):]
            else:
                self._state = self._PLAIN
        if self._state == self._TRACE:
            self._trace(parts)
        if self._state == self._ANSWER and not self._answer_started:
            self._held = self._held.lstrip()
            self._answer_started = bool(self._held)
        if self._state in (self._ANSWER, self._PLAIN) and self._held:
            parts.append((CONTENT, self._held))
            self._held = ""
        return parts

    def flush(self) -> list[tuple[str, str]]:
        """What was held back, once the output has ended."""
        held, self._held = self._held, ""
        if self._state == self._TRACE:  # never closed: a partial `</think>` is the trace's own text
            held = held.rstrip() if self._trace_started else held.strip()
            return [(REASONING, held)] if held else []
        if self._state == self._START and held:  # spaces or an unfinished `<think>`: not a trace
            return [(CONTENT, held)]
        return []

    def _trace(self, parts: list[tuple[str, str]]) -> None:
        if not self._trace_started:
            self._held = self._held.lstrip()
        close = self._held.find(THINK_CLOSE)
        if close >= 0:
            trace = self._held[:close].rstrip()
            if trace:
                parts.append((REASONING, trace))
            self._held = self._held[close + len(THINK_CLOSE):]
            self._state, self.closed = self._ANSWER, True
            return
        keep = _open_prefix(self._held, THINK_CLOSE)
        ready = self._held[:len(self._held) - keep]
        sent = ready.rstrip()  # spaces before a `</think>` are stripped from the trace: hold them until text follows
        if sent:
            parts.append((REASONING, sent))
            self._trace_started = True
        self._held = self._held[len(sent):]


def _open_prefix(text: str, tag: str) -> int:
    """Length of the longest end of text that tag starts with (and that does not complete it)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
