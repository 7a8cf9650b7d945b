"""score.py's optional guardrail: Azure AI Content Safety screens the prompt and the answer when configured.

On when CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY are set in the deployment's environment
(phi3local.serve.content_safety); PHI3LOCAL_CONTENT_SAFETY_THRESHOLD (default 4 of 0/2/4/6) is the
severity that blocks, PHI3LOCAL_CONTENT_SAFETY_WINDOW (default 200) the characters a streamed answer
is screened by. Like Azure OpenAI's content filter:

    a blocked prompt        400, error code content_filter (nothing is generated; streamed or not)
    a blocked answer        200 with finish_reason content_filter and REFUSAL_TEXT instead of the answer
    a streamed answer       held back and screened every WINDOW characters and at its end, each window
                            with the CONTEXT_CHARS sent before it (harm across a window's edge is seen;
                            calls stay one text record however long the answer); a window is sent only
                            once screened. Blocked: the window is not sent, generation stops,
                            REFUSAL_TEXT is the last delta, finish_reason content_filter
    a long answer           screened in pieces of the service's 10,000-character limit, every piece
    a reasoning trace       screened with the answer, as generated (`<think>...</think>` then the answer):
                            it reaches the caller too (reasoning_content), so it is never sent unscreened;
                            a harmful trace blocks the answer as harmful answer text does
    the service unreachable 503 content_safety_unavailable (it fails closed: an unscreened answer is not
                            sent); mid-stream, the 200 is sent already: an error event with that code
                            ends the stream and the unscreened window is not sent
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from phi3local.serve import protocol
from phi3local.serve.content_safety import MAX_TEXT_CHARS, ContentSafetyClient, ContentSafetyError
from phi3local.serve.errors import ServeError

ENV_THRESHOLD = "PHI3LOCAL_CONTENT_SAFETY_THRESHOLD"
DEFAULT_THRESHOLD = 4  # "medium", the level Azure's default content filters block from
ENV_WINDOW = "PHI3LOCAL_CONTENT_SAFETY_WINDOW"
# Characters of a streamed answer held back per screening call (~50 tokens, two or three sentences): a
# smaller window shows text sooner but costs a call (~0.1-0.3 s on Azure, one billed text record) more
# often; the first text of a stream waits for WINDOW characters plus one call.
DEFAULT_WINDOW = 200
# Released text screened again in front of each new window: words split by a window's edge are judged
# together, and a call holds at most WINDOW + CONTEXT_CHARS characters (with the defaults, one 1,000-character
# text record: re-screening the whole answer so far would bill ~N^2 / (2 x WINDOW) characters).
CONTEXT_CHARS = 800
REFUSAL_TEXT = "I can't help with that: the answer was withheld by the content filter."


class ContentGuard:
    def __init__(self, client: ContentSafetyClient, threshold: int = DEFAULT_THRESHOLD,
                 window_chars: int = DEFAULT_WINDOW):
        self.client = client
        self.threshold = threshold
        self.window_chars = window_chars

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ContentGuard | None:
        client = ContentSafetyClient.from_env(environ)
        if client is None:
            return None
        threshold = _env_int(environ, ENV_THRESHOLD, DEFAULT_THRESHOLD, 0, 7, "a severity 0..7 (0, 2, 4 or 6)")
        window = _env_int(environ, ENV_WINDOW, DEFAULT_WINDOW, 1, MAX_TEXT_CHARS,
                          f"a number of characters 1..{MAX_TEXT_CHARS}")
        return cls(client, threshold, window)

    def _worst(self, text: str) -> tuple[str | None, int]:
        try:
            return self.client.analyze(text).worst
        except ContentSafetyError as e:
            raise protocol.RequestError(503, f"the content filter is unavailable: {e}", code="content_safety_unavailable",
                                        error_type="server_error") from None

    def check_prompt(self, messages: Sequence[Mapping[str, str]]) -> None:
        """Raise a 400 content_filter RequestError when the conversation so far is blocked."""
        category, severity = self._worst("\n".join(str(m.get("content", "")) for m in messages))
        if severity >= self.threshold:
            raise protocol.RequestError(400, f"the prompt was blocked by the content filter ({category} severity "
                                        f"{severity} >= {self.threshold})", param="messages", code="content_filter")

    def blocks(self, answer: str) -> bool:
        """Whether any part of the answer is harmful at the threshold (the service reads 10,000 characters
        a call: a longer answer is screened piece by piece, stopping at the first blocked piece)."""
        return any(self._worst(answer[start : start + MAX_TEXT_CHARS])[1] >= self.threshold
                   for start in range(0, max(len(answer), 1), MAX_TEXT_CHARS))

    def screen_stream(self, pieces: Iterable[str]) -> ScreenedStream:
        return ScreenedStream(self, pieces)


class ScreenedStream:
    """A streamed answer's pieces, released a window at a time once it is screened harmless (with the text before it).

    Iterating stops early when a window is blocked (then `blocked` is True); a Content Safety outage raises
    the guard's 503 RequestError. `calls` counts the screening calls made.
    """

    def __init__(self, guard: ContentGuard, pieces: Iterable[str]):
        self.guard = guard
        self.pieces = pieces
        self.blocked = False
        self.calls = 0

    def __iter__(self) -> Iterator[str]:
        released, held = "", []
        held_chars = 0
        for piece in self.pieces:
            held.append(piece)
            held_chars += len(piece)
            if held_chars >= self.guard.window_chars:
                if self._blocks(released, "".join(held)):
                    return
                yield from held
                released += "".join(held)
                held, held_chars = [], 0
        if held and not self._blocks(released, "".join(held)):
            yield from held

    def _blocks(self, released: str, window: str) -> bool:
        self.calls += 1
        self.blocked = self.guard.blocks(released[-CONTEXT_CHARS:] + window)
        return self.blocked


def _env_int(environ: Mapping[str, str], name: str, default: int, low: int, high: int, what: str) -> int:
    raw = (environ.get(name) or "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ServeError(f"environment variable {name}={raw!r} must be {what}")
    return value
