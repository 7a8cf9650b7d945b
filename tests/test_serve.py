"""`phi3local serve`: azmlinfsrv + phi3local/serve/score.py on loopback, with a fine-tuned stories260K export.

Unit tests of the pure parts first (protocol, stop sequences, model folder search, settings, argument
checks), then two real servers on free 127.0.0.1 ports, each a module-scoped fixture:
- `server`: stories260K fine-tuned on tests/stories_task.py's format, served from a managed-endpoint
  model layout (<root>/<name>/<version>/<folder>): answers, streams, refusals, concurrent load.
- `slow_server`: a larger random Phi-3 that never stops early: liveness during a long stream.
Figures (latency percentiles, liveness during a stream, worker RSS) are printed; run with -s to see them.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import azureml_inference_server_http  # noqa: F401  (the serve extra: part of `make install`)
import psutil
import pytest
import requests
import yaml
from stories_models import tuned_stories
from stories_task import make_rows

from phi3local.errors import Phi3LocalError
from phi3local.serve import bundle, protocol
from phi3local.serve.errors import ModelDirError, ServeError
from phi3local.serve.guard import REFUSAL_TEXT
from phi3local.serve.model_dir import find_model_dir
from phi3local.serve.server import check_port_free, deployment_environment, serve, server_environment
from phi3local.serve.settings import ServeSettings
from phi3local.serve.stops import StopMatcher

REPO = Path(__file__).resolve().parents[1]
FORMAT = re.compile(r"^Who: \w+\. What: \w+\.$")
CAP = 64  # the stories server's max_tokens cap
BODY_LIMIT = 64 * 1024  # the stories server's body limit
STORIES = ["Ben had a big cake at home.", "Mia saw a little frog near the river.",
           "Tom found a red ball in the park.", "Sue wanted a blue hat at school."]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def parse(body: dict | str | bytes, cap: int = CAP, limit: int = BODY_LIMIT) -> protocol.ChatRequest:
    raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    return protocol.parse_chat_request(raw, max_tokens_cap=cap, max_body_bytes=limit)


# ---------------------------------------------------------------------------------- protocol (no server)

def test_parse_defaults_and_normalisation():
    req = parse({"messages": [{"role": "system", "content": "s", "name": "x"}, *user("hi")], "model": "ignored"})
    assert req.messages == ({"role": "system", "content": "s"}, {"role": "user", "content": "hi"})
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.stream, req.seed) == (CAP, 0.0, 1.0, (), False,
                                                                                             None)
    req = parse({"messages": user("hi"), "max_tokens": CAP, "temperature": 2, "top_p": 1, "stop": "x", "seed": 0,
                 "stream": True, "stream_options": {"include_usage": True}, "n": 1})
    assert (req.max_tokens, req.temperature, req.stop, req.stream, req.include_usage) == (CAP, 2.0, ("x",), True, True)
    assert parse({"messages": user("hi"), "stop": ["a", "b", "a"]}).stop == ("a", "b")
    assert parse({"messages": user("hi"), "max_tokens": None, "temperature": None}).max_tokens == CAP


BAD_BODIES = [  # body, status, param, code
    (b"{not json", 400, None, "invalid_json"),
    (b"\xff\xfe", 400, None, "invalid_json"),
    (b'{"messages": [], "temperature": NaN}', 400, None, "invalid_json"),
    (b"x" * (BODY_LIMIT + 1), 413, None, "body_too_large"),  # refused before any parsing
    (b"[]", 400, None, "invalid_body"),
    (b'"text"', 400, None, "invalid_body"),
    ({}, 400, "messages", "missing_field"),
    ({"messages": None}, 400, "messages", "missing_field"),
    ({"messages": "hi"}, 400, "messages", "invalid_type"),
    ({"messages": {"role": "user"}}, 400, "messages", "invalid_type"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, 400, "messages[1].role",
     "invalid_value"),
    ({"messages": [{"content": "a"}]}, 400, "messages[0].role", "invalid_type"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_field"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, 400, "messages[0].content",
     "invalid_type"),
    ({"messages": user("a"), "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ({"messages": user("a"), "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    ({"messages": user("a"), "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    ({"messages": user("a"), "max_tokens": 0}, 400, "max_tokens", "out_of_range"),
    ({"messages": user("a"), "max_tokens": CAP + 1}, 422, "max_tokens", "max_tokens_over_cap"),
    ({"messages": user("a"), "max_tokens": 10**400}, 422, "max_tokens", "max_tokens_over_cap"),
    ({"messages": user("a"), "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"messages": user("a"), "temperature": -0.1}, 400, "temperature", "out_of_range"),
    ({"messages": user("a"), "temperature": 2.5}, 400, "temperature", "out_of_range"),
    (b'{"messages": [{"role": "user", "content": "a"}], "temperature": 1e999}', 400, "temperature", "out_of_range"),
    ({"messages": user("a"), "top_p": 0}, 400, "top_p", "out_of_range"),
    ({"messages": user("a"), "top_p": 1.01}, 400, "top_p", "out_of_range"),
    ({"messages": user("a"), "top_p": [1]}, 400, "top_p", "invalid_type"),
    ({"messages": user("a"), "stop": 3}, 400, "stop", "invalid_type"),
    ({"messages": user("a"), "stop": ["a", 1]}, 400, "stop", "invalid_type"),
    ({"messages": user("a"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "out_of_range"),
    ({"messages": user("a"), "stop": ""}, 400, "stop", "invalid_value"),
    ({"messages": user("a"), "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"messages": user("a"), "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ({"messages": user("a"), "stream": True, "stream_options": []}, 400, "stream_options", "invalid_type"),
    ({"messages": user("a"), "stream": True, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage", "invalid_type"),
    ({"messages": user("a"), "n": 2}, 400, "n", "invalid_value"),
    ({"messages": user("a"), "seed": -1}, 400, "seed", "out_of_range"),
    ({"messages": user("a"), "seed": "1"}, 400, "seed", "invalid_type"),
]


@pytest.mark.parametrize("body,status,param,code", BAD_BODIES,
                         ids=[f"{i}-{c[3]}-{c[2]}" for i, c in enumerate(BAD_BODIES)])
def test_parse_refusals_name_the_field_and_rule(body, status, param, code):
    with pytest.raises(protocol.RequestError) as info:
        parse(body)
    err = info.value
    assert (err.status, err.param, err.code) == (status, param, code), err.message
    assert isinstance(err, Phi3LocalError)
    assert (param is None or param in err.message) and err.body()["error"]["param"] == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_parse_deeply_nested_json_is_a_400_not_a_crash():
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(protocol.RequestError) as info:
        parse(deep, limit=len(deep))
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_response_shapes():
    body = protocol.completion_body(completion_id="chatcmpl-1", created=1, model="m", text="hi", finish_reason="stop",
                                    prompt_tokens=3, completion_tokens=2)
    assert body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunk = protocol.chunk_body(completion_id="c", created=1, model="m", delta={"content": "a\nb"})
    event = protocol.sse_event(chunk)
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2  # newline escaped
    assert json.loads(event[6:]) == chunk and chunk["choices"][0]["finish_reason"] is None
    last = protocol.chunk_body(completion_id="c", created=1, model="m", delta=None, usage_=protocol.usage(1, 2))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 3
    assert protocol.new_completion_id() != protocol.new_completion_id()


# ---------------------------------------------------------------------------------- stop sequences

def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.feed(p))
        if m.stopped:
            break
    if not m.stopped:
        out.append(m.flush())
    return "".join(out), m.stopped, out


@pytest.mark.parametrize("stops,pieces,text,stopped", [
    (["END"], ["Who", ": B", "en. E", "N", "D more"], "Who: Ben. ", True),  # split over three pieces
    (["END"], ["abc E", "NX"], "abc ENX", False),  # a false start is released
    (["END"], ["abc E"], "abc E", False),  # held text comes back at the end
    (["ab", "b"], ["xab"], "x", True),  # the earliest match wins
    (["\n\n", "."], ["Who: Ben", ". What"], "Who: Ben", True),
    (["aab"], ["a", "a", "a", "b"], "a", True),  # overlapping prefixes
    (["x"], ["x"], "", True),
    ([], ["a", "b"], "ab", False),
])
def test_stop_matcher(stops, pieces, text, stopped):
    got, was_stopped, _ = feed_all(stops, pieces)
    assert (got, was_stopped) == (text, stopped)


def test_stop_matcher_never_emits_the_start_of_a_stop():
    _, _, out = feed_all(["STOP"], ["a S", "T", "O", "P"])
    assert out == ["a ", "", "", ""]
    with pytest.raises(ValueError):
        StopMatcher([""])


# ---------------------------------------------------------------------------------- service + score glue, fake engine

class FakeEngine:
    """Yields fixed text pieces (or fails after them): the service and score.respond without a model."""

    model_dir = Path("fake-model")

    def __init__(self, pieces, fail=False):
        self.pieces, self.fail, self.closed = pieces, fail, 0

    def prepare(self, messages, max_tokens):
        import numpy as np

        from phi3local.serve.engine import Prompt

        return Prompt(ids=np.zeros(3, dtype=np.int32), max_new_tokens=max_tokens)

    def generate(self, prompt, *, temperature, top_p, seed):
        from phi3local.serve.engine import Generation

        def run(generation):
            try:
                for piece in self.pieces:
                    generation.completion_tokens += 1
                    yield piece
                if self.fail:
                    raise RuntimeError("boom")
                generation.finish_reason = "stop"
            finally:
                self.closed += 1

        return Generation(run)


def flask_request(method="POST", data=b"", **kwargs):
    from flask import Request
    from werkzeug.test import EnvironBuilder

    return Request(EnvironBuilder(method=method, data=data, **kwargs).get_environ())


def test_service_applies_stops_and_closes_generations():
    from phi3local.serve.service import ChatService

    engine = FakeEngine(["Who", ": B", "en. W", "hat: cake."])
    service = ChatService(engine, ServeSettings(max_tokens_cap=8))
    body = service.complete(parse({"messages": user("x"), "stop": ". W"}, cap=8))
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "Who: Ben"},
                                  "finish_reason": "stop"}
    assert body["usage"]["completion_tokens"] == 3 and body["model"] == "fake-model" and engine.closed == 1
    events = list(service.stream(parse({"messages": user("x"), "stream": True}, cap=8)))
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]) == (
        "Who: Ben. What: cake.")
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop" and events[-1] == protocol.SSE_DONE


def test_score_glue_reads_bodies_and_reports_failures():
    from phi3local.serve.score import respond
    from phi3local.serve.service import ChatService

    ok = ChatService(FakeEngine(["hi"]), ServeSettings(max_tokens_cap=8, max_body_bytes=200))
    good = json.dumps({"messages": user("x")}).encode()
    assert respond(flask_request(data=good), ok).get_json()["choices"][0]["message"]["content"] == "hi"
    # A chunked body has no Content-Length: read to its end (gunicorn marks it wsgi.input_terminated).
    chunked = {"headers": {"Transfer-Encoding": "chunked"}, "environ_overrides": {"wsgi.input_terminated": True}}
    assert respond(flask_request(input_stream=io.BytesIO(good), **chunked), ok).status_code == 200
    assert respond(flask_request(input_stream=io.BytesIO(b"x" * 201), **chunked), ok).status_code == 413
    assert respond(flask_request(method="OPTIONS"), ok).status_code == 200
    assert respond(flask_request(method="PUT"), ok).status_code == 405
    broken = ChatService(FakeEngine([], fail=True), ServeSettings(max_tokens_cap=8))
    r = respond(flask_request(data=good), broken)
    assert r.status_code == 500 and r.get_json()["error"]["type"] == "server_error"
    r = respond(flask_request(data=json.dumps({"messages": user("x"), "stream": True}).encode()),
                ChatService(FakeEngine(["a"], fail=True), ServeSettings(max_tokens_cap=8)))
    events = [e for e in "".join(r.response).split("\n\n") if e]
    assert r.status_code == 200 and json.loads(events[-1][6:])["error"]["code"] == "server_error"


def test_content_safety_guard_blocks_prompts_and_answers_and_fails_closed(tmp_path):
    from content_safety_fake import FakeContentSafety

    from phi3local.safety.scorer import classify
    from phi3local.serve.guard import ContentGuard
    from phi3local.serve.monitoring import RequestMonitor
    from phi3local.serve.score import respond
    from phi3local.serve.service import ChatService

    fake = FakeContentSafety()  # Violence 6 for any text with HARM in it
    try:
        env = {"CONTENT_SAFETY_ENDPOINT": fake.url, "CONTENT_SAFETY_KEY": "k"}
        guard = ContentGuard.from_env(env)
        assert guard.threshold == 4 and ContentGuard.from_env({}) is None
        monitor = RequestMonitor(tmp_path / "requests.jsonl")

        def ask(pieces, text, stream=False):
            service = ChatService(FakeEngine(pieces), ServeSettings(max_tokens_cap=8), guard)
            body = json.dumps({"messages": user(text), "stream": stream}).encode()
            return respond(flask_request(data=body), service, monitor)

        r = ask(["fine."], "tell me HARM")
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "content_filter"
        assert "Violence severity 6 >= 4" in r.get_json()["error"]["message"]
        assert ask(["fine."], "tell me HARM", stream=True).status_code == 400  # streams screen their prompt too
        r = ask(["HARM ", "HARM."], "hello").get_json()
        assert r["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": REFUSAL_TEXT},
                                   "finish_reason": "content_filter"}
        assert classify(REFUSAL_TEXT).label == "refusal"  # `phi3local monitor` counts it as one
        assert ask(["all ", "good."], "hello").get_json()["choices"][0]["message"]["content"] == "all good."
        records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
        assert [(r["status"], r["error"], r["finish_reason"]) for r in records] == [
            (400, "content_filter", None), (400, "content_filter", None), (200, None, "content_filter"),
            (200, None, "stop")]
    finally:
        fake.close()
    down = ChatService(FakeEngine(["x"]), ServeSettings(max_tokens_cap=8), ContentGuard.from_env(
        {"CONTENT_SAFETY_ENDPOINT": "http://127.0.0.1:9", "CONTENT_SAFETY_KEY": "k"}))
    r = respond(flask_request(data=json.dumps({"messages": user("hi")}).encode()), down)
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "content_safety_unavailable"
    with pytest.raises(ServeError, match="PHI3LOCAL_CONTENT_SAFETY_THRESHOLD"):
        ContentGuard.from_env({**env, "PHI3LOCAL_CONTENT_SAFETY_THRESHOLD": "high"})


def test_streamed_screening_calls_and_latency_of_a_200_token_answer():
    """Figures: screening calls and added time of a 200-token (800-character) streamed answer, the fake
    Content Safety on loopback (a real one adds its own ~0.1-0.3 s per call: Azure's latency, not measured here)."""
    from content_safety_fake import FakeContentSafety

    from phi3local.serve.guard import DEFAULT_WINDOW, ContentGuard
    from phi3local.serve.service import ChatService

    pieces = [f"w{i % 100:02d} " for i in range(200)]  # 4 characters a token, about an English token's
    request = parse({"messages": user("x"), "stream": True}, cap=200)
    fake = FakeContentSafety()
    try:
        guard = ContentGuard.from_env({"CONTENT_SAFETY_ENDPOINT": fake.url, "CONTENT_SAFETY_KEY": "k"})
        assert guard.window_chars == DEFAULT_WINDOW == 200
        timings = {}
        for name, g in (("plain", None), ("guarded", guard)):
            service = ChatService(FakeEngine(pieces), ServeSettings(max_tokens_cap=200), g)
            started = time.perf_counter()
            events = list(service.stream(request))
            timings[name] = time.perf_counter() - started
            text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
            assert text == "".join(pieces)
        # one prompt call, then 800 / 200 = 4 windows, each after up to CONTEXT_CHARS (800) already sent
        assert len(fake.calls) == 5
        assert [len(body["text"]) for _, _, body in fake.calls[1:]] == [200, 400, 600, 800]
        assert fake.calls[-1][2]["text"] == "".join(pieces)
        print(f"\nstreamed 200-token answer, window {DEFAULT_WINDOW}: {len(fake.calls)} Content Safety calls, "
              f"{(timings['guarded'] - timings['plain']) * 1000:.1f} ms added (fake on loopback)")
        # a window that ends mid-way is screened at the end; text is released only in screened windows
        guard.window_chars = 300
        fake.calls.clear()
        service = ChatService(FakeEngine(pieces[:100] + ["HARM "] + pieces[100:]), ServeSettings(max_tokens_cap=201),
                              guard)
        events = list(service.stream(parse({"messages": user("x"), "stream": True}, cap=201)))
        deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[1:-2]]
        assert "".join(deltas[:-1]) == "".join(pieces[:75])  # windows 1 (0-299) passed, 2 (300-599) held HARM
        assert len(fake.calls) == 3 and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "content_filter"
    finally:
        fake.close()



