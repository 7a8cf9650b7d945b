"""Preference pairs for task=preference: read, validate, clean, encode, split, and count them.

Row formats (guessed from the first row's fields; `data.columns` maps other names, e.g. a CSV's
`{prompt: question, chosen: good, rejected: bad}`):
- `azure_preference`, Azure OpenAI / OpenAI preference (DPO) fine-tuning JSONL:
  `{"input": {"messages": [system/user turns]}, "preferred_output": [{"role": "assistant", "content": ...}],
  "non_preferred_output": [{"role": "assistant", "content": ...}]}`
- `trl_preference`, TRL's preference datasets: `prompt` (a string, or a list of messages), `chosen` and
  `rejected` (strings, or lists holding one assistant message); without `prompt`, `chosen` and `rejected`
  are whole conversations that differ only in their last (assistant) message (TRL's "implicit prompt").
  A string prompt may come with a `system` string. In CSV/Parquet a cell holding a JSON list is a message list.

Each bad row is one RowProblem naming file:line (or row) and the field as the user wrote it: a missing or
empty side, chosen identical to rejected, a side that is not one assistant message, a prompt that does not
end with a user turn (e.g. ends with an assistant turn), roles out of order, tool definitions, and pairs
over data.max_seq_len (prompt + the longer answer): with data.truncation=turns the prompt loses whole oldest
(user, assistant) exchanges first, keeping its system message and last user turn; answers are never cut.

Encoding is the SFT one (phi3local.data.template): prompt + answer is rendered by the chat template and
masked with the earlier assistant turns at weight 0, so the answer tokens are exactly the tokens the SFT mask
trains for that turn (the content and `<|end|>`), and the prompt tokens are everything before them
(ending with the generation prompt `<|assistant|>`). prompt_ids + chosen_ids is the start of the SFT
encoding of the chosen conversation (only the template's end-of-conversation suffix, Phi-3's
`<|endoftext|>`, is left out, as it is never trained).

Output rows: `prompt_ids`, `chosen_ids`, `rejected_ids` (list[int32]), `doc_id` (int64), `source` ("file:line").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3local.config import Recipe, RecipeError
from phi3local.data import clean
from phi3local.data.formats import read_records
from phi3local.data.prepare import FileResult, encode_rows, prepare_stats, split_results
from phi3local.data.records import (
    Conversation,
    DataError,
    FormatError,
    Location,
    RawRecord,
    RowProblem,
)
from phi3local.data.report import histogram, length_summary
from phi3local.data.template import (
    IGNORE,
    ChatTemplateError,
    TemplateRejected,
    encode_conversation,
    min_chat_tokens,
)
from phi3local.data.validate import check_messages, invalid_unicode

PREFERENCE_FORMATS = ("azure_preference", "trl_preference")
# Our field names per format: (prompt, chosen, rejected).
FIELDS = {
    "azure_preference": ("input.messages", "preferred_output", "non_preferred_output"),
    "trl_preference": ("prompt", "chosen", "rejected"),
}
_NO_LIMIT = 1 << 62


@dataclass
class Pair:
    """One validated preference pair: the prompt messages (ending with a user turn) and the two answers."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str
    loc: Location
    fields: tuple[str, str, str]  # how the user's file names prompt, chosen, rejected


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated_turns: int = 0  # (user, assistant) exchanges dropped from the prompt's start
    full_length: int = 0  # prompt + longer answer, before truncation

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (what data.max_seq_len bounds)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def tokens(self) -> int:
        """Distinct tokens of the pair: the prompt once and both answers."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


# ----------------------------------------------------------------------------------------------- detection


def detect_preference_format(records: list[RawRecord], requested: str, shown: str) -> str:
    if requested != "auto":
        raise FormatError(
            f"{shown}: task=preference reads preference pairs (Azure preference JSONL, or prompt/chosen/rejected) "
            f"and guesses which itself: leave data.format at auto (it is {requested!r}); map other column names "
            "with data.columns, e.g. data.columns={prompt: question, chosen: good, rejected: bad}"
        )
    first = next((r for r in records if isinstance(r.data, dict)), None)
    if first is None:
        raise FormatError(f"{shown}: no readable rows to guess the format from")
    keys = set(first.data)
    if {"preferred_output", "non_preferred_output"} & keys:
        return "azure_preference"
    if {"chosen", "rejected"} <= keys:
        return "trl_preference"
    raise FormatError(
        f"{shown}: task=preference needs preference pairs; the first row ({first.loc}) has the fields "
        f"{sorted(map(str, keys))}. Expected either Azure's preference format (input.messages, preferred_output, "
        "non_preferred_output) or prompt, chosen, rejected. Map your column names with data.columns, e.g. "
        "data.columns={prompt: question, chosen: good, rejected: bad}"
    )


# ------------------------------------------------------------------------------------------------ validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text_problem(value: Any, name: str, loc: Location) -> RowProblem | None:
    if value is None:
        return RowProblem(loc, name, "missing")
    if not isinstance(value, str):
        return RowProblem(loc, name, f"must be a string, got {_type_name(value)}")
    if not value.strip():
        return RowProblem(loc, name, "empty")
    reason = invalid_unicode(value)
    return RowProblem(loc, name, reason) if reason else None


def check_prompt(prompt: Any, loc: Location, name: str) -> RowProblem | None:
    """A prompt message list: system first if any, user/assistant alternating, ending with a user turn."""
    if prompt is None:
        return RowProblem(loc, name, "missing")
    if not isinstance(prompt, list):
        return RowProblem(loc, name, f"must be a list of {{role, content}} messages, got {_type_name(prompt)}")
    if not prompt:
        return RowProblem(loc, name, "no messages (the prompt needs at least one user turn)")
    last = prompt[-1]
    if isinstance(last, dict) and last.get("role") in ("assistant", "system"):
        if last["role"] == "assistant":
            reason = ("the prompt ends with an assistant turn; it must end with the user turn that both answers "
                      "reply to (the answers go in the preferred and rejected fields)")
        else:
            reason = "the prompt has no user turn after its system message"
        return RowProblem(loc, f"{name}[{len(prompt) - 1}].role", reason)
    # The SFT rules on the prompt with a stand-in reply: roles, order, contents, Unicode.
    return check_messages(prompt + [{"role": "assistant", "content": "x"}], loc, name)


def check_side(value: Any, loc: Location, name: str, allow_string: bool) -> RowProblem | None:
    """One answer: a list holding exactly one assistant message (or, for TRL data, a plain string)."""
    if value is None:
        return RowProblem(loc, name, "missing")
    if isinstance(value, str):
        if not allow_string:
            return RowProblem(loc, name, "must be a list holding one assistant message, got a string")
        return _text_problem(value, name, loc)
    if isinstance(value, dict):
        return RowProblem(loc, name, "must be a list holding one assistant message, got an object (wrap it in [ ])")
    if not isinstance(value, list):
        return RowProblem(loc, name, f"must be a list holding one assistant message, got {_type_name(value)}")
    if len(value) != 1:
        return RowProblem(loc, name, f"must be one assistant message, got {len(value)} messages")
    m = value[0]
    if not isinstance(m, dict):
        return RowProblem(loc, f"{name}[0]", f"must be an object with role and content, got {_type_name(m)}")
    if m.get("role") != "assistant":
        return RowProblem(loc, f"{name}[0].role", f"must be assistant, got {m.get('role')!r}")
    content = m.get("content")
    if isinstance(content, list):
        return RowProblem(loc, f"{name}[0].content", "must be a string, got list (multi-part contents are not supported)")
    return _text_problem(content, f"{name}[0].content", loc)


def _side_text(value: Any) -> str:
    return value if isinstance(value, str) else value[0]["content"]


def _names(fmt: str, columns: dict[str, str]) -> tuple[str, str, str]:
    """The user's names for prompt, chosen, rejected (data.columns maps ours to theirs)."""
    return tuple(columns.get(n, n) if "." not in n else n for n in FIELDS[fmt])  # type: ignore[return-value]


