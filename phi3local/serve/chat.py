"""Chat with an exported onnxruntime-genai model: one-shot or an interactive REPL, streaming tokens.

Part of the serving runtime (phi3local.serve: torch-free, shipped whole as an Azure deployment's code).

The prompt is rendered with the model's own chat template (tokenizer_config.json `chat_template`, or
chat_template.jinja) with jinja2 the way transformers renders it (sandboxed, trim_blocks, lstrip_blocks),
then tokenized by onnxruntime-genai's tokenizer. Generation stops at any of genai_config.json's
eos_token_id (the export writes every stop id there) or after max_new_tokens. A LongRoPE model's
decode that grows past the switch point is re-prefilled once (`reprefill_at_switch`), so its tokens equal
those of fresh forwards.

`OnnxChatModel` loads a model once and serves many requests (for a server); `generate_onnx` is the
one-call form; `chat` is the command-line front end.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phi3local.errors import Phi3LocalError
from phi3local.serve.json_files import as_id_list, read_json

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
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **variables)


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
        try:
            self.model = og.Model(str(self.model_dir))
        except RuntimeError as e:  # onnxruntime's own message: a damaged or cut-short model file
            raise ChatError(f"{self.model_dir}: onnxruntime-genai cannot load this export "
                            f"({str(e).splitlines()[0][:300]}); re-export it") from None
        self.tokenizer = og.Tokenizer(self.model)
        self.longrope_switch = longrope_switch(self.model_dir)

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
        return render_chat_template(self.template, messages, add_generation_prompt, **self.special_tokens)

    def iter_tokens(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int | None = None, seed: int | None = None) -> Iterator[tuple[int, str]]:
        """(token id, text piece) of each generated token; a stop token comes last, with piece "".

        Greedy at temperature 0, else sampling. A generator of its own per call (requests stay independent);
        closing it early (a stop sequence, a client gone) frees the onnxruntime-genai Generator at once.
        """
        import onnxruntime_genai as og

        options = {"max_length": min(len(ids) + max_new_tokens, self.context_length)}
        if temperature and temperature > 0:
            options.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
            if top_k is not None:
                options["top_k"] = int(top_k)
            if seed is not None:
                options["random_seed"] = int(seed)
        else:
            options["do_sample"] = False
        params = og.GeneratorParams(self.model)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        try:
            decoder = self.tokenizer.create_stream()
            generator.append_tokens(ids)
            emitted = produced = 0
            while not generator.is_done() and produced < max_new_tokens:
                generator.generate_next_token()
                tok = int(generator.get_next_tokens()[0])
                produced += 1
                if tok in self.stop_ids:
                    yield tok, ""
                    return
                if produced < max_new_tokens:
                    reprefill_at_switch(generator, len(ids), self.longrope_switch)
                piece = self._piece(decoder, tok, first=not emitted)
                emitted += bool(piece)
                yield tok, piece
        finally:
            del generator

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


def chat(
    model_dir: Path,
    prompt: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: Callable | None = print,
    input_fn: Callable[[str], str] = input,
) -> dict | None:
    """Chat with the ONNX model in model_dir.

    With `prompt`: one turn; streams the answer to `stream` and returns the generate_onnx dict (text,
    tokens, tokens_per_second, ...). Without: a REPL (`/reset` forgets the conversation, `/exit` or
    end of input quits); returns None.
    """
    model = OnnxChatModel(Path(model_dir))
    emit = _stream_fn(stream)
    base: list[Message] = [{"role": "system", "content": system}] if system else []

    if prompt is not None:
        result = model.generate(base + [{"role": "user", "content": prompt}], max_new_tokens, temperature, top_p,
                                stream=emit)
        if emit is not None and stream is builtins.print:
            print(flush=True)
        return result.to_dict()

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
        result = model.generate(history, max_new_tokens, temperature, top_p, stream=emit)
        history.append({"role": "assistant", "content": result.text})
        say(f"\n[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s]\n")
