"""A chat request through an engine: parse, generate, apply stop sequences, answer or stream.

A reasoning model's trace (`<think>...</think>` before the answer, or after a prompt that opened it) is split
off (phi3local.serve.reasoning): the answer is `content`, the trace `reasoning_content` (streamed: the trace's
`reasoning_content` deltas, then the answer's `content` deltas). Stop sequences apply to the generated text,
trace included, before the split; the Content Safety guard screens it whole, so the trace a caller receives
is screened as the answer is. Output without a trace is answered exactly as before.

Independent of the HTTP server (score.py adapts it to azmlinfsrv) and of the engine: anything with
`prepare(messages, max_tokens) -> Prompt` and `generate(prompt, temperature=, top_p=, seed=) ->
Generation` (engine.py's OnnxEngine; the benchmark's PyTorch engine) serves the same protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from phi3local.serve import protocol
from phi3local.serve.engine import Generation, Prompt
from phi3local.serve.guard import REFUSAL_TEXT, ContentGuard
from phi3local.serve.reasoning import REASONING, ReasoningSplitter, split_reasoning
from phi3local.serve.settings import ServeSettings
from phi3local.serve.stops import StopMatcher

logger = logging.getLogger("phi3local.serve")


class Engine(Protocol):
    model_dir: Path

    def prepare(self, messages, max_tokens: int) -> Prompt: ...

    def generate(self, prompt: Prompt, *, temperature: float, top_p: float, seed: int | None) -> Generation: ...


class ChatService:
    def __init__(self, engine: Engine, settings: ServeSettings | None = None, guard: ContentGuard | None = None):
        self.engine = engine
        self.settings = settings or ServeSettings()
        self.model_name = self.settings.model_name or Path(engine.model_dir).name
        self.guard = guard  # Azure AI Content Safety on prompts and answers, when configured
        self.created = protocol.now()  # the `created` of the model list (GET /v1/models)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> ChatService:
        """The ONNX model under AZUREML_MODEL_DIR with the limits of the PHI3LOCAL_* variables."""
        from phi3local.serve.engine import OnnxEngine
        from phi3local.serve.errors import ServeError
        from phi3local.serve.model_dir import find_model_dir

        root = environ.get("AZUREML_MODEL_DIR")
        if not root:
            raise ServeError("AZUREML_MODEL_DIR is not set: start the server with --model_dir (or `phi3local serve "
                             "ONNX_DIR`)")
        settings = ServeSettings.from_env(environ)
        model_dir = find_model_dir(root)
        logger.info("loading %s (max_tokens cap %d, body limit %d bytes, %s)", model_dir, settings.max_tokens_cap,
                    settings.max_body_bytes,
                    f"decode loop of {settings.max_batch}" if settings.max_batch else "no decode loop")
        return cls(OnnxEngine(model_dir, max_batch=settings.max_batch), settings, ContentGuard.from_env(environ))

    def parse(self, body: bytes) -> protocol.ChatRequest:
        return protocol.parse_chat_request(body, max_tokens_cap=self.settings.max_tokens_cap,
                                           max_body_bytes=self.settings.max_body_bytes)

    def _start(self, request: protocol.ChatRequest) -> tuple[Prompt, Generation]:
        if self.guard is not None:
            self.guard.check_prompt(request.messages)
        prompt = self.engine.prepare(request.messages, request.max_tokens)
        generation = self.engine.generate(prompt, temperature=request.temperature, top_p=request.top_p,
                                          seed=request.seed)
        return prompt, generation

    def complete(self, request: protocol.ChatRequest) -> dict:
        """The chat.completion body for a non-streamed request."""
        prompt, generation = self._start(request)
        answer = _Answer(generation, request.stop)
        text, finish_reason = "".join(answer), answer.finish_reason
        if self.guard is not None and self.guard.blocks(text):  # the trace too: a caller would read it
            trace, text, finish_reason = None, REFUSAL_TEXT, "content_filter"
        else:
            trace, text = split_reasoning(text, opened=prompt.opened)
        return protocol.completion_body(
            completion_id=protocol.new_completion_id(), created=protocol.now(), model=self.model_name, text=text,
            finish_reason=finish_reason, prompt_tokens=prompt.tokens,
            completion_tokens=generation.completion_tokens, reasoning=trace)

    def stream(self, request: protocol.ChatRequest, on_done: Callable[[StreamOutcome], None] | None = None
               ) -> Iterator[str]:
        """Server-sent events for a streamed request. The prompt is checked now, so a request the model
        cannot take fails with its 4xx before any event is sent. on_done gets the outcome when the stream ends
        (finished, failed, or the client gone)."""
        prompt, generation = self._start(request)
        return self._events(request, prompt, _Answer(generation, request.stop), on_done)

    def _events(self, request: protocol.ChatRequest, prompt: Prompt, answer: _Answer,
                on_done: Callable[[StreamOutcome], None] | None = None) -> Iterator[str]:
        ids = {"completion_id": protocol.new_completion_id(), "created": protocol.now(), "model": self.model_name}
        outcome = StreamOutcome(prompt_tokens=prompt.tokens)
        # With the guard, text reaches the client only once Content Safety has screened it (guard.py), the
        # trace as the answer: the split comes after the screening.
        screened = self.guard.screen_stream(answer) if self.guard is not None else None
        splitter = ReasoningSplitter(opened=prompt.opened)

        def deltas(parts: list[tuple[str, str]]) -> Iterator[str]:
            for kind, text in parts:
                if kind == REASONING:
                    outcome.reasoning.append(text)
                    yield protocol.sse_event(protocol.chunk_body(**ids, delta={"reasoning_content": text}))
                else:
                    outcome.pieces.append(text)
                    yield protocol.sse_event(protocol.chunk_body(**ids, delta={"content": text}))

        try:
            yield protocol.sse_event(protocol.chunk_body(**ids, delta={"role": "assistant", "content": ""}))
            for text in screened if screened is not None else answer:
                yield from deltas(splitter.feed(text))
            yield from deltas(splitter.flush())  # held back, and screened already if guarded
            finish_reason = answer.finish_reason
            if screened is not None and screened.blocked:
                refusal = f"\n\n{REFUSAL_TEXT}" if outcome.pieces else REFUSAL_TEXT
                outcome.pieces.append(refusal)
                yield protocol.sse_event(protocol.chunk_body(**ids, delta={"content": refusal}))
                finish_reason = "content_filter"
            yield protocol.sse_event(protocol.chunk_body(**ids, delta={}, finish_reason=finish_reason))
            if request.include_usage:
                yield protocol.sse_event(protocol.chunk_body(
                    **ids, delta=None, usage_=protocol.usage(prompt.tokens, answer.generation.completion_tokens)))
            yield protocol.SSE_DONE
            outcome.finish_reason = finish_reason
        except protocol.RequestError as e:  # Content Safety unreachable mid-stream: fail closed, say so
            logger.warning("streamed answer stopped: %s", e.message)
            outcome.error = e.code
            yield protocol.sse_event(e.body())
        except Exception:
            # The 200 and its headers are sent already: say it in the stream, and keep the worker serving.
            logger.exception("generation failed in a streamed response")
            outcome.error = "server_error"
            yield protocol.sse_event(protocol.error_body("generation failed; see the server log", code="server_error",
                                                         error_type="server_error"))
        finally:
            answer.close()  # the client may have gone: free the generator now
            outcome.completion_tokens = answer.generation.completion_tokens
            if on_done is not None:
                on_done(outcome)


@dataclass
class StreamOutcome:
    """What a streamed answer turned out to be, for monitoring: its text, tokens, and how it ended."""

    prompt_tokens: int
    pieces: list[str] = field(default_factory=list)  # the answer's (`content`) deltas
    reasoning: list[str] = field(default_factory=list)  # a reasoning trace's (`reasoning_content`) deltas
    completion_tokens: int = 0
    finish_reason: str | None = None  # None: it did not finish (failed, or the client went away)
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class _Answer:
    """A generation's text with the request's stop sequences applied (non-empty pieces only)."""

    def __init__(self, generation: Generation, stops: tuple[str, ...]):
        self.generation = generation
        self.matcher = StopMatcher(stops) if stops else None

    @property
    def finish_reason(self) -> str:
        return "stop" if self.matcher is not None and self.matcher.stopped else self.generation.finish_reason

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self.generation:
                text = self.matcher.feed(piece) if self.matcher is not None else piece
                if text:
                    yield text
                if self.matcher is not None and self.matcher.stopped:
                    return
            rest = self.matcher.flush() if self.matcher is not None else ""
            if rest:
                yield rest
        finally:
            self.close()

    def close(self) -> None:
        self.generation.close()