def _parse_cell(value: Any) -> Any:
    """A table cell holding messages as JSON (a list of {role, ...} objects, or an object with messages or a
    role) is parsed; any other text, e.g. an answer that happens to be "[1, 2]", is kept as written."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
        if isinstance(parsed, dict) and ("messages" in parsed or "role" in parsed):
            return parsed
    return value


def _plain(messages: list[dict]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_pair(data: Any, fmt: str, loc: Location, columns: dict[str, str] | None = None
              ) -> Pair | RowProblem:
    """A validated Pair from one raw record (our field names), or the row's first problem."""
    names = _names(fmt, columns or {})
    if not isinstance(data, dict):
        return RowProblem(loc, "row", f"must be a JSON object, got {_type_name(data)}")
    p_name, c_name, r_name = names
    if fmt == "azure_preference":
        inp = data.get("input")
        if inp is None:
            return RowProblem(loc, "input", "missing")
        if not isinstance(inp, dict):
            return RowProblem(loc, "input", f"must be an object with messages, got {_type_name(inp)}")
        if inp.get("tools"):
            return RowProblem(loc, "input.tools", "tool definitions are not supported: the Phi-3 chat template "
                                                  "has no tool role")
        prompt_value = inp.get("messages")
        problem = check_prompt(prompt_value, loc, p_name)
        if problem:
            return problem
        prompt = _plain(prompt_value)
        chosen, rejected = data.get("preferred_output"), data.get("non_preferred_output")
        allow_string = False
    else:
        chosen, rejected = data.get("chosen"), data.get("rejected")
        allow_string = True
        if "prompt" in data and data["prompt"] is not None:
            value = data["prompt"]
            if isinstance(value, str):
                problem = _text_problem(value, p_name, loc)
                if problem is None and data.get("system") is not None:
                    problem = _text_problem(data["system"], columns.get("system", "system") if columns else "system", loc)
                if problem:
                    return problem
                prompt = ([{"role": "system", "content": data["system"]}] if data.get("system") else []) + \
                         [{"role": "user", "content": value}]
            else:
                problem = check_prompt(value, loc, p_name)
                if problem:
                    return problem
                prompt = _plain(value)
        elif isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) >= 2 and len(rejected) >= 2:
            # TRL's implicit prompt: two whole conversations that share everything but the last message.
            problem = check_prompt(chosen[:-1], loc, c_name)
            if problem:
                return problem
            if rejected[:-1] != chosen[:-1]:
                return RowProblem(loc, r_name, f"without a {p_name} field, {c_name} and {r_name} must be whole "
                                               "conversations that differ only in their last (assistant) message")
            prompt = _plain(chosen[:-1])
            chosen, rejected = chosen[-1:], rejected[-1:]
            c_name, r_name = f"{c_name}[-1:]", f"{r_name}[-1:]"
        else:
            present = ", ".join(sorted(map(str, data))) or "none"
            return RowProblem(loc, p_name, f"missing (the row has: {present}); without it, {c_name} and {r_name} "
                                           "must be whole conversations sharing all but their last message")
    for value, name in ((chosen, c_name), (rejected, r_name)):
        problem = check_side(value, loc, name, allow_string)
        if problem:
            return problem
    chosen_text, rejected_text = _side_text(chosen), _side_text(rejected)
    if clean.normalize_text(chosen_text) == clean.normalize_text(rejected_text):
        return RowProblem(loc, r_name, f"identical to {c_name}: a pair needs two different answers")
    return Pair(prompt, chosen_text, rejected_text, str(loc), loc, (p_name, c_name, r_name))


