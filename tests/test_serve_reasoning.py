"""Reasoning traces in `phi3local serve` and `phi3local chat` (phi3local/serve/reasoning.py).

The split first (whole and streamed, any piece boundaries), then the service and score.py with fake engines
whose output holds a `<think>...</think>` trace (no tiny model writes a closed trace), then a real server on a
reasoning stand-in: the tiny random Phi-3 exported for CPU with a chat template whose generation prompt opens
the trace (`<think>`, as some reasoning templates do), so everything it writes is trace and its answer is
empty; the `openai` client reads `reasoning_content` from it. Output without a trace: byte for byte as before.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from test_serve import FakeEngine, Server, flask_request, parse, sse_events, user

from phi3local.serve import protocol
from phi3local.serve.engine import Generation, Prompt
from phi3local.serve.guard import REFUSAL_TEXT
from phi3local.serve.reasoning import (
    CONTENT,
    REASONING,
    ReasoningSplitter,
    prompt_opens_trace,
    split_reasoning,
    trace_unclosed,
)
from phi3local.serve.settings import ServeSettings

TRACE = "Ben had cake.\nSo: Ben, cake."
ANSWER = "Who: Ben. What: cake."
OUTPUT = f"<think>\n{TRACE}\n</think>\n\n{ANSWER}"


def split_stream(pieces, opened=False) -> tuple[list[tuple[str, str]], ReasoningSplitter]:
    splitter = ReasoningSplitter(opened)
    parts = [part for piece in pieces for part in splitter.feed(piece)]
    return parts + splitter.flush(), splitter


def joined(parts, kind) -> str:
    return "".join(text for k, text in parts if k == kind)


# ---------------------------------------------------------------------------------- the split

@pytest.mark.parametrize("pieces, opened, trace, answer", [
    (["<think>\nAdd.\n</think>\n\nFour."], False, "Add.", "Four."),
    (["<thi", "nk>Add.</th", "ink>", "Four."], False, "Add.", "Four."),  # both tags split across pieces
    (["  ", "<", "think>", "Add. ", " ", "<", "/", "think", ">", "\n", "\n", "Four."], False, "Add.", "Four."),
    (["Four."], False, None, "Four."),  # no trace: the text as it is
    (["  Four", " <think> x"], False, None, "  Four <think> x"),  # a <think> not at the start is text
    (["<thin", "g>"], False, None, "<thing>"),  # a false start of <think> is released as content
    (["<think>Still ", "thinking </th"], False, "Still thinking </th", ""),  # never closed: all trace, no answer
    (["Add.</th", "ink>\nFour."], True, "Add.", "Four."),  # the prompt opened the trace
    (["Add. </b> more"], True, "Add. </b> more", ""),  # opened and never closed
    ([], True, "", ""),
    (["<think>", "</think>", "Four."], False, "", "Four."),  # an empty trace
])
def test_the_streamed_split_equals_the_whole_one(pieces, opened, trace, answer):
    assert split_reasoning("".join(pieces), opened) == (trace, answer)
    parts, splitter = split_stream(pieces, opened)
    assert joined(parts, REASONING) == (trace or "") and joined(parts, CONTENT) == answer
    assert all(text for _, text in parts) and splitter.had_trace == (trace is not None)
    assert splitter.closed == (trace is not None and not trace_unclosed("".join(pieces), opened))
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, key=lambda k: k == CONTENT)  # the whole trace before any of the answer


def test_a_partial_close_tag_is_held_back_and_never_sent():
    parts, _ = split_stream(["<think>Add", ". </", "thi", "nk>", " Four."])
    assert parts == [(REASONING, "Add"), (REASONING, "."), (CONTENT, "Four.")]
    assert not any("<" in text for _, text in parts)


def test_any_piece_boundaries_give_the_whole_split():
    rng = random.Random(0)
    texts = [OUTPUT, ANSWER, " \n" + OUTPUT, "<think>" + TRACE, "a</think>b", "<think></think>", "<thinking>",
             "x <think>y</think>z", TRACE + "\n</think>\n\n" + ANSWER]
    for text in texts:
        for opened in (False, True):
            for _ in range(200):
                cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(6, len(text) - 1))))
                pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
                parts, _ = split_stream(pieces, opened)
                trace, answer = split_reasoning(text, opened)
                assert (joined(parts, REASONING), joined(parts, CONTENT)) == (trace or "", answer), (pieces, opened)


def test_output_without_a_trace_keeps_its_pieces():
    pieces = ["Who", ": Ben", ". What", ": cake."]
    parts, _ = split_stream(pieces)
    assert parts == [(CONTENT, p) for p in pieces]


def test_a_prompt_opens_the_trace_when_it_ends_with_think():
    assert prompt_opens_trace("<|im_start|>assistant<|im_sep|><think>\n")
    assert not prompt_opens_trace("<|assistant|>") and not prompt_opens_trace("<think>x")
    # the shipped reasoning templates open the assistant turn without <think>: the model writes it
    from phi3local.model.tokenizer import PHI4_IM_CHAT_TEMPLATE, PHI4_MINI_REASONING_CHAT_TEMPLATE
    from phi3local.serve.chat import render_chat_template

    for template in (PHI4_IM_CHAT_TEMPLATE, PHI4_MINI_REASONING_CHAT_TEMPLATE):
        assert not prompt_opens_trace(render_chat_template(template, user("hi"), eos_token="<|endoftext|>"))


def test_the_training_side_uses_the_same_split():
    from phi3local.data import template

    assert template.split_reasoning is split_reasoning


# ---------------------------------------------------------------------------------- the service, fake engines

class TraceEngine(FakeEngine):
    """FakeEngine with a prompt that may open the trace and a finish reason of choice."""

    def __init__(self, pieces, opened=False, finish="stop"):
        super().__init__(pieces)
        self.opened, self.finish = opened, finish

    def prepare(self, messages, max_tokens):
        return Prompt(ids=np.zeros(3, dtype=np.int32), max_new_tokens=max_tokens, opened=self.opened)

    def generate(self, prompt, *, temperature, top_p, seed):
        def run(generation):
            for piece in self.pieces:
                generation.completion_tokens += 1
                yield piece
            generation.finish_reason = self.finish

        return Generation(run)


def service(engine, guard=None):
    from phi3local.serve.service import ChatService

    return ChatService(engine, ServeSettings(max_tokens_cap=64), guard)


def chunks_of(events: list[str]) -> list[dict]:
    assert events[-1] == protocol.SSE_DONE
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def deltas(events: list[str]) -> list[dict]:
    return [c["choices"][0]["delta"] for c in chunks_of(events) if c["choices"]]


PIECES = ["<thi", "nk>\nBen had", " cake.\nSo: Ben, cake.\n</", "think>", "\n\nWho: Ben.", " What: cake."]


def test_the_answer_is_content_and_the_trace_reasoning_content():
    body = service(TraceEngine(PIECES)).complete(parse({"messages": user("x")}))
    assert body["choices"][0] == {"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": ANSWER, "reasoning_content": TRACE}}
    events = list(service(TraceEngine(PIECES)).stream(parse({"messages": user("x"), "stream": True})))
    ds = deltas(events)
    assert ds[0] == {"role": "assistant", "content": ""} and ds[-1] == {}
    kinds = [next(iter(d)) for d in ds[1:-1]]
    assert kinds == ["reasoning_content"] * kinds.count("reasoning_content") + ["content"] * kinds.count("content")
    assert "".join(d.get("reasoning_content", "") for d in ds) == TRACE
    assert "".join(d.get("content", "") for d in ds) == ANSWER
    assert not any("think>" in v for d in ds for v in d.values())  # the tags, split over pieces, never go out


def test_an_opened_prompt_and_an_unclosed_trace():
    body = service(TraceEngine(["Ben had", " cake.</think>Who: Ben."], opened=True)).complete(
        parse({"messages": user("x")}))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Who: Ben.", "reasoning_content":
                                             "Ben had cake."}
    # stopped at max_tokens inside the trace: an empty answer, the trace so far, finish_reason length
    unclosed = TraceEngine(["<think>", "Ben had", " cake and </thi"], finish="length")
    body = service(unclosed).complete(parse({"messages": user("x")}))
    assert body["choices"][0] == {"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "", "reasoning_content": "Ben had cake and </thi"}}
    ds = deltas(list(service(unclosed).stream(parse({"messages": user("x"), "stream": True}))))
    assert "".join(d.get("reasoning_content", "") for d in ds) == "Ben had cake and </thi"
    assert [d for d in ds if "content" in d] == [{"role": "assistant", "content": ""}]


def test_stop_sequences_apply_to_the_generated_text_trace_included():
    body = service(TraceEngine(PIECES)).complete(parse({"messages": user("x"), "stop": "So:"}))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "", "reasoning_content": "Ben had cake."}
    body = service(TraceEngine(PIECES)).complete(parse({"messages": user("x"), "stop": " What"}))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Who: Ben.", "reasoning_content": TRACE}


def test_answers_without_a_trace_are_byte_for_byte_as_before(monkeypatch):
    from phi3local.serve.score import respond

    monkeypatch.setattr(protocol, "new_completion_id", lambda: "chatcmpl-1")
    monkeypatch.setattr(protocol, "now", lambda: 7)
    pieces = ["Who", ": Ben", ". What", ": cake."]  # test_serve's FakeEngine: it runs on the code before traces
    r = respond(flask_request(data=json.dumps({"messages": user("x")}).encode()), service(FakeEngine(pieces)))
    assert r.get_data(as_text=True) == (
        '{"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "fake-model", "choices": '
        '[{"index": 0, "message": {"role": "assistant", "content": "Who: Ben. What: cake."}, "finish_reason": '
        '"stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}')
    events = list(service(FakeEngine(pieces)).stream(parse({"messages": user("x"), "stream": True})))
    head = '"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "fake-model"'
    assert events == [
        f'data: {{{head}, "choices": [{{"index": 0, "delta": {{"role": "assistant", "content": ""}}, '
        '"finish_reason": null}]}\n\n',
        *[f'data: {{{head}, "choices": [{{"index": 0, "delta": {{"content": "{p}"}}, "finish_reason": null}}]}}\n\n'
          for p in pieces],
        f'data: {{{head}, "choices": [{{"index": 0, "delta": {{}}, "finish_reason": "stop"}}]}}\n\n',
        "data: [DONE]\n\n",
    ]


def test_score_glue_answers_and_records_the_answer(tmp_path):
    from phi3local.serve.monitoring import RequestMonitor
    from phi3local.serve.score import respond

    monitor = RequestMonitor(tmp_path / "requests.jsonl")
    for stream in (False, True):
        r = respond(flask_request(data=json.dumps({"messages": user("x"), "stream": stream}).encode()),
                    service(TraceEngine(PIECES)), monitor)
        if stream:
            "".join(r.response)  # run the stream to its end (its record is written then)
        else:
            assert r.get_json()["choices"][0]["message"]["reasoning_content"] == TRACE
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [(rec["stream"], rec["answer"]) for rec in records] == [(False, ANSWER), (True, ANSWER)]


def test_content_safety_screens_the_trace_as_the_answer():
    """A trace reaches the caller (reasoning_content), so it is screened before it is sent: harm in the trace
    blocks as harm in the answer does, streamed or not; a harmless trace is sent whole."""
    from content_safety_fake import FakeContentSafety

    from phi3local.serve.guard import ContentGuard

    fake = FakeContentSafety()  # Violence 6 for text with HARM in it
    try:
        guard = ContentGuard.from_env({"CONTENT_SAFETY_ENDPOINT": fake.url, "CONTENT_SAFETY_KEY": "k",
                                       "PHI3LOCAL_CONTENT_SAFETY_WINDOW": "10"})
        harmful = ["<think>Plan: ", "HARM HARM.", "</think>", "I can't help with that."]
        body = service(TraceEngine(harmful), guard).complete(parse({"messages": user("x")}))
        assert body["choices"][0] == {"index": 0, "finish_reason": "content_filter",
                                      "message": {"role": "assistant", "content": REFUSAL_TEXT}}
        ds = deltas(list(service(TraceEngine(harmful), guard).stream(parse({"messages": user("x"), "stream": True}))))
        assert not any("HARM" in v for d in ds for v in d.values())
        assert ds[-2] == {"content": REFUSAL_TEXT}
        fine = service(TraceEngine(PIECES), guard)
        assert fine.complete(parse({"messages": user("x")}))["choices"][0]["message"]["reasoning_content"] == TRACE
        ds = deltas(list(fine.stream(parse({"messages": user("x"), "stream": True}))))
        assert "".join(d.get("reasoning_content", "") for d in ds) == TRACE
        assert "".join(d.get("content", "") for d in ds) == ANSWER
    finally:
        fake.close()


# ---------------------------------------------------------------------------------- `phi3local chat`

class FakeChatModel:
    """OnnxChatModel's surface that chat() uses: a template that opens nothing, fixed pieces per turn."""

    def __init__(self, model_dir, turns):
        self.model_dir, self.turns, self.seen = Path(model_dir), list(turns), []

    def render(self, messages, add_generation_prompt=True):
        return "".join(m["content"] for m in messages) + "<|assistant|>"

    def generate(self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=None, seed=None,
                 stream=None):
        from phi3local.serve.chat import GenerationResult

        self.seen.append([dict(m) for m in messages])
        pieces = self.turns.pop(0)
        for piece in pieces:
            stream(piece)
        return GenerationResult(text="".join(pieces), tokens=[1] * len(pieces), prompt_tokens=3,
                                new_tokens=len(pieces), seconds=1.0, time_to_first_token=0.1,
                                tokens_per_second=float(len(pieces)), finish_reason="stop")