def test_long_answers_are_screened_in_bounded_calls_and_every_piece():
    """A streamed call holds at most WINDOW + CONTEXT_CHARS characters however long the answer, and harm split by
    a window's edge is still seen; an unstreamed answer past the service's 10,000-character limit is screened
    piece by piece, so harm after character 10,000 is found."""
    from content_safety_fake import FakeContentSafety

    from phi3local.serve.content_safety import MAX_TEXT_CHARS
    from phi3local.serve.guard import CONTEXT_CHARS, DEFAULT_WINDOW, ContentGuard

    fake = FakeContentSafety()
    try:
        guard = ContentGuard.from_env({"CONTENT_SAFETY_ENDPOINT": fake.url, "CONTENT_SAFETY_KEY": "k"})
        pieces = [f"w{i % 100:02d} " for i in range(1500)]  # 6,000 characters
        assert "".join(guard.screen_stream(pieces)) == "".join(pieces)
        sizes = [len(body["text"]) for _, _, body in fake.calls]
        assert len(sizes) == 6000 // DEFAULT_WINDOW and max(sizes) == DEFAULT_WINDOW + CONTEXT_CHARS
        fake.calls.clear()
        split = pieces[:99] + ["abHA", "RM "] + pieces[99:]  # "HA" ends window 2 (400 characters), "RM" starts 3
        stream = guard.screen_stream(split)
        assert "".join(stream) == "".join(pieces[:99]) + "abHA" and stream.blocked  # window 2 alone is harmless
        assert "HARM" not in fake.calls[-1][2]["text"][-(DEFAULT_WINDOW + 1):] and "HARM" in fake.calls[-1][2]["text"]
        fake.calls.clear()
        long_answer = "x" * (MAX_TEXT_CHARS + 500) + " HARM " + "y" * 100
        assert guard.blocks(long_answer) and len(fake.calls) == 2
        assert not guard.blocks("x" * (2 * MAX_TEXT_CHARS + 1)) and len(fake.calls) == 5
    finally:
        fake.close()

