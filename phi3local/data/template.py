"""Encode examples with the tokenizer's own chat template and a loss mask on the assistant turns only.

How the mask is found, for any template that renders a conversation as a growing prefix:
- the conversation is rendered with `apply_chat_template(..., tokenize=False)` and tokenised once, with
  `add_special_tokens=False` (the template writes any BOS itself) and character offsets;
- assistant turn k is trained from len(render(messages[:k], add_generation_prompt=True)) (just after the
  generation prompt) to len(render(messages[:k+1])) minus the template's end-of-conversation suffix
  (Phi-3 appends eos_token when add_generation_prompt is false; the suffix is found by rendering probes);
- a token is trained when its character span overlaps a trained span (a token that straddles the start
  only through whitespace, e.g. a chat tag with rstrip that swallowed the content's leading space, is not).
For Phi-3 this trains exactly the assistant content and its `<|end|>`; tags, system and user turns and the
final `<|endoftext|>` get label -100 (Phi-4: the content and its `<|im_end|>`). If a template does not render
prefixes as prefixes (some templates rewrite earlier turns), a ChatTemplateError says so instead of training on
a wrong mask.

Reasoning traces (Phi-4-reasoning, Phi-4-mini-reasoning): an assistant turn's `reasoning` field is written into
its content as `<think>\n{reasoning}\n</think>\n\n{content}` (`join_reasoning`), and content that opens with
`<think>...</think>` is taken as it is. With train_on_reasoning (the default) the trace is trained with the
answer; without, the trace and the whitespace after it are masked and only the answer and the end of the turn
are trained (the model still reads the trace). `split_reasoning` splits generated text into trace and answer.

Labels are aligned with input_ids (not shifted): labels[i] is input_ids[i] when token i is a target.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from phi3local.errors import Phi3LocalError
from phi3local.serve.reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning  # noqa: F401  (re-exported)

IGNORE = -100


class ChatTemplateError(Phi3LocalError, ValueError):
    """The tokenizer's chat template cannot be used to find the assistant spans (or rejected a row)."""


class TemplateRejected(ChatTemplateError):
    """The chat template raised an error for one conversation (a row problem, not a template problem)."""


class OverLength(ValueError):
    """A row does not fit max_seq_len (with truncation=error, or even after dropping all older turns)."""

    def __init__(self, n_tokens: int, max_seq_len: int, reason: str):
        self.n_tokens = n_tokens
        self.max_seq_len = max_seq_len
        super().__init__(reason)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 where the token is not trained
    truncated_turns: int = 0  # (user, assistant) exchanges dropped from the start to fit max_seq_len
    full_length: int = 0  # tokens before truncation
    label: int | None = None  # class index for task=classification

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def truncated(self) -> bool:
        return len(self.input_ids) < self.full_length


# --------------------------------------------------------------------------------------------- reasoning

# THINK_OPEN, THINK_CLOSE and split_reasoning: phi3local.serve.reasoning (imported above), shared with chat/serve.
# Message keys that hold an assistant turn's trace: ours, and the name OpenAI-style APIs answer with.
REASONING_KEYS = ("reasoning", "reasoning_content")


def join_reasoning(reasoning: str, content: str) -> str:
    """An assistant turn's content with its trace written first, the way reasoning models answer."""
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content}"


def reasoning_span(content: str) -> tuple[int, int] | None:
    """Where the trace of an assistant content is: from its `<think>` (only leading whitespace before it) through
    `</think>` and the whitespace after it; None without one. A `<think>` that is never closed is a ValueError."""
    start = len(content) - len(content.lstrip())
    if not content.startswith(THINK_OPEN, start):
        return None
    close = content.find(THINK_CLOSE, start + len(THINK_OPEN))
    if close < 0:
        raise ValueError(f"the content opens a reasoning trace with {THINK_OPEN} and never closes it with {THINK_CLOSE}")
    end = close + len(THINK_CLOSE)
    return start, end + len(content[end:]) - len(content[end:].lstrip())