def fake_chat(monkeypatch, turns, **kwargs):
    from phi3local.serve import chat as chat_module

    models = []
    monkeypatch.setattr(chat_module, "OnnxChatModel", lambda d: models.append(FakeChatModel(d, turns)) or models[-1])
    shown: list[str] = []
    result = chat_module.chat(Path("m"), stream=shown.append, **kwargs)
    return result, shown, models[0]


def test_chat_hides_the_trace_or_shows_it_before_the_answer(monkeypatch):
    from phi3local.serve.chat import NO_ANSWER

    result, shown, _ = fake_chat(monkeypatch, [PIECES], prompt="q")
    assert "".join(shown) == ANSWER and (result["answer"], result["reasoning"]) == (ANSWER, TRACE)
    assert result["text"] == "".join(PIECES)
    _, shown, _ = fake_chat(monkeypatch, [PIECES], prompt="q", show_reasoning=True)
    assert "".join(shown) == f"<think>\n{TRACE}\n</think>\n\n{ANSWER}"  # no colour here: the tags mark the trace
    _, shown, _ = fake_chat(monkeypatch, [["<think>", "Ben had"]], prompt="q")
    assert "".join(shown) == NO_ANSWER  # stopped inside the trace: say why nothing came
    _, shown, _ = fake_chat(monkeypatch, [["Who", ": Ben."]], prompt="q", show_reasoning=True)
    assert "".join(shown) == "Who: Ben."  # no trace: as before