# ---------------------------------------------------------------------------------- model folder, settings

def fake_export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx").write_bytes(b"")
    return folder


def test_find_model_dir_local_and_managed_layouts(tmp_path):
    local = fake_export(tmp_path / "export")
    assert find_model_dir(local) == local
    version = tmp_path / "azureml-models" / "phi3-chat" / "3"
    inner = fake_export(version / "phi3-onnx")
    (inner / "sub").mkdir()
    fake_export(inner / "nested-copy")  # inside the model folder: not another model
    assert find_model_dir(version) == inner
    assert find_model_dir(tmp_path / "azureml-models") == inner  # from higher up too


def test_find_model_dir_errors(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        find_model_dir(tmp_path / "missing")
    (tmp_path / "empty" / "1").mkdir(parents=True)
    with pytest.raises(ModelDirError, match="no folder holds genai_config.json"):
        find_model_dir(tmp_path / "empty")
    fake_export(tmp_path / "two" / "a")
    fake_export(tmp_path / "two" / "b")
    with pytest.raises(ModelDirError, match=r"2 exported models .*\(a, b\)"):
        find_model_dir(tmp_path / "two")
    assert issubclass(ModelDirError, Phi3LocalError)


def test_the_server_gets_the_managed_endpoint_layout(tmp_path):
    # azmlinfsrv reads AZUREML_MODEL_DIR as <name>/<version> when it ends in a number; an export folder given
    # as it is made its model-id scan log a traceback over the export's files (parity.json).
    from phi3local.serve.server import served_model_root

    export = fake_export(tmp_path / "my export")
    (export / "parity.json").write_text("{}")
    root = served_model_root(export, "my model")
    assert root.name == "1" and root.parent.name == "my-model"
    assert sorted(p.name for p in root.iterdir()) == ["my export"]
    assert find_model_dir(root) == root / "my export" and (root / "my export").resolve() == export.resolve()


def test_settings_from_env():
    assert ServeSettings.from_env({}) == ServeSettings()
    s = ServeSettings.from_env({"PHI3LOCAL_MAX_TOKENS": "32", "PHI3LOCAL_MAX_BODY_BYTES": "100",
                                "PHI3LOCAL_MODEL_NAME": "m"})
    assert (s.max_tokens_cap, s.max_body_bytes, s.model_name) == (32, 100, "m")
    assert ServeSettings.from_env(s.to_env()) == s
    for bad in ("0", "-3", "ten", "1.5"):
        with pytest.raises(ServeError, match="PHI3LOCAL_MAX_TOKENS"):
            ServeSettings.from_env({"PHI3LOCAL_MAX_TOKENS": bad})
    env = server_environment(ServeSettings(), threads=3, health_port=5000, base={"GUNICORN_CMD_ARGS": "--log-level info"})
    assert env["GUNICORN_CMD_ARGS"].startswith("--log-level info --threads 3")
    assert env["SEPERATE_HEALTH_ENDPOINT"] == "true" and env["PHI3LOCAL_MAX_TOKENS"] == "512"
    assert deployment_environment(ServeSettings(max_tokens_cap=256), threads=4) == {
        "PHI3LOCAL_MAX_TOKENS": "256", "PHI3LOCAL_MAX_BODY_BYTES": str(1 << 20), "GUNICORN_CMD_ARGS": "--threads 4"}


def test_serve_refuses_bad_arguments_before_starting(tmp_path):
    model = fake_export(tmp_path / "m")
    with pytest.raises(ModelDirError):
        serve(tmp_path / "nothing")
    for kwargs, match in [({"port": 0}, "port"), ({"workers": 0}, "workers"), ({"threads": "4"}, "threads"),
                          ({"max_tokens_cap": 0}, "max_tokens_cap"), ({"health_port": 7000, "port": 7000}, "differ")]:
        with pytest.raises(ServeError, match=match):
            serve(model, **kwargs)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(ServeError, match="cannot listen"):
            serve(model, port=port)


def test_environment_files_pin_what_was_tested():
    from importlib.metadata import version

    for target, runtime in (("cpu", "onnxruntime-genai"), ("cuda", "onnxruntime-genai-cuda")):
        env = yaml.safe_load(bundle.environment_file(target).read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        pins = dict(line.split("==") for line in pip if "==" in line)
        assert pins[runtime] == version("onnxruntime-genai")
        assert pins["azureml-inference-server-http"] == version("azureml-inference-server-http")
        assert pins["azureml-ai-monitoring"] == version("azureml-ai-monitoring")
        assert {"numpy", "jinja2"} <= {re.split(r"[<>=]", line)[0] for line in pip}
    with pytest.raises(ServeError):
        bundle.environment_file("tpu")


# ---------------------------------------------------------------------------------- models and servers

@pytest.fixture(scope="module")
def stories_onnx(tmp_path_factory, shared_data):
    """stories260K, QLoRA-tuned briefly on the stories task (20 steps: 57 of 60 held-out answers exact), fp32."""
    return tuned_stories(tmp_path_factory) / "stories-onnx"


@pytest.fixture(scope="module")
def managed_layout(stories_onnx, tmp_path_factory):
    """AZUREML_MODEL_DIR as a managed endpoint sets it: <root>/<name>/<version>, the folder inside by its name."""
    version_dir = tmp_path_factory.mktemp("azureml-app") / "azureml-models" / "stories-chat" / "1"
    shutil.copytree(stories_onnx, version_dir / stories_onnx.name)
    return version_dir


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory):
    """A random Phi-3 (8 layers of 512) whose stop logits are zero: it generates to the end of its 512 context."""
    import export_helpers as H

    from phi3local.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("serve-slow")
    H.build_tiny_model(folder / "hf", hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8)
    export_onnx(folder / "hf", folder / "slow-onnx", precision="fp32", target="cpu", parity="none", show=False)
    return folder / "slow-onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m phi3local.serve.server` in a child process, on a free loopback port."""

    def __init__(self, model_dir: Path, log: Path, *args: str, startup_s: float = 120.0,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "phi3local.serve.server", str(model_dir), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server not ready after {startup_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def chat(self, body: dict, session=None, **kwargs) -> requests.Response:
        return (session or requests).post(self.url + "/score", json=body, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def server(managed_layout, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    srv = Server(managed_layout, logs / "stories.log", "--max-tokens", str(CAP), "--max-body-bytes", str(BODY_LIMIT),
                 "--threads", "4", "--monitor-log", str(logs / "requests.jsonl"))
    srv.monitor_log = logs / "requests.jsonl"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server(slow_onnx, tmp_path_factory):
    srv = Server(slow_onnx, tmp_path_factory.mktemp("logs") / "slow.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def content_safety():
    from content_safety_fake import FakeContentSafety

    fake = FakeContentSafety()
    yield fake
    fake.close()


GUARD_WINDOW = 8  # characters: a stories answer ("Who: Ben. What: cake.") is screened in about three windows


@pytest.fixture(scope="module")
def guarded_server(stories_onnx, content_safety, tmp_path_factory):
    """The stories model behind the Content Safety guardrail (the fake on loopback), screening by GUARD_WINDOW."""
    logs = tmp_path_factory.mktemp("logs")
    srv = Server(stories_onnx, logs / "guarded.log", "--max-tokens", str(CAP), "--threads", "2",
                 "--monitor-log", str(logs / "requests.jsonl"),
                 env={"CONTENT_SAFETY_ENDPOINT": content_safety.url, "CONTENT_SAFETY_KEY": "k",
                      "PHI3LOCAL_CONTENT_SAFETY_WINDOW": str(GUARD_WINDOW)})
    srv.monitor_log = logs / "requests.jsonl"
    yield srv
    srv.stop()


def sse_events(response: requests.Response) -> list[str]:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[len("data: "):] for line in lines]


# ---------------------------------------------------------------------------------- the stories server

def test_liveness(server):
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.text == "Healthy"


def test_chat_answers_in_the_tuned_format(server):
    exact = 0
    for story in STORIES:
        r = server.chat({"messages": user(story), "max_tokens": 24})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["model"] == "stories-onnx"  # the folder found inside the managed layout
        assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 600
        (choice,) = body["choices"]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 24
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        answer = choice["message"]["content"]
        assert FORMAT.match(answer), answer
        name, thing = story.split()[0], story.split()[4].rstrip(".")
        exact += answer == f"Who: {name}. What: {thing}."
    assert exact >= 3, exact


def monitor_records(server, prefix: str, count: int, timeout_s: float = 10.0) -> dict[str, dict]:
    """The monitoring records whose correlation id starts with prefix, once there are `count` of them (a
    streamed answer's record is written when the server's generator ends, just after the client's [DONE])."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [json.loads(line) for line in server.monitor_log.read_text().splitlines()]
        found = {r["correlation_id"]: r for r in records if r["correlation_id"].startswith(prefix)}
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_stream_deltas_equal_the_answer(server):
    texts = {}
    for i, extra in enumerate(({}, {"stop": ". What"}, {"stop": ["n.", "zzz"]})):
        body = {"messages": user(STORIES[0]), "max_tokens": 24, "temperature": 0, **extra}
        whole = server.chat(body).json()
        r = server.chat({**body, "stream": True, "stream_options": {"include_usage": True}}, stream=True,
                        headers={"x-request-id": f"stream-{i}"})
        assert r.status_code == 200
        events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        *content, final, usage = chunks
        assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == whole["choices"][0][
            "finish_reason"]
        assert usage["choices"] == [] and usage["usage"] == whole["usage"]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
        assert len(content) > 2 and text == whole["choices"][0]["message"]["content"], extra
        texts[f"stream-{i}"] = (text, whole["usage"], final["choices"][0]["finish_reason"])
    records = monitor_records(server, "stream-", 3)
    assert {k: (r["answer"], {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                              "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}, r["finish_reason"])
            for k, r in records.items()} == texts
    assert all(r["stream"] and r["status"] == 200 for r in records.values())


def test_stop_sequences_and_length(server):
    r = server.chat({"messages": user(STORIES[0]), "max_tokens": 24, "stop": ". What"}).json()
    assert r["choices"][0]["message"]["content"] == "Who: Ben" and r["choices"][0]["finish_reason"] == "stop"
    r = server.chat({"messages": user(STORIES[0]), "max_tokens": 3}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    r = server.chat({"messages": user(STORIES[0]), "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 24})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


HTTP_REFUSALS = [  # (name, how to send, status, param, code)
    ("invalid_json", {"data": b'{"messages": [', "headers": {"Content-Type": "application/json"}}, 400, None,
     "invalid_json"),
    ("missing_messages", {"json": {"max_tokens": 3}}, 400, "messages", "missing_field"),
    ("empty_messages", {"json": {"messages": []}}, 400, "messages", "invalid_value"),
    ("non_list_messages", {"json": {"messages": "hi"}}, 400, "messages", "invalid_type"),
    ("unknown_role", {"json": {"messages": [{"role": "tool", "content": "x"}]}}, 400, "messages[0].role",
     "invalid_value"),
    ("non_string_content", {"json": {"messages": [{"role": "user", "content": 5}]}}, 400, "messages[0].content",
     "invalid_type"),
    ("non_numeric_max_tokens", {"json": {"messages": user("a"), "max_tokens": "many"}}, 400, "max_tokens",
     "invalid_type"),
    ("negative_max_tokens", {"json": {"messages": user("a"), "max_tokens": -1}}, 400, "max_tokens", "out_of_range"),
    ("max_tokens_over_cap", {"json": {"messages": user("a"), "max_tokens": CAP + 1}}, 422, "max_tokens",
     "max_tokens_over_cap"),
    ("non_numeric_temperature", {"json": {"messages": user("a"), "temperature": "warm"}}, 400, "temperature",
     "invalid_type"),
    ("temperature_out_of_range", {"json": {"messages": user("a"), "temperature": 9}}, 400, "temperature",
     "out_of_range"),
    ("top_p_out_of_range", {"json": {"messages": user("a"), "top_p": 0}}, 400, "top_p", "out_of_range"),
    ("prompt_over_context", {"json": {"messages": user("Lily saw a dog. " * 200)}}, 422, "messages",
     "context_length_exceeded"),
    ("prompt_over_context_streamed", {"json": {"messages": user("Lily saw a dog. " * 200), "stream": True}}, 422,
     "messages", "context_length_exceeded"),
    ("body_over_limit", {"data": b"x" * (BODY_LIMIT + 1)}, 413, None, "body_too_large"),
    ("chunked_body_over_limit", {"data": (b"x" * 4096 for _ in range(BODY_LIMIT // 4096 + 1))}, 413, None,
     "body_too_large"),
]


def test_bad_requests_get_4xx_naming_the_field_and_workers_survive(server):
    workers_before = sorted(p.pid for p in server.workers())
    for name, how, status, param, code in HTTP_REFUSALS:
        how = {**how, "headers": {**how.get("headers", {}), "x-request-id": f"bad-{name}"}}
        r = requests.post(server.url + "/score", timeout=30, **how)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (name, error)
        assert error["message"] and error["type"] == "invalid_request_error"
        if param:
            assert param in error["message"], (name, error["message"])
    r = requests.get(server.url + "/score", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    # Each refusal left its record: the status and the error code, as the client saw them.
    records = monitor_records(server, "bad-", len(HTTP_REFUSALS))
    assert {k: (r["status"], r["error"]) for k, r in records.items()} == {
        f"bad-{name}": (status, code) for name, _, status, _, code in HTTP_REFUSALS}
    # Nothing crashed or hung: the same workers answer the next request.
    assert sorted(p.pid for p in server.workers()) == workers_before
    assert server.chat({"messages": user(STORIES[1]), "max_tokens": 24}).status_code == 200


PLANTED_EMAIL = "ben.smith@example.com"
PLANTED_KEY = "sk-proj-AbCdEf0123456789AbCdEf0123456789"


def test_concurrent_load_is_independent_and_error_free(server):
    prompts = [r["messages"][0]["content"] for r in make_rows(25, seed=5)]
    # Personal data the monitoring log must never hold: an email and an API key in two of the prompts.
    prompts[0] += f" Write to {PLANTED_EMAIL}."
    prompts[1] += f" My key is {PLANTED_KEY}."
    # Each prompt's answer alone first; under load every answer must be the same (no shared state).
    expected = {p: server.chat({"messages": user(p), "max_tokens": 24}).json()["choices"][0]["message"]["content"]
                for p in prompts}
    jobs = [prompts[i % len(prompts)] for i in range(200)]
    local = threading.local()

    def one(job):
        number, prompt = job
        local.session = getattr(local, "session", None) or requests.Session()  # keep-alive per client
        t0 = time.perf_counter()
        r = server.chat({"messages": user(prompt), "max_tokens": 24}, session=local.session,
                        headers={"x-request-id": f"load-{number}"})
        latency = time.perf_counter() - t0
        ok = (r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[prompt]
              and r.headers["x-request-id"] == f"load-{number}")
        return ok, latency, r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, enumerate(jobs)))
    wall = time.perf_counter() - t0
    failures = [(status, p) for (ok, _, status), p in zip(results, jobs) if not ok]
    latencies = sorted(lat for _, lat, _ in results)
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"\nload: 200 requests, 8 clients, 1 worker x 4 threads: {len(jobs) / wall:.1f} req/s, "
          f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    assert not failures, failures[:5]
    assert p50 <= p95 < 10.0, (p50, p95)

    # The monitoring log: one record per request, each with its latency and tokens, personal data redacted.
    text = server.monitor_log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    load = {r["correlation_id"]: r for r in records if r["correlation_id"].startswith("load-")}
    assert sorted(load) == sorted(f"load-{i}" for i in range(200))
    assert sum(r["correlation_id"].startswith("load-") for r in records) == 200  # no request twice
    for i, prompt in enumerate(jobs):
        r = load[f"load-{i}"]
        assert r["status"] == 200 and r["latency_ms"] > 0 and r["prompt_tokens"] > 0 and r["completion_tokens"] >= 1
        assert r["answer"] == expected[prompt] and r["error"] is None
    assert PLANTED_EMAIL not in text and PLANTED_KEY not in text
    assert load["load-0"]["messages"][0]["content"].endswith("Write to [EMAIL].")
    assert load["load-1"]["messages"][0]["content"].endswith("My key is [KEY].")


def stream_chunks(server, body: dict, correlation: str) -> tuple[list[dict], list[str]]:
    """The streamed chunks of body (the [DONE] dropped) and its content deltas."""
    r = server.chat({**body, "stream": True}, stream=True, headers={"x-request-id": correlation})
    assert r.status_code == 200, r.text
    events = sse_events(r)
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices")]
    return chunks, [d for d in deltas if d]


def test_guarded_stream_of_a_harmless_answer_equals_the_unstreamed_one(guarded_server, content_safety):
    content_safety.harmful, content_safety.down_after = "HARM", None  # nothing a stories answer says
    for i, story in enumerate(STORIES[:2]):
        body = {"messages": user(story), "max_tokens": 24, "temperature": 0}
        whole = guarded_server.chat(body).json()["choices"][0]
        calls = len(content_safety.calls)
        chunks, deltas = stream_chunks(guarded_server, body, f"guard-ok-{i}")
        answer = whole["message"]["content"]
        assert "".join(deltas) == answer and FORMAT.match(answer), (deltas, answer)
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "stop"
        # the prompt, then one call per GUARD_WINDOW characters held back, and one for the rest at the end
        windows = len(content_safety.calls) - calls - 1
        assert len(answer) // GUARD_WINDOW <= windows <= len(answer) // GUARD_WINDOW + 1, (windows, answer)
        # each call screens the whole answer so far: the last one is the whole answer, as unstreamed
        assert content_safety.calls[-1][2]["text"] == answer


def test_guarded_stream_stops_before_a_harmful_window(guarded_server, content_safety):
    content_safety.harmful, content_safety.down_after = "What", None  # the answer's second half "turns harmful"
    body = {"messages": user(STORIES[0]), "max_tokens": 24, "temperature": 0}
    unstreamed = guarded_server.chat(body).json()
    whole = unstreamed["choices"][0]
    assert whole == {"index": 0, "message": {"role": "assistant", "content": REFUSAL_TEXT},
                     "finish_reason": "content_filter"}
    chunks, deltas = stream_chunks(guarded_server, body, "guard-blocked")
    content_safety.harmful = "HARM"
    assert not any("What" in d for d in deltas), deltas  # the harmful window never reached the client
    released = "".join(deltas[:-1])
    assert released.startswith("Who: ") and len(released) >= GUARD_WINDOW, deltas  # the harmless start did
    assert deltas[-1] == "\n\n" + REFUSAL_TEXT and chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    (record,) = monitor_records(guarded_server, "guard-blocked", 1).values()
    assert (record["status"], record["stream"], record["finish_reason"], record["error"]) == (
        200, True, "content_filter", None)
    assert record["answer"] == "".join(deltas) and "What" not in record["answer"]
    # generation stopped at the blocked window: fewer tokens than the whole (unstreamed) answer's
    assert 0 < record["completion_tokens"] < unstreamed["usage"]["completion_tokens"]


def test_guarded_stream_fails_closed_when_content_safety_goes_down(guarded_server, content_safety):
    content_safety.harmful = "HARM"
    content_safety.down_after = len(content_safety.calls) + 1  # the prompt is screened, then every call is a 503
    try:
        body = {"messages": user(STORIES[1]), "max_tokens": 24, "temperature": 0}
        chunks, deltas = stream_chunks(guarded_server, body, "guard-down")
        assert deltas == []  # no unscreened text was sent
        assert chunks[-1]["error"]["code"] == "content_safety_unavailable"
        assert "answered 503" in chunks[-1]["error"]["message"]
        (record,) = monitor_records(guarded_server, "guard-down", 1).values()
        assert (record["status"], record["finish_reason"], record["error"], record["answer"]) == (
            200, None, "content_safety_unavailable", "")
        r = guarded_server.chat(body)  # unstreamed, and also a stream's prompt: the 503 of the non-streamed path
        assert r.status_code == 503 and r.json()["error"]["code"] == "content_safety_unavailable"
    finally:
        content_safety.down_after = None


def test_monitor_reads_the_servers_log(server, capsys):
    from phi3local.cli import main

    records = [json.loads(line) for line in server.monitor_log.read_text().splitlines()]
    assert main(["monitor", str(server.monitor_log), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["overall"]
    assert summary["requests"] == len(records) >= 200 + len(HTTP_REFUSALS)
    assert summary["errors_4xx"] == sum(400 <= r["status"] < 500 for r in records) >= len(HTTP_REFUSALS)
    assert summary["errors_5xx"] == 0 and summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert summary["completion_tokens_mean"] >= 1


def test_listens_on_loopback_only(server, slow_server):
    for srv in (server, slow_server):
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == srv.port]
        assert listening, f"nothing listens on port {srv.port}"
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening


# ---------------------------------------------------------------------------------- the slow server

def test_liveness_stays_answerable_during_a_long_stream(slow_server):
    body = {"messages": user("Once upon a time"), "max_tokens": 480, "stream": True}
    done = {}

    def stream():
        t0 = time.perf_counter()
        r = slow_server.chat(body, stream=True)
        done["events"] = sse_events(r)
        done["seconds"] = time.perf_counter() - t0

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.5)
    probes = []
    while streamer.is_alive() and len(probes) < 20:
        t0 = time.perf_counter()
        assert requests.get(slow_server.url + "/", timeout=30).status_code == 200
        probes.append(time.perf_counter() - t0)
        time.sleep(0.1)
    streamer.join()
    final = json.loads(done["events"][-2])
    assert done["events"][-1] == "[DONE]" and final["choices"][0]["finish_reason"] == "length"
    rss = [p.memory_info().rss for p in slow_server.workers()]
    print(f"\nliveness during a {done['seconds']:.1f} s stream (1 worker x 4 threads): {len(probes)} probes, "
          f"max {max(probes) * 1000:.0f} ms, median {statistics.median(probes) * 1000:.0f} ms; "
          f"worker RSS {[round(r / 2**20) for r in rss]} MiB")
    assert len(probes) >= 3, f"the stream ended too soon to probe ({done['seconds']:.1f} s)"
    assert max(probes) < 1.0, probes


def test_client_gone_mid_stream_does_not_wedge_the_worker(slow_server):
    with requests.post(slow_server.url + "/score", json={"messages": user("Once"), "max_tokens": 480, "stream": True},
                       stream=True, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
    r = slow_server.chat({"messages": user("Hello"), "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_worker_memory(server, slow_server):
    for name, srv in (("stories260K fp32", server), ("random 8x512 fp32", slow_server)):
        model_mib = sum(p.stat().st_size for p in Path(srv.proc.args[3]).rglob("*") if p.is_file()) / 2**20
        rss = [p.memory_info().rss / 2**20 for p in srv.workers()]
        print(f"\n{name}: model files {model_mib:.1f} MiB, worker RSS {[round(r) for r in rss]} MiB "
              f"(each worker holds its own copy)")
        assert len(rss) == 1 and all(r < 2048 for r in rss)


# ---------------------------------------------------------------------------------- the deployment's code folder

SCORE_FROM_CODE_FOLDER = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("entry_module", sys.argv[1])  # as azmlinfsrv loads it
score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(score)
score.init()
import phi3local
from werkzeug.test import EnvironBuilder
from flask import Request
request = Request(EnvironBuilder(method="POST", data=sys.argv[2], content_type="application/json").get_environ())
response = score.run(request)
heavy = sorted(m for m in ("torch", "transformers", "peft", "accelerate") if m in sys.modules)
print(json.dumps({"status": response.status_code, "body": response.get_json(), "heavy": heavy,
                  "phi3local": phi3local.__file__, "model_dir": str(score.service.engine.model_dir)}))
"""


def test_scoring_from_a_bare_code_folder_imports_no_torch(managed_layout, tmp_path):
    code = tmp_path / "code"
    bundle.write_code_folder(code)
    # -S: no site-packages .pth files, so not the editable install: only the code folder's phi3local.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), sysconfig.get_paths()["purelib"]]),
           "AZUREML_MODEL_DIR": str(managed_layout), "PHI3LOCAL_MAX_TOKENS": "24"}
    request = json.dumps({"messages": user(STORIES[2])})
    out = subprocess.run([sys.executable, "-S", "-c", SCORE_FROM_CODE_FOLDER, str(code / bundle.SCORING_SCRIPT),
                          request], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], result["heavy"]
    assert result["phi3local"].startswith(str(code))
    assert result["model_dir"] == str(managed_layout / "stories-onnx")
    assert result["status"] == 200 and FORMAT.match(result["body"]["choices"][0]["message"]["content"])


# ---------------------------------------------------------------------------------- the runtime cannot import torch

def _phi3local_imports(path: Path) -> set[str]:
    """Every phi3local module a file imports, at import time or inside a function."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))  # relative: refused below
    return {m for m in found if m.startswith(("phi3local", "."))}


def test_the_serving_runtime_imports_only_itself_and_the_base_error():
    # What makes the package itself the deployment's code: nothing of phi3local outside it but phi3local.errors.
    for path in sorted(bundle.PACKAGE_DIR.glob("*.py")):
        outside = {m for m in _phi3local_imports(path)
                   if m != "phi3local.errors" and m != bundle.PACKAGE and not m.startswith(bundle.PACKAGE + ".")}
        assert not outside, f"{path.name} imports {sorted(outside)} from outside phi3local/serve/"
    assert sorted(bundle.PARENT_FILES) == ["phi3local/__init__.py", "phi3local/errors.py"]


BLOCKED_IMPORTS = r"""
import importlib, json, pkgutil, sys

BLOCKED = ("torch", "transformers", "huggingface_hub")


class Blocked:
    # A finder that refuses the heavy stacks, as an environment without them would.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test", name=name)
        return None


sys.meta_path.insert(0, Blocked())
from phi3local.serve import bundle
import phi3local.azure
from phi3local.azure.sdk import AzureSdkMissing

names = bundle.module_names()
names += [f"phi3local.azure.{m.name}" for m in pkgutil.iter_modules(phi3local.azure.__path__)]
result = {"imported": [], "sdk_missing": [], "failed": {}}
for name in names:
    try:
        importlib.import_module(name)
        result["imported"].append(name)
    except AzureSdkMissing:  # this venv has no Azure SDK: the one-line error, not torch
        result["sdk_missing"].append(name)
    except Exception as e:
        result["failed"][name] = f"{type(e).__name__}: {e}"
from phi3local import cli

cli.build_parser()  # registering every command imports no stage
result["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print(json.dumps(result))
"""


def test_the_runtime_and_the_azure_modules_import_with_torch_transformers_and_the_hub_blocked():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, timeout=180,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == {} and result["heavy"] == []
    assert set(bundle.module_names()) <= set(result["imported"])
    assert "phi3local.serve.score" in result["imported"]
    assert "phi3local.azure.commands" in result["imported"] and "phi3local.azure.spec" in result["imported"]
    # Without the SDK, the module that needs it at import time says so in one line (AzureSdkMissing).
    assert set(result["sdk_missing"]) <= {"phi3local.azure.blob_upload"}
