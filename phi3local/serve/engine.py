"""The ONNX generation backend of the server: an exported model loaded once, one Generator per request.

It reuses `OnnxChatModel` (loading, chat template, tokenizer, stop ids, and `iter_tokens`, the same
generation loop as `phi3local chat`) and adds what a server needs: a prompt checked before a stream
starts, and a per-request record of completion tokens and finish reason.

Requests on a threaded worker share the read-only model and tokenizer. Each request decodes in its own thread
(its own Generator: requests are independent), or, with max_batch=N > 0, on the worker's decode loop
(phi3local.serve.batching: one thread advances up to N running requests a token each per round, each with its
own Generator and KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3local.serve import protocol
from phi3local.serve.batching import DecodeLoop
from phi3local.serve.chat import OnnxChatModel
from phi3local.serve.reasoning import prompt_opens_trace
from phi3local.serve.settings import DEFAULT_MAX_BATCH


@dataclass
class Prompt:
    """A request's prompt, tokenized and checked against the context."""

    ids: np.ndarray
    max_new_tokens: int  # the request's max_tokens, less what the context has no room for
    opened: bool = False  # the prompt ends with `<think>`: the answer starts inside a reasoning trace (reasoning.py)

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
    def __init__(self, model_dir: str | Path, max_batch: int = DEFAULT_MAX_BATCH):
        """max_batch: requests the decode loop advances together (others wait their turn); 0: no loop, each
        request decodes in its own thread."""
        self.chat_model = OnnxChatModel(Path(model_dir))
        self.model_dir = self.chat_model.model_dir
        self.context_length = self.chat_model.context_length
        self.loop = DecodeLoop(self.chat_model, max_batch) if max_batch > 0 else None

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
        return Prompt(ids=ids, max_new_tokens=min(max_tokens, self.context_length - len(ids)),
                      opened=prompt_opens_trace(text))

    def generate(self, prompt: Prompt, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Generation:
        return Generation(lambda generation: self._pieces(generation, prompt, temperature, top_p, seed))

    def _pieces(self, generation: Generation, prompt: Prompt, temperature: float, top_p: float,
                seed: int | None) -> Iterator[str]:
        if self.loop is not None:
            tokens = self.loop.tokens(prompt.ids, prompt.max_new_tokens, temperature, top_p, seed=seed)
        else:
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
            tokens.close()  # frees the request's Generator (its KV cache), also when the caller stops early
