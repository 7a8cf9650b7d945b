"""The server's decode loop (phi3local.serve.batching): concurrent requests decoded in turn on one thread.

A request's tokens must not depend on what else runs: N concurrent requests (prompts of different lengths,
greedy and seeded sampling, different max_tokens) are compared token for token with each request alone.
Also: the loop's bound on concurrent requests, cancellation by a reader that leaves, a failure that stays
with its request, and the service's streamed and non-streamed answers over the loop.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from export_helpers import build_tiny_model, cached

from phi3local.serve import chat as chat_module
from phi3local.serve.batching import READ_AHEAD, DecodeLoop
from phi3local.serve.engine import OnnxEngine
from phi3local.serve.errors import ServeError
from phi3local.serve.settings import ServeSettings

PROMPTS = ["hi", "tell me a story about a cat", "a b c d e f g h i j k l m n o p", "why", "the dog and the cat and",
           "one two three four five six seven eight nine ten eleven twelve", "ok", "what is it"]


def _build(folder: Path) -> None:
    from phi3local.export.onnx import export_onnx

    build_tiny_model(folder / "hf", hidden_size=64, num_layers=2)
    export_onnx(folder / "hf", folder / "onnx", precision="fp32", target="cpu", parity="none", show=False)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    """A tiny random Phi-3 export whose stop logits are zero: greedy decoding runs to max_tokens."""
    return cached(tmp_path_factory, "batching-tiny", _build) / "onnx"


@pytest.fixture(scope="module")
def engines(onnx_dir):
    return OnnxEngine(onnx_dir, max_batch=0), OnnxEngine(onnx_dir, max_batch=8)


def _prompt(engine, text: str, max_tokens: int):
    return engine.prepare([{"role": "user", "content": text}], max_tokens)


def _concurrently(fn, n: int) -> list:
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def test_concurrent_greedy_and_seeded_requests_equal_each_alone(engines):
    alone_engine, engine = engines
    jobs = []  # (prompt ids, max_new_tokens, sampling), prompts of different lengths, mixed settings
    for i, text in enumerate(PROMPTS):
        prompt = _prompt(engine, text, 12 + 5 * i)
        sampling = {} if i % 3 else {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i}
        jobs.append((prompt.ids, prompt.max_new_tokens, sampling))
    assert len({len(ids) for ids, _, _ in jobs}) > 4  # different prompt lengths
    alone = [list(alone_engine.chat_model.iter_tokens(ids, n, **s)) for ids, n, s in jobs]
    assert len({tuple(t for t, _ in a) for a in alone}) == len(alone)  # the requests really differ
    rounds = engine.loop.rounds

    together = _concurrently(lambda i: list(engine.loop.tokens(jobs[i][0], jobs[i][1], **jobs[i][2])), len(jobs))

    for i, (a, b) in enumerate(zip(alone, together)):
        assert b == a, f"request {i} ({PROMPTS[i]!r}, {jobs[i][2]}) changed when run with the others"
        assert len(b) == jobs[i][1]  # its own max_tokens
    # They ran together: more than one request advanced per round, in fewer rounds than tokens in all.
    assert engine.loop.peak_active > 1
    assert engine.loop.rounds - rounds < sum(len(b) for b in together)


def test_the_loop_bounds_concurrent_requests(onnx_dir):
    engine = OnnxEngine(onnx_dir, max_batch=2)
    prompt = _prompt(engine, "hello there", 10)
    alone = list(engine.chat_model.iter_tokens(prompt.ids, 10))
    together = _concurrently(lambda i: list(engine.loop.tokens(prompt.ids, 10)), 5)
    assert together == [alone] * 5
    assert engine.loop.peak_active == 2


def test_a_reader_that_leaves_frees_its_sequence_and_the_others_go_on(engines):
    _, engine = engines
    long_prompt, short_prompt = _prompt(engine, "a long one", 400), _prompt(engine, "short", 20)
    expected = list(engines[0].chat_model.iter_tokens(short_prompt.ids, 20))
    decodes = []
    original = chat_module.Decode.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        decodes.append(self)

    chat_module.Decode.__init__ = spy
    try:
        leaving = engine.loop.tokens(long_prompt.ids, 400)
        first = [next(leaving) for _ in range(3)]
        other = engine.loop.tokens(short_prompt.ids, 20)
        got = [next(other)]
        leaving.close()  # a client gone, or a stop sequence matched
        got += list(other)
    finally:
        chat_module.Decode.__init__ = original
    assert len(first) == 3 and got == expected
    deadline = time.monotonic() + 10
    while decodes[0].generator is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    # Freed early: it ran at most READ_AHEAD tokens (and the round in progress) ahead of its reader.
    assert decodes[0].generator is None and decodes[0].produced <= 3 + READ_AHEAD + 1


def test_a_failure_stays_with_its_request(engines, monkeypatch):
    alone_engine, engine = engines
    prompts = [_prompt(engine, text, 15) for text in PROMPTS[:4]]
    expected = [list(alone_engine.chat_model.iter_tokens(p.ids, 15)) for p in prompts]
    bad = len(prompts[2].ids)
    assert sum(len(p.ids) == bad for p in prompts) == 1
    step = chat_module.Decode.step

    def failing(self):
        if len(self.ids) == bad and self.produced == 4:
            raise RuntimeError("onnxruntime failed")
        return step(self)

    monkeypatch.setattr(chat_module.Decode, "step", failing)

    def run(i):
        try:
            return list(engine.loop.tokens(prompts[i].ids, 15))
        except RuntimeError as e:
            return str(e)

    results = _concurrently(run, len(prompts))
    assert results[2] == "onnxruntime failed"
    assert [r for i, r in enumerate(results) if i != 2] == [e for i, e in enumerate(expected) if i != 2]
    monkeypatch.setattr(chat_module.Decode, "step", step)
    assert list(engine.loop.tokens(prompts[2].ids, 15)) == expected[2]  # the loop still serves


def test_service_answers_and_streams_over_the_loop_as_alone(engines):
    from phi3local.serve.service import ChatService

    alone, batched = (ChatService(e) for e in engines)

    def body(i, stream):
        request = {"messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": 16, "stream": stream}
        if i % 2:
            request["stop"] = ["zz"]
        return json.dumps(request).encode()

    def text(service, i, stream):
        request = service.parse(body(i, stream))
        if not stream:
            answer = service.complete(request)
            return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
        deltas = []
        for event in service.stream(request):
            if event.startswith("data: {"):
                choice = json.loads(event[6:])["choices"]
                if choice and choice[0]["delta"].get("content"):
                    deltas.append(choice[0]["delta"]["content"])
        return "".join(deltas)

    n = len(PROMPTS)
    expected = [text(alone, i, False) for i in range(n)]
    assert _concurrently(lambda i: text(batched, i, False), n) == expected
    assert _concurrently(lambda i: text(batched, i, True), n) == [t for t, _ in expected]


def test_max_batch_setting():
    assert ServeSettings.from_env({}).max_batch == 0  # opt-in
    assert "PHI3LOCAL_MAX_BATCH" not in ServeSettings().to_env()
    s = ServeSettings.from_env({"PHI3LOCAL_MAX_BATCH": "0"})
    assert s.max_batch == 0 and ServeSettings.from_env(s.to_env()) == s
    assert ServeSettings.from_env({"PHI3LOCAL_MAX_BATCH": "3"}).to_env()["PHI3LOCAL_MAX_BATCH"] == "3"
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ServeError, match="PHI3LOCAL_MAX_BATCH"):
            ServeSettings.from_env({"PHI3LOCAL_MAX_BATCH": bad})
    with pytest.raises(ValueError):
        DecodeLoop(None, 0)


def test_decode_steps_equal_iter_tokens(engines):
    """The loop and `chat` share chat.Decode: its tokens are iter_tokens' (a stop id included, then nothing)."""
    alone_engine, _ = engines
    model = alone_engine.chat_model
    ids = np.asarray(model.tokenizer.encode("some words here"), dtype=np.int32)
    decode = chat_module.Decode(model, ids, 9)
    assert list(decode.tokens()) == [t for t, _ in model.iter_tokens(ids, 9)]
    assert list(chat_module.Decode(model, ids, 0).tokens()) == []