def test_chat_on_a_terminal_dims_the_trace_or_says_it_is_thinking():
    from phi3local.serve.chat import CLEAR_LINE, DIM, RESET, THINKING, _AnswerPrinter

    for show, expected in ((True, f"{DIM}{TRACE}{RESET}\n\n{ANSWER}"), (False, f"{THINKING}{CLEAR_LINE}{ANSWER}")):
        shown: list[str] = []
        printer = _AnswerPrinter(shown.append, opened=False, show=show, terminal=True)
        for piece in PIECES:
            printer.feed(piece)
        printer.finish()
        assert "".join(shown) == expected


def test_the_repl_keeps_the_answer_only_in_its_history(monkeypatch):
    lines = iter(["first", "second", "/exit"])
    _, shown, model = fake_chat(monkeypatch, [PIECES, ["Fine."]], input_fn=lambda _: next(lines))
    assert model.seen[1] == [user("first")[0], {"role": "assistant", "content": ANSWER}, user("second")[0]]
    assert sum("tokens/s" in s for s in shown) == 2 and not any("Ben had" in s for s in shown)


def test_chat_has_the_show_reasoning_flag():
    from phi3local.cli import build_parser

    args = build_parser().parse_args(["chat", "onnx", "--show-reasoning"])
    assert args.show_reasoning is True
    assert build_parser().parse_args(["chat", "onnx"]).show_reasoning is False


