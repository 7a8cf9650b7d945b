"""Azure ML scoring script: the file a deployment ships, and what `phi3local serve` runs locally.

azmlinfsrv (azureml-inference-server-http) calls `init()` once in each worker process, then `run()` for
each request to /score and, under `phi3local serve`, to OpenAI's paths (/v1/chat/completions, /v1/models,
...: phi3local.serve.openai_routes gives them the same scoring view); respond() answers by the path.
Everything but the HTTP glue lives in phi3local.serve (protocol, service, engine), and
nothing on this path imports torch or transformers: a deployment's code folder is the phi3local.serve
package itself (phi3local.serve.bundle).

Environment: AZUREML_MODEL_DIR (the export folder, or a managed endpoint's model root holding it),
PHI3LOCAL_MAX_TOKENS, PHI3LOCAL_MAX_BODY_BYTES, PHI3LOCAL_MODEL_NAME, and the opt-in monitoring
PHI3LOCAL_MONITOR_LOG / PHI3LOCAL_COLLECT (phi3local.serve.settings, phi3local.serve.monitoring): one
redacted record per chat request, under the caller's x-request-id (echoed in the response) or a new one; the
opt-in guardrail's CONTENT_SAFETY_ENDPOINT / CONTENT_SAFETY_KEY and PHI3LOCAL_CONTENT_SAFETY_THRESHOLD /
PHI3LOCAL_CONTENT_SAFETY_WINDOW (phi3local.serve.guard: prompts, answers and streamed answers screened).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# A deployment's code folder is <code>/phi3local/serve/score.py: make <code> importable whatever
# AML_APP_ROOT and the working directory are.
_CODE_ROOT = str(Path(__file__).resolve().parents[2])
if _CODE_ROOT not in sys.path:
    sys.path.insert(0, _CODE_ROOT)

from azureml_inference_server_http.api.aml_request import rawhttp  # noqa: E402
from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from phi3local.serve import openai_routes, protocol  # noqa: E402
from phi3local.serve.monitoring import RequestMonitor, correlation_id  # noqa: E402
from phi3local.serve.service import ChatService, StreamOutcome  # noqa: E402

logger = logging.getLogger("phi3local.serve")
READ_CHUNK = 64 * 1024

service: ChatService | None = None
monitor: RequestMonitor | None = None


def init() -> None:
    global service, monitor
    service = ChatService.from_environment(os.environ)
    monitor = RequestMonitor.from_settings(service.settings)


@rawhttp
def run(request):
    return respond(request, service, monitor)


def respond(request, chat_service: ChatService, monitor: RequestMonitor | None = None) -> AMLResponse:
    """Answer one flask request; every refusal is a 4xx with an OpenAI-style error body. With a monitor,
    every chat request (answered, refused or failed) leaves one record.

    The path says what is asked (openai_routes.route_of): a chat request on /score and OpenAI's chat paths,
    the model list on /v1/models, the model information on /info."""
    if request.method == "OPTIONS":  # a CORS preflight: the server's flask-cors (AML_CORS_ORIGINS) adds the headers
        return AMLResponse("", 200)
    route = openai_routes.route_of(request.path)
    if route != openai_routes.CHAT:
        return _describe(request, route, chat_service)
    started = time.perf_counter()
    correlation = correlation_id(request.headers)
    headers = {"x-request-id": correlation}
    chat = None

    def record(**fields) -> None:
        if monitor is not None:
            monitor.record(correlation=correlation, started=started, messages=chat.messages if chat else (), **fields)

    try:
        if request.method != "POST":
            raise protocol.RequestError(405, f"{request.method} {request.path} is not supported: POST a chat request",
                                        code="method_not_allowed")
        body = _read_body(request, chat_service.settings.max_body_bytes)
        chat = chat_service.parse(body)
        if chat.stream:
            def streamed(outcome: StreamOutcome) -> None:
                record(status=200, stream=True, answer=outcome.text, prompt_tokens=outcome.prompt_tokens,
                       completion_tokens=outcome.completion_tokens, finish_reason=outcome.finish_reason,
                       error=outcome.error)

            # Local azmlinfsrv sends this generator chunked as it yields; READ: managed endpoints
            # are reported to buffer or break streams (azureml-inference-server#53).
            return AMLResponse(chat_service.stream(chat, on_done=streamed), 200,
                               {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                                **headers})
        answer = chat_service.complete(chat)
        choice, usage = answer["choices"][0], answer["usage"]
        record(status=200, answer=choice["message"]["content"], prompt_tokens=usage["prompt_tokens"],
               completion_tokens=usage["completion_tokens"], finish_reason=choice["finish_reason"])
        return AMLResponse(answer, 200, headers, json_str=True)
    except protocol.RequestError as e:
        record(status=e.status, error=e.code)
        return _error(e, headers)
    except Exception:
        logger.exception("scoring failed")
        record(status=500, error="server_error")
        return AMLResponse(protocol.error_body("the server failed on this request; see its log", code="server_error",
                                               error_type="server_error"), 500, headers, json_str=True)


def _describe(request, route: str, chat_service: ChatService) -> AMLResponse:
    """GET of the model list (OpenAI's /v1/models) or of the model information (azure-ai-inference's /info)."""
    headers = {"x-request-id": correlation_id(request.headers)}
    if request.method != "GET":
        return _error(protocol.RequestError(405, f"{request.method} {request.path} is not supported: GET it",
                                            code="method_not_allowed"), headers)
    name = chat_service.model_name
    body = protocol.models_body(name, chat_service.created) if route == openai_routes.MODELS else protocol.info_body(name)
    return AMLResponse(body, 200, headers, json_str=True)


def _error(error: protocol.RequestError, headers: dict[str, str] | None = None) -> AMLResponse:
    return AMLResponse(error.body(), error.status, headers or {}, json_str=True)


def _read_body(request, limit: int) -> bytes:
    """The body, read no further than one byte past the limit (a chunked body has no Content-Length)."""
    if request.content_length is not None and request.content_length > limit:
        raise protocol.body_too_large(limit)
    chunks, size = [], 0
    while size <= limit:
        chunk = request.stream.read(min(READ_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise protocol.body_too_large(limit)
    return b"".join(chunks)