def with_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each `reasoning` (or `reasoning_content`) field written into its assistant content.

    An empty trace adds nothing. A trace that is not text, sits on a non-assistant turn, comes with content that
    already opens one with `<think>`, or is given under both names is a TemplateRejected (that row's problem).
    """
    if not any(k in m for m in messages for k in REASONING_KEYS):
        return messages
    out = []
    for i, m in enumerate(messages):
        keys = [k for k in REASONING_KEYS if m.get(k) is not None]
        m = {k: v for k, v in m.items() if k not in REASONING_KEYS}
        if not keys:
            out.append(m)
            continue
        where = f"messages[{i}].{keys[0]}"
        if len(keys) > 1:
            raise TemplateRejected(f"messages[{i}] has both reasoning and reasoning_content: keep one")
        trace = messages[i][keys[0]]
        if not isinstance(trace, str):
            raise TemplateRejected(f"{where} must be a string, got {type(trace).__name__}")
        if m["role"] != "assistant":
            raise TemplateRejected(f"{where}: only assistant turns can have a reasoning trace, this one is {m['role']}")
        if trace.strip():
            if m["content"].lstrip().startswith(THINK_OPEN):
                raise TemplateRejected(f"{where}: the content already opens a trace with {THINK_OPEN}: give it once")
            m["content"] = join_reasoning(trace, m["content"])
        out.append(m)
    return out


# --------------------------------------------------------------------------------------------- render


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    # Only role and content reach the template (`weight` is ours, and templates may choke on extra keys).
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as text, written by the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the tokenizer has no chat_template (tokenizer_config.json 'chat_template'); chat data needs one"
        )
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 comes with transformers
        TemplateError = Exception
    try:
        text = tokenizer.apply_chat_template(
            _template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        raise TemplateRejected(f"the chat template rejected this conversation: {e}") from e
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} is a slow tokenizer; the loss mask needs character offsets "
            "(return_offsets_mapping), which only fast tokenizers give. Load it with PreTrainedTokenizerFast."
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _template_key(tokenizer) -> tuple:
    # What a probe's result depends on; not id(tokenizer), which Python reuses after garbage collection.
    return (type(tokenizer).__name__, str(tokenizer.chat_template), str(tokenizer.bos_token),
            str(tokenizer.eos_token), len(tokenizer))


_SUFFIX_CACHE: dict[tuple, str] = {}


def end_suffix(tokenizer) -> str:
    """What the template writes after the last message when add_generation_prompt is false (Phi-3: eos).

    Found by rendering a probe conversation three ways: the divergence point against the generation
    prompt version and against a longer conversation, moved back to a token boundary (Phi-3's tags all
    start with '<|', which a character comparison would otherwise count as shared).
    """
    key = _template_key(tokenizer)
    if key in _SUFFIX_CACHE:
        return _SUFFIX_CACHE[key]
    probe = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi"}]
    plain = render(tokenizer, probe)
    with_prompt = render(tokenizer, probe, add_generation_prompt=True)
    longer = render(tokenizer, probe + [{"role": "user", "content": "Again"},
                                        {"role": "assistant", "content": "Indeed"}])
    cut = min(_common_prefix_len(plain, with_prompt), _common_prefix_len(plain, longer))
    if cut < len(plain):
        _, offsets = _offsets(tokenizer, plain)
        for start, end in offsets:
            if start < cut < end:
                cut = min(cut, start)
    suffix = plain[cut:]
    if "General Kenobi" in suffix:
        raise ChatTemplateError(
            "the chat template does not render a conversation as a prefix of a longer one (or of itself with "
            "add_generation_prompt=True), so the assistant spans cannot be found by prefix rendering; "
            "use a template that renders turns in order without rewriting earlier ones"
        )
    _SUFFIX_CACHE[key] = suffix
    return suffix


# --------------------------------------------------------------------------------------------- encode


def _answer_spans(full: str, start: int, end: int, content: str, k: int) -> list[tuple[int, int]]:
    """The parts of assistant turn k's rendered span [start, end) that are not its reasoning trace."""
    try:
        span = reasoning_span(content)
    except ValueError as e:
        raise TemplateRejected(f"assistant message {k}: {e}") from None
    if span is None:
        return [(start, end)]
    trace = content[span[0]:span[1]].rstrip()  # through </think>; the whitespace after it may be rendered otherwise
    at = full.find(trace, start, end)
    if at < 0:
        raise ChatTemplateError(
            f"the chat template does not write assistant message {k}'s reasoning trace as it is, so it cannot be "
            "masked; use data.train_on_reasoning=true (the trace is then trained with the answer)")
    after = at + len(trace)
    after += len(full[after:end]) - len(full[after:end].lstrip())
    return [(a, b) for a, b in ((start, at), (after, end)) if full[a:b].strip()]


def _assistant_spans(tokenizer, messages: list[dict[str, Any]], full: str, train_on_reasoning: bool = True
                     ) -> list[tuple[int, int]]:
    suffix = end_suffix(tokenizer)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], add_generation_prompt=True)
        upto = render(tokenizer, messages[: k + 1])
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"the chat template does not render message {k}'s generation prompt as a prefix of the whole "
                "conversation (render(messages[:k], add_generation_prompt=True) is not a prefix of "
                "render(messages)); this template cannot be masked by prefix rendering"
            )
        end = len(upto) - len(suffix) if suffix and upto.endswith(suffix) else len(upto)
        if not full.startswith(upto[:end]):
            raise ChatTemplateError(
                f"the chat template renders the conversation up to message {k} differently from the whole "
                "conversation (it is not a prefix); this template cannot be masked by prefix rendering"
            )
        if end <= len(prompt):
            raise ChatTemplateError(f"assistant message {k} renders to no text after the generation prompt")
        if m.get("weight", 1) == 0:
            continue
        if train_on_reasoning:
            spans.append((len(prompt), end))
        else:
            spans += _answer_spans(full, len(prompt), end, m["content"], k)
    return spans