# ---------------------------------------------------------------------------------- a real server, the openai client

def open_the_trace_in_the_prompt(export: Path) -> None:
    """Make an export's chat template end its generation prompt with `<think>` (a reasoning stand-in)."""
    opening = "{% if add_generation_prompt %}{{ '<think>\n' }}{% endif %}"
    config_path = export / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] += opening
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    jinja = export / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(jinja.read_text(encoding="utf-8") + opening, encoding="utf-8")


def reasoning_export(tmp_path_factory) -> Path:
    """The tiny random Phi-3 exported for CPU (about 10 s), its template opening the trace: never closed. Built
    once per session (also for tests/journeys/test_reasoning_journey.py)."""
    import export_helpers as H

    def build(folder: Path) -> None:
        from phi3local.export.onnx import export_onnx

        export_onnx(H.tiny_base(tmp_path_factory), folder, precision="fp32", target="cpu", parity="none", show=False)
        open_the_trace_in_the_prompt(folder)

    return H.cached(tmp_path_factory, "reasoning-onnx-cpu", build)


@pytest.fixture(scope="module")
def reasoning_onnx(tmp_path_factory) -> Path:
    return reasoning_export(tmp_path_factory)


@pytest.fixture(scope="module")
def reasoning_server(reasoning_onnx, tmp_path_factory):
    srv = Server(reasoning_onnx, tmp_path_factory.mktemp("logs") / "reasoning.log", "--max-tokens", "16",
                 "--threads", "2")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log_tail(200_000)


