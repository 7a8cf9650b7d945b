"""Stop sequences over streamed text: cut the answer before the first one, even across pieces.

Text that could be the start of a stop sequence is held back until the next piece settles it, so a
streamed answer never shows a stop sequence's first characters and the concatenated deltas equal the
non-streamed answer.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> str:
        """The text now safe to emit; after a stop sequence shows up, `stopped` is True and nothing more comes."""
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[:min(hits)]
        keep = self._open_prefix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back, once generation has ended without a stop sequence."""
        held, self._held = self._held, ""
        return held

    def _open_prefix(self, text: str) -> int:
        # Length of the longest end of `text` that a stop sequence starts with (and does not complete).
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