def _mask(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], text: str
          ) -> list[int]:
    labels = [IGNORE] * len(ids)
    starts = [s for s, _ in offsets]
    for a, b in spans:
        # Tokens are in text order: look from the first token that could end after a.
        i = bisect.bisect_left(starts, a)
        while i > 0 and offsets[i - 1][1] > a:
            i -= 1
        while i < len(ids) and offsets[i][0] < b:
            s, e = offsets[i]
            if e > a and (s >= a or text[a:min(e, b)].strip()):
                labels[i] = ids[i]
            i += 1
    return labels


_SYSTEM_CACHE: dict[tuple, bool] = {}


def supports_system(tokenizer) -> bool:
    """Whether the chat template writes a system message at all (Phi-3's April-2024 template drops it)."""
    key = _template_key(tokenizer)
    if key not in _SYSTEM_CACHE:
        probe = [{"role": "system", "content": "Sentinel system text"}, {"role": "user", "content": "x"}]
        try:
            _SYSTEM_CACHE[key] = "Sentinel system text" in render(tokenizer, probe)
        except ChatTemplateError:
            _SYSTEM_CACHE[key] = False
    return _SYSTEM_CACHE[key]


def _encode_full(tokenizer, messages: list[dict[str, Any]], train_on_reasoning: bool = True
                 ) -> tuple[list[int], list[int], list[tuple[int, int]], str]:
    if messages and messages[0]["role"] == "system" and not supports_system(tokenizer):
        raise ChatTemplateError(
            "this chat template drops (or rejects) system messages; leave out data.system_prompt or put "
            "the instructions into the first user turn"
        )
    full = render(tokenizer, messages)
    ids, offsets = _offsets(tokenizer, full)
    labels = _mask(ids, offsets, _assistant_spans(tokenizer, messages, full, train_on_reasoning), full)
    return ids, labels, offsets, full


def _split_turns(messages: list[dict[str, Any]]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, [(user, assistant), ...]) of a validated conversation."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    rest = messages[head:]
    return messages[:head], [rest[i : i + 2] for i in range(0, len(rest), 2)]


def _joined(system: list[dict], pairs: list[list[dict]]) -> list[dict]:
    return system + [m for p in pairs for m in p]


def _prefix_chars(tokenizer, messages: list[dict[str, Any]]) -> int:
    """Characters the template writes for `messages` at the start of a longer conversation (0 for none:
    a template cannot render an empty conversation)."""
    if not messages:
        return 0
    text = render(tokenizer, messages)
    suffix = end_suffix(tokenizer)
    return len(text) - len(suffix) if suffix and text.endswith(suffix) else len(text)


