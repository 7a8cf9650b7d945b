"""OpenAI's clients against `phi3local serve`: the real `openai` and `azure-ai-inference` packages, unchanged.

One server on a free 127.0.0.1 port (tests/test_serve.py's Server: `python -m phi3local.serve.server`) serving
the stories260K model fine-tuned on tests/stories_task.py's format (built once per session, shared with
tests/test_serve.py). Each client's answer, stream and 4xx is compared with what POST /score answers to the
same request: the routes are /score's scoring view under other paths (phi3local.serve.openai_routes).
"""

from __future__ import annotations

import json

import pytest
import requests
from azure.ai.inference import ChatCompletionsClient
from azure.ai.inference.models import SystemMessage, UserMessage
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError
from openai import APIStatusError, BadRequestError, OpenAI, UnprocessableEntityError
from stories_models import tuned_stories
from test_serve import FORMAT, STORIES, Server, monitor_records, user

from phi3local.serve import openai_routes, protocol
from phi3local.serve.server import server_environment
from phi3local.serve.settings import ServeSettings

CAP = 32  # this server's max_tokens cap
BODY_LIMIT = 16 * 1024
MODEL = "stories-onnx"  # the export folder's name: the served model's id


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    onnx = tuned_stories(tmp_path_factory) / MODEL
    logs = tmp_path_factory.mktemp("openai-logs")
    srv = Server(onnx, logs / "serve.log", "--max-tokens", str(CAP), "--max-body-bytes", str(BODY_LIMIT),
                 "--threads", "2", "--monitor-log", str(logs / "requests.jsonl"))
    srv.monitor_log = logs / "requests.jsonl"
    yield srv
    srv.stop()
    log = srv.log_tail(200_000)
    assert "Traceback" not in log and "are not served" not in log, log[-4000:]


@pytest.fixture(scope="module")
def openai_client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def azure_client(server):
    return ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential("unused"))


