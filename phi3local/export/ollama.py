"""An Ollama Modelfile for a GGUF export: the model's chat template as a Go template, and its stop tokens.

The Go template is derived from the tokenizer's own (Jinja) chat template, not from a table of known formats:
the template is rendered on marker messages, and the text each role puts before and after a message's content,
the text before the first message and the generation prompt are solved for (`derive_turn_format`). The Go
template writes exactly those (`go_template`). A chat template that is not "fixed text around each message" (a
default system turn when there is none, rewritten earlier turns, tools) is refused: `check_template` renders
both on system, multi-turn and assistant-history chats and compares them character for character.

`render_go_template` is a small interpreter for the subset of Go's text/template that `go_template` writes
(range over .Messages, if/else if eq .Role "...", .Content, quoted strings), so the comparison runs without Ollama.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from phi3local.export.gguf_convert import GGUFExportError

ROLES = ("system", "user", "assistant")
MODELFILE = "Modelfile"
# Chats the Modelfile's template must render exactly as the tokenizer's chat template does.
CHECK_CHATS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour.\nOne word."}],
    [{"role": "user", "content": "First question"}, {"role": "assistant", "content": "First answer"},
     {"role": "user", "content": "Second question"}, {"role": "assistant", "content": "Second answer"},
     {"role": "user", "content": "Third"}],
)
_MARKS = ("\ue000", "\ue001")


@dataclass(frozen=True)
class TurnFormat:
    """head + for each message (before[role] + content + after[role]) + generation."""

    head: str
    before: dict[str, str]
    after: dict[str, str]
    generation: str


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def derive_turn_format(tokenizer) -> TurnFormat:
    """Solve the chat template's per-role text from renders of marker messages; GGUFExportError if it has none."""
    x, y = _MARKS
    one, two = {}, {}
    try:
        for r in ROLES:
            text = _render(tokenizer, [{"role": r, "content": x}])
            if text.count(x) != 1:
                raise GGUFExportError(f"the chat template writes a {r} message's content {text.count(x)} times")
            one[r] = text.split(x)  # [head + before_r, after_r + generation]
            for s in ROLES:
                text = _render(tokenizer, [{"role": r, "content": x}, {"role": s, "content": y}])
                if text.count(x) != 1 or text.count(y) != 1 or text.index(x) > text.index(y):
                    raise GGUFExportError("the chat template does not write each message's content once, in order")
                two[r, s] = text.split(x)[1].split(y)[0]  # after_r + before_s
    except GGUFExportError:
        raise
    except Exception as e:  # the template raised (a role it refuses, say)
        raise GGUFExportError(f"the chat template cannot be rendered on plain system/user/assistant messages: {e}") from e
    tails = [one[r][1] for r in ROLES]
    candidates = []
    for k in range(min(len(t) for t in tails) + 1):  # k = len(generation prompt)
        generation = tails[0][len(tails[0]) - k:]
        if any(not t.endswith(generation) for t in tails):
            continue
        after = {r: one[r][1][:len(one[r][1]) - k] for r in ROLES}
        if any(not two[r, s].startswith(after[r]) for r in ROLES for s in ROLES):
            continue
        before = {s: two[ROLES[0], s][len(after[ROLES[0]]):] for s in ROLES}
        if any(two[r, s] != after[r] + before[s] for r in ROLES for s in ROLES):
            continue
        if any(not one[r][0].endswith(before[r]) for r in ROLES):
            continue
        heads = {one[r][0][:len(one[r][0]) - len(before[r])] for r in ROLES}
        if len(heads) == 1:
            candidates.append(TurnFormat(heads.pop(), before, after, generation))
    if candidates:
        # Several splits render alike (text shared by every turn's end and start); take one that cuts no special
        # token, then the one whose turns carry the most of their own tags (`<|user|>` in before, not in a head).
        specials = _special_texts(tokenizer)
        return min(candidates, key=lambda f: (_cuts_a_token(f, specials), len(f.head), -len(f.generation)))
    raise GGUFExportError("the chat template is not fixed text around each message (it adds turns, or changes one "
                          "by its position): an Ollama TEMPLATE cannot be derived from it")


def _special_texts(tokenizer) -> list[str]:
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts |= {str(t) for t in decoder.values()}
    return [t for t in texts if len(t) > 1]


def _cuts_a_token(fmt: TurnFormat, specials: list[str]) -> bool:
    """Whether a boundary between fmt's pieces falls inside a special token's text (`<s` + `>User:`)."""
    joins = [(fmt.head, fmt.before[r]) for r in ROLES] + [(fmt.after[r], fmt.generation) for r in ROLES]
    joins += [(fmt.after[r], fmt.before[s]) for r in ROLES for s in ROLES]
    return any(left.endswith(t[:i]) and right.startswith(t[i:])
               for left, right in joins for t in specials for i in range(1, len(t)))


def _go_text(text: str) -> str:
    """Literal text for a Go template: as is, unless it holds template delimiters (then a quoted string)."""
    if "{{" in text or "}}" in text:
        return "{{ " + _go_quote(text) + " }}"
    return text