# ------------------------------------------------------------------------------------------------- encoding


def _answer_split(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of prompt + answer, split where the SFT mask starts training the answer."""
    messages = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
    enc = encode_conversation(tokenizer, messages + [{"role": "assistant", "content": answer}], _NO_LIMIT, "error")
    trained = [i for i, label in enumerate(enc.labels) if label != IGNORE]
    if not trained or trained != list(range(trained[0], trained[-1] + 1)):
        raise ChatTemplateError("the chat template's mask of the final assistant turn is not one run of tokens; "
                                "this template cannot split prompt and answer")
    return enc.input_ids[: trained[0]], enc.input_ids[trained[0]: trained[-1] + 1]


class PairOverLength(ValueError):
    def __init__(self, field_name: str, reason: str):
        self.field_name = field_name
        super().__init__(reason)


def _encode_once(tokenizer, prompt: list[dict], pair: Pair) -> EncodedPair:
    p1, c = _answer_split(tokenizer, prompt, pair.chosen)
    p2, r = _answer_split(tokenizer, prompt, pair.rejected)
    if p1 != p2:
        raise TemplateRejected("the tokenizer splits the prompt differently before the two answers "
                               "(the answers' first characters merge with the prompt's last tokens)")
    return EncodedPair(p1, c, r)


def _split_prompt(prompt: list[dict]) -> tuple[list[dict], list[list[dict]], dict]:
    """(system messages, [(user, assistant) exchanges], last user turn) of a validated prompt."""
    head = 1 if prompt[0]["role"] == "system" else 0
    body = prompt[head:-1]
    return prompt[:head], [body[i: i + 2] for i in range(0, len(body), 2)], prompt[-1]


def encode_pair(tokenizer, pair: Pair, max_seq_len: int, truncation: str = "turns") -> EncodedPair:
    """The pair's token ids; over max_seq_len (prompt + longer answer), drop the prompt's oldest exchanges.

    Raises PairOverLength (naming the field to fix) when the pair cannot fit: truncation=error, or even the
    prompt's system message and last user turn with the longer answer are too long (answers are never cut).
    """
    enc = _encode_once(tokenizer, pair.prompt, pair)
    full = enc.length
    enc.full_length = full
    if full <= max_seq_len:
        return enc
    p_name, c_name, r_name = pair.fields
    longer = c_name if len(enc.chosen_ids) >= len(enc.rejected_ids) else r_name
    over = (f"{full} tokens (prompt {len(enc.prompt_ids)} + longer answer "
            f"{max(len(enc.chosen_ids), len(enc.rejected_ids))}), over max_seq_len {max_seq_len}")
    if truncation == "error":
        raise PairOverLength(p_name, f"{over} (data.truncation=error)")
    system, exchanges, last = _split_prompt(pair.prompt)
    for drop in range(1, len(exchanges) + 1):
        shorter = system + [m for ex in exchanges[drop:] for m in ex] + [last]
        cut = _encode_once(tokenizer, shorter, pair)
        if cut.length <= max_seq_len:
            cut.truncated_turns, cut.full_length = drop, full
            return cut
    minimal = _encode_once(tokenizer, system + [last], pair) if exchanges else enc
    answer = max(len(minimal.chosen_ids), len(minimal.rejected_ids))
    if answer >= len(minimal.prompt_ids):  # the answer is the bigger part: that is what to shorten
        raise PairOverLength(longer, f"{over}; even with only the last user turn{' and the system message' if system else ''} "
                                     f"the pair has {minimal.length} tokens, and answers are never truncated")
    raise PairOverLength(p_name, f"{over}; even its last user turn{' with the system message' if system else ''} "
                                 f"alone leaves {minimal.length} tokens")


# ------------------------------------------------------------------------------------------------ one file


def pair_key(pair: Pair) -> str:
    return json.dumps([[[m["role"], m["content"]] for m in pair.prompt], pair.chosen, pair.rejected],
                      ensure_ascii=False)


def _normalize(pair: Pair) -> tuple[Pair, bool]:
    prompt = [{**m, "content": clean.normalize_text(m["content"])} for m in pair.prompt]
    chosen, rejected = clean.normalize_text(pair.chosen), clean.normalize_text(pair.rejected)
    changed = (chosen != pair.chosen or rejected != pair.rejected
               or any(a["content"] != b["content"] for a, b in zip(prompt, pair.prompt)))
    return (dataclasses.replace(pair, prompt=prompt, chosen=chosen, rejected=rejected) if changed else pair), changed


def process_pairs_file(path: Path, shown: str, recipe: Recipe, tokenizer) -> FileResult[Pair, EncodedPair]:
    """Read, validate, clean and encode one preference file; row problems are collected, not raised."""
    cfg = recipe.data
    records, problems, kind = read_records(path, cfg.columns, shown)
    if problems and not any(isinstance(r.data, dict) for r in records):
        raise DataError(problems, cfg.max_errors_shown,
                        header=f"{shown}: no row can be read, so its format cannot be guessed")
    fmt = detect_preference_format(records, cfg.format, shown)
    result: FileResult[Pair, EncodedPair] = FileResult(shown, fmt, problems=problems)
    counts = result.counts
    counts.read = len(records) + len(problems)
    pairs: list[Pair] = []
    for rec in records:
        data = rec.data
        if kind != "json" and isinstance(data, dict):
            data = {k: _parse_cell(v) for k, v in data.items()}
        got = read_pair(data, fmt, rec.loc, cfg.columns)
        (problems if isinstance(got, RowProblem) else pairs).append(got)
    counts.invalid = len(problems)

    if cfg.normalize_whitespace:
        normalized = []
        for pair in pairs:
            pair, changed = _normalize(pair)
            counts.whitespace_normalized += changed
            normalized.append(pair)
        pairs = normalized
    if cfg.system_prompt:
        for i, pair in enumerate(pairs):
            if pair.prompt[0]["role"] != "system":
                pairs[i] = dataclasses.replace(pair, prompt=[{"role": "system", "content": cfg.system_prompt}]
                                               + pair.prompt)
                counts.system_prompt_added += 1
    if cfg.dedupe:
        seen: dict[str, Pair] = {}
        kept = []
        for pair in pairs:
            key = pair_key(pair)
            if key in seen:
                counts.duplicates += 1
                result.filtered.append({"where": pair.source, "step": "duplicates",
                                        "reason": f"exact duplicate of {seen[key].source}"})
            else:
                seen[key] = pair
                kept.append(pair)
        pairs = kept

    # encode_pair only shortens by dropping turns: a pair is truncated exactly when it lost some.
    encode_rows(result, pairs, lambda pair: encode_pair(tokenizer, pair, cfg.max_seq_len, cfg.truncation), cfg,
                field_of=lambda pair: pair.fields[0], length_of=lambda enc: enc.length,
                over_length=PairOverLength, measured=" (prompt + longer answer)")
    return result


# ----------------------------------------------------------------------------------------- datasets, stats


def features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                              "doc_id": datasets.Value("int64"), "source": datasets.Value("string")})


def to_dataset(rows: list[tuple[int, Pair, EncodedPair]]):
    import datasets

    return datasets.Dataset.from_dict({
        "prompt_ids": [enc.prompt_ids for _, _, enc in rows],
        "chosen_ids": [enc.chosen_ids for _, _, enc in rows],
        "rejected_ids": [enc.rejected_ids for _, _, enc in rows],
        "doc_id": [doc for doc, _, _ in rows],
        "source": [pair.source for _, pair, _ in rows],
    }, features=features())


def pair_stats(rows: list[tuple[int, Pair, EncodedPair]]) -> dict[str, Any]:
    """Counts and length summaries of kept pairs (prompt, each answer, the longer sequence)."""
    encs = [enc for _, _, enc in rows]
    parts = {
        "prompt": [len(e.prompt_ids) for e in encs],
        "chosen": [len(e.chosen_ids) for e in encs],
        "rejected": [len(e.rejected_ids) for e in encs],
        "sequence": [e.length for e in encs],
    }
    longer = sum(len(e.chosen_ids) > len(e.rejected_ids) for e in encs)
    return {
        "pairs": len(encs),
        "prompts": len({json.dumps(p.prompt, ensure_ascii=False) for _, p, _ in rows}),
        "tokens": {name: sum(v) for name, v in parts.items() if name != "sequence"},
        "lengths": {name: {k: x for k, x in length_summary(v, []).items() if not k.startswith("trained")}
                    for name, v in parts.items()},
        "chosen_longer_share": round(longer / len(encs), 4) if encs else 0.0,
    }


def prepare_pairs(files: dict[str, tuple[Path, str]], inputs: dict[str, dict[str, Any]], key: dict[str, Any],
                  recipe: Recipe, tokenizer, console) -> tuple[dict[str, Any], Any, Any]:
    """(stats, train Dataset, validation Dataset) of task=preference; prepare.prepare saves and reports them."""
    cfg = recipe.data
    minimum = min_chat_tokens(tokenizer)
    if cfg.max_seq_len < minimum:
        raise RecipeError(f"{recipe.source}: data.max_seq_len: {cfg.max_seq_len} is too small for this chat "
                          f"template; the minimum is {minimum}")
    results = {name: process_pairs_file(path, shown, recipe, tokenizer) for name, (path, shown) in files.items()}
    split = split_results(results, cfg, pair_key, unit="pairs")
    train_rows, val_rows = split.train, split.validation

    def summary(rows):  # a pair's tokens: prompt once + both answers; trained: the answers
        return length_summary([e.tokens for _, _, e in rows],
                              [len(e.chosen_ids) + len(e.rejected_ids) for _, _, e in rows])

    all_rows = train_rows + val_rows
    # The histogram: lengths of the longer sequence of each pair (prompt + longer answer), what max_seq_len bounds.
    stats = prepare_stats(recipe, key, inputs, results, split, summary, lambda enc: enc.length)
    stats["preference"] = {
        "train": pair_stats(train_rows),
        "validation": pair_stats(val_rows),
        "all": pair_stats(all_rows),
        "duplicates": sum(r.counts.duplicates for r in results.values()),
        "histograms": {
            "prompt": histogram([len(e.prompt_ids) for _, _, e in all_rows]),
            "chosen": histogram([len(e.chosen_ids) for _, _, e in all_rows]),
            "rejected": histogram([len(e.rejected_ids) for _, _, e in all_rows]),
            "sequence": histogram([e.length for _, _, e in all_rows]),
        },
    }
    if cfg.safety_screen:  # the preferred answers only: a rejected answer that complies is what the pair teaches away
        from phi3local.safety.screen import screen_examples, screen_lines

        stats["safety_screen"] = screen_examples(
            Conversation(p.prompt + [{"role": "assistant", "content": p.chosen}], p.source, p.loc)
            for _, p, _ in all_rows)
        for line in screen_lines(stats["safety_screen"], cfg.max_errors_shown):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    return stats, to_dataset(train_rows), to_dataset(val_rows)


def print_preference_summary(stats: dict[str, Any], console) -> None:
    """The pair counts and lengths `prepare` prints after the common summary."""
    from rich.table import Table

    pref = stats.get("preference")
    if not pref:
        return
    every = pref["all"]
    console.print(f"Pairs: {pref['train']['pairs']} train, {pref['validation']['pairs']} validation; "
                  f"{every['prompts']} distinct prompts; {pref['duplicates']} duplicate pairs dropped; "
                  f"tokens: prompts {every['tokens']['prompt']}, chosen {every['tokens']['chosen']}, "
                  f"rejected {every['tokens']['rejected']}", highlight=False)
    table = Table(title="Pair lengths in tokens (all kept pairs)")
    for col in ("part", "min", "mean", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for part, label in (("prompt", "prompt"), ("chosen", "chosen answer"), ("rejected", "rejected answer"),
                        ("sequence", "prompt + longer answer")):
        s = every["lengths"][part]
        table.add_row(label, str(s["min"]), str(s["mean"]), str(s["p50"]), str(s["p90"]), str(s["p99"]), str(s["max"]))
    console.print(table)
    share = every["chosen_longer_share"]
    note = (": far from half, so a preference loss may learn to prefer length instead of quality"
            if every["pairs"] >= 10 and not 0.3 <= share <= 0.7 else "")
    console.print(f"The chosen answer is the longer one in {share:.0%} of pairs{note}.", highlight=False)


__all__ = [
    "FIELDS",
    "PREFERENCE_FORMATS",
    "EncodedPair",
    "Pair",
    "PairOverLength",
    "check_prompt",
    "check_side",
    "detect_preference_format",
    "encode_pair",
    "features",
    "pair_stats",
    "prepare_pairs",
    "print_preference_summary",
    "process_pairs_file",
    "read_pair",
    "to_dataset",
]