def score(server, body: dict) -> dict:
    r = server.chat(body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------- no server

def test_routes_and_the_request_fields_clients_send():
    assert openai_routes.route_of("/score") == openai_routes.route_of("/v1/chat/completions") == openai_routes.CHAT
    assert openai_routes.route_of("/chat/completions") == openai_routes.route_of("/") == openai_routes.CHAT
    assert openai_routes.route_of("/v1/models") == openai_routes.route_of("/models/") == openai_routes.MODELS
    assert openai_routes.route_of("/info") == openai_routes.INFO
    # max_completion_tokens: OpenAI's newer name of max_tokens, which its client sends when the caller uses it
    raw = json.dumps({"messages": user("a"), "max_completion_tokens": 5}).encode()
    assert protocol.parse_chat_request(raw, max_tokens_cap=8, max_body_bytes=1000).max_tokens == 5
    for body, status, param in (({"max_completion_tokens": 9}, 422, "max_completion_tokens"),
                                ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
                                ({"max_tokens": 4, "max_completion_tokens": 5}, 400, "max_completion_tokens")):
        with pytest.raises(protocol.RequestError) as info:
            protocol.parse_chat_request(json.dumps({"messages": user("a"), **body}).encode(), max_tokens_cap=8,
                                        max_body_bytes=1000)
        assert (info.value.status, info.value.param) == (status, param)
    # the local server's gunicorn gets the hook that adds the routes; an Azure deployment's environment does not
    env = server_environment(ServeSettings(), threads=2, health_port=None, base={})
    assert "--config python:phi3local.serve.gunicorn_hooks" in env["GUNICORN_CMD_ARGS"]


def test_add_routes_gives_the_paths_to_the_score_endpoint():
    from flask import Blueprint, Flask

    app, calls = Flask("t"), []
    main = Blueprint("main", "t")
    main.after_request(lambda r: (calls.append("after"), r)[1])  # a blueprint hook, as azmlinfsrv's

    @main.route("/score", methods=["GET", "POST", "OPTIONS"], provide_automatic_options=False)
    def handle_score():
        from flask import request

        return {"path": request.path, "method": request.method}

    app.register_blueprint(main)
    assert openai_routes.add_routes(app) == list(openai_routes.ROUTES)
    client = app.test_client()
    for path in openai_routes.ROUTES:
        for method in ("GET", "POST"):
            assert client.open(path, method=method).get_json() == {"path": path, "method": method}
    assert calls.count("after") == 2 * len(openai_routes.ROUTES)
    with pytest.raises(LookupError, match="no /score route"):
        openai_routes.add_routes(Flask("empty"))


# ---------------------------------------------------------------------------------- the openai client

def test_openai_answers_as_score_does(server, openai_client):
    for story in STORIES[:2]:
        expected = score(server, {"messages": user(story), "max_tokens": 24})
        answer = openai_client.chat.completions.create(model=MODEL, messages=user(story), max_tokens=24)
        assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
        assert FORMAT.match(answer.choices[0].message.content), answer.choices[0].message.content
        assert answer.choices[0].finish_reason == expected["choices"][0]["finish_reason"] == "stop"
        assert answer.model == MODEL and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
        assert answer.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == (
            expected["usage"])


def test_openai_stream_deltas_equal_the_answer(server, openai_client):
    story = STORIES[2]
    expected = score(server, {"messages": user(story), "max_tokens": 24})["choices"][0]["message"]["content"]
    chunks = list(openai_client.chat.completions.create(model=MODEL, messages=user(story), max_tokens=24,
                                                        stream=True, stream_options={"include_usage": True},
                                                        extra_headers={"x-request-id": "openai-stream-1"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and FORMAT.match(text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # the same request handling as /score: one monitoring record under the caller's request id
    record = monitor_records(server, "openai-stream-1", 1)["openai-stream-1"]
    assert record["status"] == 200 and record["stream"] is True and record["finish_reason"] == "stop"


def test_openai_lists_the_served_model_at_either_base_url(server, openai_client):
    assert [m.id for m in openai_client.models.list()] == [MODEL]
    bare = OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)  # no /v1: /chat/completions
    assert [m.owned_by for m in bare.models.list()] == ["phi3local"]
    answer = bare.chat.completions.create(model=MODEL, messages=user(STORIES[0]), max_tokens=24)
    assert FORMAT.match(answer.choices[0].message.content)


def test_openai_raises_the_servers_4xx(server, openai_client):
    cases = [  # the client's exception class for each status, with the server's error fields
        ({"max_tokens": CAP + 1}, UnprocessableEntityError, 422, "max_tokens"),
        ({"max_completion_tokens": CAP + 1}, UnprocessableEntityError, 422, "max_completion_tokens"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, BadRequestError, 400, "messages[0].role"),
        ({"messages": []}, BadRequestError, 400, "messages"),
        ({"temperature": 5}, BadRequestError, 400, "temperature"),
        ({"messages": user("x" * BODY_LIMIT)}, APIStatusError, 413, None),
    ]
    for stream in (False, True):
        for fields, error_class, status, param in cases:
            request = {"messages": user(STORIES[0]), **fields}
            expected = server.chat(request)  # the same body on /score
            assert expected.status_code == status, expected.text
            with pytest.raises(error_class) as info:
                openai_client.chat.completions.create(model=MODEL, stream=stream, **request)
            err = info.value
            assert err.status_code == status and err.body == expected.json()["error"]
            assert err.body["param"] == param and err.body["message"] in err.message


# ---------------------------------------------------------------------------------- azure-ai-inference

def test_azure_ai_inference_answers_streams_and_refuses(server, azure_client):
    story = STORIES[3]
    expected = score(server, {"messages": [{"role": "system", "content": "Answer in the format."}, *user(story)],
                              "max_tokens": 24})["choices"][0]["message"]["content"]
    messages = [SystemMessage("Answer in the format."), UserMessage(story)]
    answer = azure_client.complete(messages=messages, max_tokens=24)
    assert answer.choices[0].message.content == expected and answer.model == MODEL
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens > 0
    streamed = "".join(u.choices[0].delta.content or "" for u in azure_client.complete(
        messages=messages, max_tokens=24, stream=True) if u.choices)
    assert streamed == expected
    info = azure_client.get_model_info()
    assert (info.model_name, info.model_type, info.model_provider_name) == (MODEL, "chat-completion", "phi3local")
    for stream in (False, True):
        with pytest.raises(HttpResponseError) as refused:
            azure_client.complete(messages=messages, max_tokens=CAP + 1, stream=stream)
        assert refused.value.status_code == 422 and refused.value.error.code == "max_tokens_over_cap"
        assert f"over this server's cap of {CAP}" in refused.value.message
    with pytest.raises(HttpResponseError) as refused:
        azure_client.complete(messages=[{"role": "robot", "content": "hi"}])
    assert refused.value.status_code == 400 and "messages[0].role" in refused.value.message


# ---------------------------------------------------------------------------------- the same handling as /score

def test_every_chat_path_answers_a_bad_request_as_score_does(server):
    bodies = [b"{not json", b"[]", json.dumps({"messages": user("a"), "n": 2}).encode(),
              json.dumps({"messages": user("a"), "stop": ["a"] * 5}).encode()]
    for body in bodies:
        answers = [requests.post(server.url + path, data=body, timeout=30)
                   for path in ("/score", "/v1/chat/completions", "/chat/completions")]
        assert len({(r.status_code, r.text) for r in answers}) == 1, [r.text for r in answers]
        assert answers[0].status_code == 400 and set(answers[0].json()["error"]) == {"message", "type", "param",
                                                                                     "code"}
    wrong = requests.get(server.url + "/v1/chat/completions", timeout=30)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert requests.post(server.url + "/v1/models", timeout=30).status_code == 405
    assert requests.get(server.url + "/", timeout=30).text == "Healthy"  # the server's own routes are unchanged