def _go_quote(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def go_template(fmt: TurnFormat, drop_head: str = "") -> str:
    """The Ollama TEMPLATE for fmt. drop_head: text at the start of the head that the runtime adds itself (BOS)."""
    head = fmt.head[len(drop_head):] if drop_head and fmt.head.startswith(drop_head) else fmt.head
    parts = [_go_text(head), "{{ range .Messages }}"]
    for i, r in enumerate(ROLES):
        parts.append(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{r}" }}}}')
        parts.append(_go_text(fmt.before[r]) + "{{ .Content }}" + _go_text(fmt.after[r]))
    parts.append("{{ end }}{{ end }}")
    parts.append(_go_text(fmt.generation))
    return "".join(parts)


# ----------------------------------------------------------------------------------------- a Go template subset

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _parse_go_string(s: str) -> str:
    if not (len(s) >= 2 and s[0] == s[-1] == '"'):
        raise ValueError(f"not a Go string: {s}")
    return bytes(s[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


def render_go_template(template: str, messages: list[dict]) -> str:
    """Render the subset of Go's text/template that go_template() writes (and Ollama's phi3 template uses)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if tokens and tokens[-1][0] == "trim_right":
            tokens.pop()
            text = text.lstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", m.group(2)))
        if m.group(3):
            tokens.append(("trim_right", ""))
        pos = m.end()
    tail = template[pos:]
    if tokens and tokens[-1][0] == "trim_right":
        tokens.pop()
        tail = tail.lstrip(" \t\r\n")
    tokens.append(("text", tail))

    def run(i: int, dot, out: list[str], stop: tuple[str, ...]) -> tuple[int, str]:
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "text":
                out.append(value)
                i += 1
                continue
            if value in stop or any(value.startswith(s + " ") for s in stop if s == "else if"):
                return i, value
            if value == "range .Messages":
                body_start = i + 1
                end = body_start
                for msg in messages:
                    end, _ = run(body_start, msg, out, ("end",))
                if not messages:
                    end, _ = run(body_start, dot, [], ("end",))
                i = end + 1
            elif value.startswith("if "):
                i = _run_if(i, value[3:], dot, out, run)
            elif value == ".Content":
                out.append(dot["content"])
                i += 1
            elif value == ".Role":
                out.append(dot["role"])
                i += 1
            elif value.startswith('"'):
                out.append(_parse_go_string(value))
                i += 1
            else:
                raise ValueError(f"unsupported Go template action: {{{{ {value} }}}}")
        return i, ""

    out: list[str] = []
    run(0, None, out, ())
    return "".join(out)


def _cond(expr: str, dot) -> bool:
    m = re.fullmatch(r'eq \.Role "([^"]*)"', expr)
    if not m:
        raise ValueError(f"unsupported condition: {expr}")
    return dot is not None and dot["role"] == m.group(1)


def _run_if(i: int, expr: str, dot, out: list[str], run) -> int:
    """An if / else if / else / end chain starting at tokens[i]; returns the index after its end."""
    taken = False
    while True:
        branch_out: list[str] = []
        i, stopped = run(i + 1, dot, branch_out, ("end", "else", "else if"))
        if not taken and (expr is None or _cond(expr, dot)):
            out.extend(branch_out)
            taken = True
        if stopped == "end":
            return i + 1
        expr = stopped[len("else if "):] if stopped.startswith("else if ") else None


# ----------------------------------------------------------------------------------------- the Modelfile


def check_template(tokenizer, template: str, prefix: str = "") -> list[dict]:
    """Each CHECK_CHATS chat rendered both ways; GGUFExportError at the first that differs."""
    results = []
    for chat in CHECK_CHATS:
        want = _render(tokenizer, chat)
        got = prefix + render_go_template(template, chat)
        results.append({"roles": [m["role"] for m in chat], "same": got == want})
        if got != want:
            raise GGUFExportError(f"the Modelfile template renders {got!r} where the tokenizer's chat template "
                                  f"renders {want!r}")
    return results


def stop_texts(tokenizer, stop_ids: list[int]) -> list[str]:
    return [t for t in (tokenizer.convert_ids_to_tokens(int(i)) for i in stop_ids) if t]


def write_modelfile(out_dir: Path, gguf_name: str, tokenizer, stop_ids: list[int], bos_added: str = "") -> dict:
    """Write out_dir/Modelfile; returns what was written and checked. bos_added: the BOS text that llama.cpp
    adds itself when it tokenizes the prompt (tokenizer.ggml.add_bos_token), left out of the template."""
    fmt = derive_turn_format(tokenizer)
    template = go_template(fmt, drop_head=bos_added)
    if '"""' in template:
        raise GGUFExportError('the chat template contains """, which a Modelfile TEMPLATE cannot hold')
    checks = check_template(tokenizer, template, prefix=bos_added if fmt.head.startswith(bos_added) else "")
    stops = stop_texts(tokenizer, stop_ids)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {_go_quote(s)}" for s in stops]
    (Path(out_dir) / MODELFILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"modelfile": MODELFILE, "template": template, "stop": stops, "bos_added_by_runtime": bos_added or None,
            "template_checks": checks}


def ollama_name(model_dir: Path) -> str:
    """A name `ollama create` accepts, from the model folder's name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(model_dir).resolve().name.lower()).strip("-._")
    return name or "phi3local-model"


def create_command(name: str, modelfile: Path) -> str:
    return shlex.join(["ollama", "create", name, "-f", str(modelfile)])
