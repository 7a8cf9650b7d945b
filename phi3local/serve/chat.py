"""Chat with an exported onnxruntime-genai model: one-shot or an interactive REPL, streaming tokens.

Part of the serving runtime (phi3local.serve: torch-free, shipped whole as an Azure deployment's code).

The prompt is rendered with the model's own chat template (tokenizer_config.json `chat_template`, or
chat_template.jinja) with jinja2 the way transformers renders it (sandboxed, trim_blocks, lstrip_blocks),
then tokenized by onnxruntime-genai's tokenizer. Generation stops at any of genai_config.json's
eos_token_id (the export writes every stop id there) or after max_new_tokens. A LongRoPE model's
decode that grows past the switch point is re-prefilled once (`reprefill_at_switch`), so its tokens equal
those of fresh forwards.

`OnnxChatModel` loads a model once and serves many requests (for a server); `generate_onnx` is the
one-call form; `chat` is the command-line front end. A reasoning model's `<think>...</think>` trace is hidden
by `chat` (on a terminal "(thinking…)" stands in for it while it streams) or shown before the answer with
show_reasoning (`--show-reasoning`: dimmed on a colour terminal, between `<think>` lines otherwise); the REPL's
history keeps the answer only, as an API client sends back `content`.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phi3local.errors import Phi3LocalError
from phi3local.serve.json_files import as_id_list, read_json
from phi3local.serve.reasoning import (
    REASONING,
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningSplitter,
    prompt_opens_trace,
    split_reasoning,
)

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


class ChatError(Phi3LocalError, ValueError):
    """The model folder or the request cannot be used; the message says which and why."""


# Written by `export` next to genai_config.json for a LongRoPE model (onnxruntime-genai refuses unknown keys in
# its own config): {"original_max_position_embeddings": N}, where the long rotary factors take over.
LONGROPE_FILE = "longrope.json"
# onnxruntime-genai (0.18) re-prefills a "phi3" model by itself when its sequence reaches 4097 tokens, and only
# at batch 1 / beam 1 (measured in tests/test_family_longrope.py); any other switch point is ours to handle.
OWN_REPREFILL_SWITCH = 4096


def longrope_switch(model_dir: Path) -> int | None:
    """The LongRoPE switch point of an export (original_max_position_embeddings), or None without LongRoPE."""
    path = Path(model_dir) / LONGROPE_FILE
    return int(read_json(path)["original_max_position_embeddings"]) if path.is_file() else None


def reprefill_at_switch(generator, prompt_tokens: int, switch: int | None) -> bool:
    """Rewind the Generator and run its whole sequence again, once, when it first grows past the switch.

    The graph picks the rotary factors per run from the total sequence length, so after the switch every new
    token gets the long factors while the cached keys of the earlier ones keep the short factors: the decode
    drifts from a fresh forward of the same tokens (which uses the long factors throughout). Running the whole
    sequence again, as transformers' generate does, rebuilds the cache with the long factors. Call it after
    each generate_next_token(); True when it re-prefilled (the next token is then picked from the new logits).
    """
    if switch is None or switch == OWN_REPREFILL_SWITCH or prompt_tokens > switch:
        return False
    sequence = generator.get_sequence(0)
    if len(sequence) != switch + 1:
        return False
    sequence = np.asarray(sequence, dtype=np.int32)
    generator.rewind_to(0)
    generator.append_tokens(sequence)
    return True


def load_chat_template(model_dir: Path) -> str | None:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        template = read_json(cfg_path).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            by_name = {t.get("name"): t.get("template") for t in template}
            template = by_name.get("default") or next(iter(by_name.values()), None)
        if template:
            return template
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return None


def _special_tokens(model_dir: Path) -> dict[str, str]:
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        out[key] = value or ""
    return out


def render_chat_template(template: str, messages: Sequence[Message], add_generation_prompt: bool = True,
                         **variables) -> str:
    """Render a Hugging Face chat template the way transformers does."""
    return compile_chat_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                  **variables)


def compile_chat_template(template: str):
    """A chat template compiled the way transformers compiles it (a jinja2 Template: `.render(messages=...)`)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    new_tokens: int
    seconds: float  # generation time (prompt + decode), model load excluded
    time_to_first_token: float
    tokens_per_second: float  # new tokens / seconds
    finish_reason: str  # "stop" (a stop id) or "length"
    prompt: str = field(repr=False, default="")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _stream_fn(stream: Callable | None) -> Callable[[str], None] | None:
    if stream is None:
        return None
    if stream is builtins.print:
        return lambda piece: print(piece, end="", flush=True)
    return stream