def test_a_served_reasoning_model_answers_with_reasoning_content(reasoning_onnx, reasoning_server):
    from openai import OpenAI

    from phi3local.serve.chat import OnnxChatModel

    model = OnnxChatModel(reasoning_onnx)
    assert prompt_opens_trace(model.render(user("Hello")))
    raw = model.generate(user("Hello"), max_new_tokens=12).text
    assert raw.strip() and "</think>" not in raw
    body = reasoning_server.chat({"messages": user("Hello"), "max_tokens": 12}).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "", "reasoning_content": raw.strip()}
    assert body["choices"][0]["finish_reason"] == "length"
    r = reasoning_server.chat({"messages": user("Hello"), "max_tokens": 12, "stream": True}, stream=True)
    streamed = [json.loads(e)["choices"][0]["delta"] for e in sse_events(r)[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in streamed) == raw.strip()
    assert "".join(d.get("content", "") for d in streamed) == ""

    client = OpenAI(base_url=reasoning_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    answer = client.chat.completions.create(model="m", messages=user("Hello"), max_tokens=12)
    message = answer.choices[0].message
    assert message.content == "" and message.reasoning_content == raw.strip()  # an extra field: attribute access
    assert message.model_extra == {"reasoning_content": raw.strip()}
    chunks = list(client.chat.completions.create(model="m", messages=user("Hello"), max_tokens=12, stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices) == (
        raw.strip())
