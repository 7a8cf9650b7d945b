"""Azure ML scoring script: the file a deployment ships, and what `phi3local serve` runs locally.

azmlinfsrv (azureml-inference-server-http) calls `init()` once in each worker process, then `run()` for
each POST /score. Everything but the HTTP glue lives in phi3local.serve (protocol, service, engine), and
nothing on this path imports torch or transformers: a deployment's code folder holds only the files
`phi3local.serve.bundle.CODE_FILES` lists.

Environment: AZUREML_MODEL_DIR (the export folder, or a managed endpoint's model root holding it),
PHI3LOCAL_MAX_TOKENS, PHI3LOCAL_MAX_BODY_BYTES, PHI3LOCAL_MODEL_NAME (phi3local.serve.settings).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# A deployment's code folder is <code>/phi3local/serve/score.py: make <code> importable whatever
# AML_APP_ROOT and the working directory are.
_CODE_ROOT = str(Path(__file__).resolve().parents[2])
if _CODE_ROOT not in sys.path:
    sys.path.insert(0, _CODE_ROOT)

from azureml_inference_server_http.api.aml_request import rawhttp  # noqa: E402
from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from phi3local.serve import protocol  # noqa: E402
from phi3local.serve.service import ChatService  # noqa: E402

logger = logging.getLogger("phi3local.serve")
READ_CHUNK = 64 * 1024

service: ChatService | None = None


def init() -> None:
    global service
    service = ChatService.from_environment(os.environ)


@rawhttp
def run(request):
    return respond(request, service)


def respond(request, chat_service: ChatService) -> AMLResponse:
    """Answer one flask request; every refusal is a 4xx with an OpenAI-style error body."""
    if request.method == "OPTIONS":  # a CORS preflight: the server's flask-cors (AML_CORS_ORIGINS) adds the headers
        return AMLResponse("", 200)
    if request.method != "POST":
        return _error(protocol.RequestError(405, f"{request.method} /score is not supported: POST a chat request",
                                            code="method_not_allowed"))
    try:
        body = _read_body(request, chat_service.settings.max_body_bytes)
        chat = chat_service.parse(body)
        if chat.stream:
            # Local azmlinfsrv sends this generator chunked as it yields; READ: managed endpoints
            # are reported to buffer or break streams (azureml-inference-server#53).
            return AMLResponse(chat_service.stream(chat), 200,
                               {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        return AMLResponse(chat_service.complete(chat), 200, json_str=True)
    except protocol.RequestError as e:
        return _error(e)
    except Exception:
        logger.exception("scoring failed")
        return AMLResponse(protocol.error_body("the server failed on this request; see its log", code="server_error",
                                               error_type="server_error"), 500, json_str=True)


def _error(error: protocol.RequestError) -> AMLResponse:
    return AMLResponse(error.body(), error.status, json_str=True)


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
