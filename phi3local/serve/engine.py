"""The ONNX generation backend of the server: an exported model loaded once, one Generator per request.

It reuses `OnnxChatModel` (loading, chat template, tokenizer, stop ids, and `iter_tokens`, the same
generation loop as `phi3local chat`) and adds what a server needs: a prompt checked before a stream
starts, and a per-request record of completion tokens and finish reason.

Nothing here is shared between requests but the read-only model and tokenizer (onnxruntime sessions
run concurrently), so requests on a threaded worker are independent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3local.serve import protocol
from phi3local.serve.chat import OnnxChatModel


@dataclass
class Prompt:
    """A request's prompt, tokenized and checked against the context."""

    ids: np.ndarray
    max_new_tokens: int  # the request's max_tokens, less what the context has no room for

    @property
    def tokens(self) -> int:
        return len(self.ids)


class Generation:
    """One request's generation: iterate for the text pieces; then read completion_tokens, finish_reason."""

    def __init__(self, run: Callable[[Generation], Iterator[str]]):
        self.completion_tokens = 0  # every generated token, the one that ended the turn included
        self.finish_reason = "length"  # "stop" when the model ended its turn
        self._pieces = run(self)  # a generator: nothing runs before the first next()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()


class OnnxEngine:
    def __init__(self, model_dir: str | Path):
        self.chat_model = OnnxChatModel(Path(model_dir))
        self.model_dir = self.chat_model.model_dir
        self.context_length = self.chat_model.context_length

    def prepare(self, messages: Sequence[dict], max_tokens: int) -> Prompt:
        """Render and tokenize; raises RequestError (422) for a prompt the model cannot take."""
        from jinja2.exceptions import TemplateError

        try:
            text = self.chat_model.render(messages)
        except TemplateError as e:  # e.g. a template that raise_exception()s on a role order it refuses
            raise protocol.template_refused(str(e)) from None
        ids = np.asarray(self.chat_model.tokenizer.encode(text), dtype=np.int32)
        if len(ids) >= self.context_length:
            raise protocol.context_exceeded(len(ids), self.context_length)
        return Prompt(ids=ids, max_new_tokens=min(max_tokens, self.context_length - len(ids)))

    def generate(self, prompt: Prompt, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Generation:
        return Generation(lambda generation: self._pieces(generation, prompt, temperature, top_p, seed))

    def _pieces(self, generation: Generation, prompt: Prompt, temperature: float, top_p: float,
                seed: int | None) -> Iterator[str]:
        tokens = self.chat_model.iter_tokens(prompt.ids, prompt.max_new_tokens, temperature, top_p, seed=seed)
        try:
            for token, piece in tokens:
                generation.completion_tokens += 1
                if token in self.chat_model.stop_ids:
                    generation.finish_reason = "stop"
                    return
                if piece:
                    yield piece
        finally:
            tokens.close()  # frees the request's Generator (its KV cache) now, also when the caller stops early