def _first_guess(tokenizer, system: list[dict], pairs: list[list[dict]], offsets: list[tuple[int, int]],
                 full_length: int, max_seq_len: int) -> int:
    """How many oldest exchanges to drop, from where each exchange starts in the full encoding."""
    starts = [s for s, _ in offsets]
    pair_token_start = [bisect.bisect_left(starts, _prefix_chars(tokenizer, _joined(system, pairs[:j])))
                        for j in range(len(pairs))]
    drop = 1
    while drop < len(pairs) - 1 and full_length - (pair_token_start[drop] - pair_token_start[0]) > max_seq_len:
        drop += 1
    return drop


def encode_conversation(tokenizer, messages: list[dict[str, Any]], max_seq_len: int,
                        truncation: str = "turns", train_on_reasoning: bool = True) -> Encoded:
    """Token ids and labels of a conversation; with truncation=turns, drop the fewest oldest exchanges to fit.

    The system message is always kept; whole (user, assistant) pairs are dropped, oldest first. Raises
    OverLength if the row does not fit (truncation=error, or the last exchange alone is too long) or if
    the exchanges that fit have nothing to train (only weight-0 assistant turns). train_on_reasoning=False
    masks each assistant turn's reasoning trace (see the module's docstring).
    """
    messages = with_reasoning(messages)
    ids, labels, offsets, _ = _encode_full(tokenizer, messages, train_on_reasoning)
    full_length = len(ids)
    if full_length <= max_seq_len:
        return Encoded(ids, labels, 0, full_length)
    over = f"{full_length} tokens, over max_seq_len {max_seq_len}"
    if truncation == "error":
        raise OverLength(full_length, max_seq_len, f"{over} (data.truncation=error)")
    system, pairs = _split_turns(messages)
    if len(pairs) <= 1:
        raise OverLength(full_length, max_seq_len, f"{over}, and it has a single exchange that cannot be dropped")

    def encode_dropping(drop: int) -> tuple[list[int], list[int]]:
        kept_ids, kept_labels, _, _ = _encode_full(tokenizer, _joined(system, pairs[drop:]), train_on_reasoning)
        return kept_ids, kept_labels

    drop = _first_guess(tokenizer, system, pairs, offsets, full_length, max_seq_len)
    ids, labels = encode_dropping(drop)
    if len(ids) <= max_seq_len:
        # The guess counts the template's preamble (e.g. a BOS) as part of the first exchange, so it can
        # drop one exchange too many: keep the fewest drops that fit.
        while drop > 1:
            fewer_ids, fewer_labels = encode_dropping(drop - 1)
            if len(fewer_ids) > max_seq_len:
                break
            drop, ids, labels = drop - 1, fewer_ids, fewer_labels
    else:
        while len(ids) > max_seq_len and drop < len(pairs) - 1:
            drop += 1
            ids, labels = encode_dropping(drop)
        if len(ids) > max_seq_len:
            with_system = " (with the system message)" if system else ""
            raise OverLength(full_length, max_seq_len,
                             f"{over}, and even its last exchange alone{with_system} has {len(ids)} tokens")
    if all(x == IGNORE for x in labels):
        raise OverLength(full_length, max_seq_len,
                         f"{over}; the {len(pairs) - drop} newest exchanges that fit have only weight-0 assistant "
                         "turns: nothing to train")
    return Encoded(ids, labels, drop, full_length)


def min_chat_tokens(tokenizer) -> int:
    """Tokens of the shortest conversation the template can write: its tags around a one-token user turn
    and a one-token assistant reply (what data.max_seq_len must hold at the least)."""
    ids, _, _, _ = _encode_full(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}])
    return len(ids)


def encode_text(tokenizer, text: str, max_seq_len: int, label: int | None = None, *, train_all: bool = False,
                truncation: str = "turns") -> Encoded:
    """Encode a plain text.

    Classification (label given): ids with the tokenizer's special tokens, no LM target (labels all -100).
    Causal LM plain text (train_all=True): ids + eos, every token trained.
    Too long: truncation=error raises OverLength; otherwise the text is cut to its first max_seq_len tokens
    (a cut text gets no eos, since it does not end there).
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if train_all and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    full_length = len(ids)
    if full_length > max_seq_len:
        if truncation == "error":
            raise OverLength(full_length, max_seq_len,
                             f"{full_length} tokens, over max_seq_len {max_seq_len} (data.truncation=error)")
        ids = ids[:max_seq_len]
    labels = list(ids) if train_all else [IGNORE] * len(ids)
    return Encoded(ids, labels, 0, full_length, label)