class OnnxChatModel:
    """An onnxruntime-genai model, its tokenizer and chat template, loaded once."""

    def __init__(self, model_dir: Path):
        import onnxruntime_genai as og

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ChatError(f"{self.model_dir}: no such folder (give the folder `phi3local export` wrote)")
        if not (self.model_dir / "genai_config.json").is_file():
            raise ChatError(f"{self.model_dir} is not an ONNX export (no genai_config.json); export it first with "
                            "`phi3local export MODEL --out DIR`")
        self.genai_config = read_json(self.model_dir / "genai_config.json")
        model_cfg = self.genai_config.get("model")
        if not isinstance(model_cfg, dict):
            raise ChatError(f"{self.model_dir / 'genai_config.json'} has no \"model\" section; re-export the model")
        self.stop_ids = set(as_id_list(model_cfg.get("eos_token_id")))
        self.context_length = int(model_cfg.get("context_length", 4096))
        self.template = load_chat_template(self.model_dir)
        self.special_tokens = _special_tokens(self.model_dir)
        self.longrope_switch = longrope_switch(self.model_dir)
        self._compiled = None
        try:
            self.model = og.Model(str(self.model_dir))
        except RuntimeError as e:  # onnxruntime's own message: a damaged or cut-short model file
            raise ChatError(f"{self.model_dir}: onnxruntime-genai cannot load this export "
                            f"({str(e).splitlines()[0][:300]}); re-export it") from None
        self.tokenizer = og.Tokenizer(self.model)

    @staticmethod
    def _piece(decoder, token: int, first: bool) -> str:
        piece = decoder.decode(token)
        if first and piece.startswith(" "):
            # SentencePiece-style tokenizers mark the first word with a space that transformers'
            # decode strips (its Strip decoder); onnxruntime-genai's stream keeps it.
            piece = piece[1:]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of generated tokens exactly as `generate` streams it (stop ids left out)."""
        decoder = self.tokenizer.create_stream()
        pieces: list[str] = []
        for tok in tokens:
            if int(tok) in self.stop_ids:
                break
            piece = self._piece(decoder, int(tok), first=not pieces)
            if piece:
                pieces.append(piece)
        return "".join(pieces)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self.template is None:  # no template: plain concatenation of the contents
            return "\n".join(m["content"] for m in messages)
        return self.compile_template().render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                              **self.special_tokens)

    def iter_tokens(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int | None = None, seed: int | None = None) -> Iterator[tuple[int, str]]:
        """(token id, text piece) of each generated token; a stop token comes last, with piece "".

        Greedy at temperature 0, else sampling. A generator of its own per call (requests stay independent);
        closing it early (a stop sequence, a client gone) frees the onnxruntime-genai Generator at once.
        The server's decode loop (phi3local.serve.batching) runs the same `Decode` steps on its own thread.
        """
        decode = Decode(self, ids, max_new_tokens, temperature, top_p, top_k, seed)
        try:
            yield from self.pieces(decode.tokens(), ids)
        finally:
            decode.close()

    def pieces(self, tokens: Iterator[int], ids: np.ndarray) -> Iterator[tuple[int, str]]:
        """(token id, text piece) of generated token ids: a stop id ends it, with piece ""."""
        texts = self.texts()
        for tok in tokens:
            yield tok, texts(tok)
            if tok in self.stop_ids:
                return

    def texts(self) -> Callable[[int], str]:
        """A function from one sequence's generated token ids, in order, to their text pieces (a stop id: "")."""
        decoder = self.tokenizer.create_stream()
        emitted = 0

        def text(tok: int) -> str:
            nonlocal emitted
            if tok in self.stop_ids:
                return ""
            piece = self._piece(decoder, tok, first=not emitted)
            emitted += bool(piece)
            return piece

        return text

    def compile_template(self):
        """The chat template compiled once (rendering a request then takes microseconds, not milliseconds)."""
        if self._compiled is None and self.template is not None:
            self._compiled = compile_chat_template(self.template)
        return self._compiled

    def generate(
        self,
        messages: Sequence[Message],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        prompt = self.render(messages)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. bytes of another encoding that reached us as surrogates
            raise ChatError(f"the prompt is not valid text (character {e.start}); write it in UTF-8") from None
        ids = np.asarray(self.tokenizer.encode(prompt), dtype=np.int32)
        if len(ids) >= self.context_length:
            raise ChatError(f"the prompt is {len(ids)} tokens, over the model's context of {self.context_length} "
                            "(shorten it, or /reset the conversation)")
        emit = _stream_fn(stream)
        t0 = time.perf_counter()
        ttft = 0.0
        tokens: list[int] = []
        pieces: list[str] = []
        for tok, piece in self.iter_tokens(ids, max_new_tokens, temperature, top_p, top_k, seed):
            if not tokens:
                ttft = time.perf_counter() - t0
            tokens.append(tok)
            if piece:
                pieces.append(piece)
                if emit is not None:
                    emit(piece)
        seconds = time.perf_counter() - t0
        text = "".join(pieces)
        finish = "stop" if tokens and tokens[-1] in self.stop_ids else "length"
        return GenerationResult(
            text=text, tokens=tokens, prompt_tokens=len(ids), new_tokens=len(tokens), seconds=seconds,
            time_to_first_token=ttft, tokens_per_second=len(tokens) / seconds if seconds > 0 else 0.0,
            finish_reason=finish, prompt=prompt,
        )


class Decode:
    """One sequence's decoding: its own onnxruntime-genai Generator (its own KV cache) and search options.

    `step()` generates one token (the prompt is prefilled by the first call) and applies the LongRoPE
    re-prefill rule; `done` says whether the sequence has ended (a stop id, max_new_tokens, or the context).
    `iter_tokens` steps it in the caller's thread; the server's decode loop steps many of them in turn on one
    thread (phi3local.serve.batching). Either way a sequence's tokens come from the same calls in the same
    order, so they do not depend on what else is running.
    """

    def __init__(self, model: OnnxChatModel, ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int | None = None, seed: int | None = None):
        self.model, self.ids, self.max_new_tokens = model, ids, max_new_tokens
        self.options = search_options(len(ids), max_new_tokens, model.context_length, temperature, top_p, top_k,
                                      seed)
        self.generator = None
        self.produced = 0
        self.done = max_new_tokens < 1

    def step(self) -> int:
        import onnxruntime_genai as og

        if self.generator is None:
            params = og.GeneratorParams(self.model.model)
            params.set_search_options(**self.options)
            self.generator = og.Generator(self.model.model, params)
            self.generator.append_tokens(self.ids)
        generator = self.generator
        generator.generate_next_token()
        tok = int(generator.get_next_tokens()[0])
        self.produced += 1
        if tok in self.model.stop_ids or self.produced >= self.max_new_tokens:
            self.done = True
        else:
            reprefill_at_switch(generator, len(self.ids), self.model.longrope_switch)
            self.done = generator.is_done()
        return tok

    def tokens(self) -> Iterator[int]:
        while not self.done:
            yield self.step()

    def close(self) -> None:
        """Free the Generator (its KV cache) now."""
        self.generator = None
        self.done = True


def search_options(prompt_tokens: int, max_new_tokens: int, context_length: int, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int | None = None, seed: int | None = None) -> dict:
    options = {"max_length": min(prompt_tokens + max_new_tokens, context_length)}
    if temperature and temperature > 0:
        options.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
        if top_k is not None:
            options["top_k"] = int(top_k)
        if seed is not None:
            options["random_seed"] = int(seed)
    else:
        options["do_sample"] = False
    return options


def generate_onnx(
    model_dir: Path | OnnxChatModel,
    messages: Sequence[Message],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
) -> dict:
    """Generate an assistant reply for `messages` (chat-template rendered) with an ONNX model.

    model_dir: an exported folder or an already loaded OnnxChatModel (a server keeps one).
    Returns {"text", "tokens", "prompt_tokens", "new_tokens", "seconds", "time_to_first_token",
    "tokens_per_second", "finish_reason", "prompt"}.
    """
    model = model_dir if isinstance(model_dir, OnnxChatModel) else OnnxChatModel(Path(model_dir))
    return model.generate(messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stream=stream).to_dict()


DIM, RESET = "\x1b[2m", "\x1b[0m"
THINKING = "(thinking…)"
CLEAR_LINE = "\r\x1b[K"
NO_ANSWER = "(no answer: generation stopped inside the reasoning trace; raise --max-new-tokens)"


def _colour_terminal() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class _AnswerPrinter:
    """One streamed answer for `chat`: a reasoning trace shown (dimmed, or between `<think>` lines) or hidden
    ("(thinking…)" on a terminal while it streams, erased when the answer starts), then the answer."""

    def __init__(self, emit: Callable[[str], None], opened: bool, show: bool, terminal: bool):
        self.emit, self.show, self.terminal = emit, show, terminal
        self.splitter = ReasoningSplitter(opened)
        self.in_trace = False  # a shown trace whose end is not written yet
        self.waiting = False  # THINKING is on the screen

    def feed(self, piece: str) -> None:
        self._write(self.splitter.feed(piece))

    def finish(self) -> None:
        self._write(self.splitter.flush())
        self._end_trace()
        if self.splitter.had_trace and not self.splitter.closed:
            self.emit(NO_ANSWER)

    def _write(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            if kind != REASONING:
                self._end_trace()
                self.emit(text)
            elif self.show:
                if not self.in_trace:
                    self.emit(DIM if self.terminal else f"{THINK_OPEN}\n")
                    self.in_trace = True
                self.emit(text)
            elif self.terminal and not self.waiting:
                self.emit(THINKING)
                self.waiting = True

    def _end_trace(self) -> None:
        if self.in_trace:
            self.emit(f"{RESET}\n\n" if self.terminal else f"\n{THINK_CLOSE}\n\n")
            self.in_trace = False
        if self.waiting:
            self.emit(CLEAR_LINE)
            self.waiting = False


def chat(
    model_dir: Path,
    prompt: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: Callable | None = print,
    input_fn: Callable[[str], str] = input,
    show_reasoning: bool = False,
) -> dict | None:
    """Chat with the ONNX model in model_dir.

    With `prompt`: one turn; streams the answer to `stream` and returns the generate_onnx dict (text,
    tokens, tokens_per_second, ...) with `answer` and `reasoning` (split_reasoning of text: the answer after
    a reasoning trace, and the trace or None). Without: a REPL (`/reset` forgets the conversation, `/exit` or
    end of input quits); returns None. A reasoning trace is streamed only with show_reasoning.
    """
    model = OnnxChatModel(Path(model_dir))
    emit = _stream_fn(stream)
    terminal = stream is builtins.print and _colour_terminal()
    base: list[Message] = [{"role": "system", "content": system}] if system else []

    def answer(messages: list[Message]) -> tuple[GenerationResult, str | None, str]:
        opened = prompt_opens_trace(model.render(messages))
        printer = _AnswerPrinter(emit, opened, show_reasoning, terminal) if emit is not None else None
        result = model.generate(messages, max_new_tokens, temperature, top_p,
                                stream=printer.feed if printer is not None else None)
        if printer is not None:
            printer.finish()
        trace, text = split_reasoning(result.text, opened=opened)
        return result, trace, text

    if prompt is not None:
        result, trace, text = answer(base + [{"role": "user", "content": prompt}])
        if emit is not None and stream is builtins.print:
            print(flush=True)
        return {**result.to_dict(), "answer": text, "reasoning": trace}

    history = list(base)
    say = emit or (lambda s: None)
    say(f"chatting with {model.model_dir} (/reset to start over, /exit to quit)\n")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            say("\n")
            return None
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return None
        if line == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        result, _, text = answer(history)
        history.append({"role": "assistant", "content": text})  # without the trace, as API clients send it back
        say(f"\n[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s]\n")
