"""The chat-completions wire format: parse and validate a request, build responses, chunks and errors.

Pure Python (json only), so every rule is unit-testable without a server or a model. The shape follows
OpenAI's chat completions API: a client written for it works here.

Status codes:
- 400: the request breaks the API's own rules (not JSON, a missing field, a wrong type, a value out of
  its range), whatever model is served.
- 413: the body is over the served size limit.
- 422: a valid request this server cannot serve: max_tokens over the served cap, a prompt over the
  model's context, a conversation the model's chat template refuses.
Every error body is {"error": {"message", "type", "param", "code"}}; `param` names the field.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from phi3local.serve.errors import ServeError

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
TEMPERATURE_RANGE = (0.0, 2.0)
MAX_SEED = 2**31 - 1  # onnxruntime-genai takes a 32-bit seed
SSE_DONE = "data: [DONE]\n\n"
OWNER = "phi3local"  # `owned_by` of the model list, `model_provider_name` of /info


class RequestError(ServeError):
    """A request this server refuses; carries the HTTP status and the OpenAI-style error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = "invalid_value",
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code, error_type=self.error_type)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               error_type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]  # {"role", "content"} only, in order
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    seed: int | None


def body_too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")


def context_exceeded(prompt_tokens: int, context_length: int) -> RequestError:
    return RequestError(422, f"the prompt is {prompt_tokens} tokens, the model's context is {context_length} "
                             "(a prompt must leave room for at least one new token): shorten the messages",
                        param="messages", code="context_length_exceeded")


def template_refused(reason: str) -> RequestError:
    return RequestError(422, f"the model's chat template refused these messages: {reason}", param="messages",
                        code="template_error")


def parse_chat_request(body: bytes, *, max_tokens_cap: int, max_body_bytes: int) -> ChatRequest:
    """Validate a request body and return the request; raises RequestError naming the field and the rule."""
    if len(body) > max_body_bytes:
        raise body_too_large(max_body_bytes)
    data = _decode_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_json_type(data)}", code="invalid_body")
    stream = _optional_bool(data, "stream", False)
    _check_n(data)
    return ChatRequest(
        messages=_messages(data),
        max_tokens=_max_tokens(data, max_tokens_cap),
        temperature=_number(data, "temperature", 0.0, *TEMPERATURE_RANGE, low_inclusive=True),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_inclusive=False),
        stop=_stop(data),
        stream=stream,
        include_usage=_include_usage(data, stream),
        seed=_seed(data),
    )


def _decode_json(body: bytes):
    def no_constants(name):  # NaN / Infinity are not JSON
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 text ({e.reason} at byte {e.start})",
                           code="invalid_json") from None
    except RecursionError:
        raise RequestError(400, "the body is not usable JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise RequestError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _messages(data: dict) -> tuple[dict, ...]:
    if "messages" not in data or data["messages"] is None:
        raise RequestError(400, "`messages` is required: a list of {role, content} objects", param="messages",
                           code="missing_field")
    messages = data["messages"]
    if not isinstance(messages, list):
        raise RequestError(400, f"`messages` must be a list of {{role, content}} objects, got {_json_type(messages)}",
                           param="messages", code="invalid_type")
    if not messages:
        raise RequestError(400, "`messages` must hold at least one message", param="messages", code="invalid_value")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"`{where}` must be an object with role and content, got {_json_type(message)}",
                               param=where, code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            shown = json.dumps(role) if isinstance(role, str) else _json_type(role)
            raise RequestError(400, f"`{where}.role` must be one of {', '.join(ROLES)}, got {shown}",
                               param=f"{where}.role", code="invalid_value" if isinstance(role, str) else "invalid_type")
        if "content" not in message:
            raise RequestError(400, f"`{where}.content` is required", param=f"{where}.content", code="missing_field")
        content = message["content"]
        if not isinstance(content, str):
            # OpenAI also allows a list of content parts; a text-only model takes plain strings.
            raise RequestError(400, f"`{where}.content` must be a string, got {_json_type(content)}",
                               param=f"{where}.content", code="invalid_type")
        out.append({"role": role, "content": content})
    return tuple(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _max_tokens(data: dict, cap: int) -> int:
    # OpenAI's newer name for the same limit (its client sends whichever the caller used): both are honoured,
    # and a request giving both must agree with itself.
    name = "max_tokens"
    value = data.get("max_tokens")
    newer = data.get("max_completion_tokens")
    if newer is not None:
        if value is not None and value != newer:
            raise RequestError(400, f"`max_tokens` ({_shown(value)}) and `max_completion_tokens` ({_shown(newer)}) "
                                    "differ: send one of them", param="max_completion_tokens", code="invalid_value")
        name, value = "max_completion_tokens", newer
    if value is None:
        return cap
    if not _is_number(value) or isinstance(value, float):
        raise RequestError(400, f"`{name}` must be a whole number, got {_shown(value)}", param=name,
                           code="invalid_type")
    if value < 1:
        raise RequestError(400, f"`{name}` must be >= 1, got {value}", param=name, code="out_of_range")
    if value > cap:
        raise RequestError(422, f"`{name}` is {value}, over this server's cap of {cap}", param=name,
                           code="max_tokens_over_cap")
    return int(value)


def _number(data: dict, name: str, default: float, low: float, high: float, *, low_inclusive: bool) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise RequestError(400, f"`{name}` must be a number, got {_shown(value)}", param=name, code="invalid_type")
    value = float(value)
    in_range = (value >= low if low_inclusive else value > low) and value <= high and math.isfinite(value)
    if not in_range:
        bound = "<=" if low_inclusive else "<"
        raise RequestError(400, f"`{name}` must be in {low:g} {bound} {name} <= {high:g}, got {value:g}", param=name,
                           code="out_of_range")
    return value


def _stop(data: dict) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(400, f"`stop` must be a string or a list of strings, got {_shown(value)}", param="stop",
                           code="invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(400, f"`stop` holds {len(stops)} sequences, at most {MAX_STOP_SEQUENCES} are allowed",
                           param="stop", code="out_of_range")
    if any(s == "" for s in stops):
        raise RequestError(400, "`stop` sequences must not be empty strings", param="stop", code="invalid_value")
    return tuple(dict.fromkeys(stops))


def _optional_bool(data: Mapping, name: str, default: bool, *, param: str | None = None) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"`{param or name}` must be true or false, got {_shown(value)}", param=param or name,
                           code="invalid_type")
    return value


def _include_usage(data: dict, stream: bool) -> bool:
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError(400, f"`stream_options` must be an object, got {_json_type(options)}",
                           param="stream_options", code="invalid_type")
    if not stream:
        raise RequestError(400, "`stream_options` is only allowed with \"stream\": true", param="stream_options",
                           code="invalid_value")
    return _optional_bool(options, "include_usage", False, param="stream_options.include_usage")


def _seed(data: dict) -> int | None:
    value = data.get("seed")
    if value is None:
        return None
    if not _is_number(value) or isinstance(value, float):
        raise RequestError(400, f"`seed` must be a whole number, got {_shown(value)}", param="seed",
                           code="invalid_type")
    if not 0 <= value <= MAX_SEED:
        raise RequestError(400, f"`seed` must be in 0 <= seed <= {MAX_SEED}, got {value}", param="seed",
                           code="out_of_range")
    return int(value)


def _check_n(data: dict) -> None:
    # One choice per request: refuse n > 1 rather than silently answering once.
    value = data.get("n")
    if value is not None and (not _is_number(value) or value != 1):
        raise RequestError(400, f"`n` must be 1 (one choice per request), got {_shown(value)}", param="n",
                           code="invalid_value")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- responses ----------------------------------------------------------------------------------------

def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(*, completion_id: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, reasoning: str | None = None) -> dict:
    """The chat.completion body; with a reasoning model's trace (`reasoning`, not None), the message also has
    `reasoning_content`, the field reasoning APIs (vLLM, DeepSeek's) answer with, and `content` is the answer."""
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(*, completion_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               usage_: dict | None = None) -> dict:
    """One streamed chunk; with usage_ and delta None: the usage-only chunk (no choices) OpenAI sends last."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if delta is None:
        body["choices"] = []
        body["usage"] = usage_
    else:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return body


def models_body(model: str, created: int) -> dict:
    """GET /v1/models: the one served model, as OpenAI's model list."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": OWNER}]}


def info_body(model: str) -> dict:
    """GET /info: the model information azure-ai-inference's get_model_info() reads."""
    return {"model_name": model, "model_type": "chat-completion", "model_provider_name": OWNER}


def sse_event(payload: dict) -> str:
    """A server-sent event line; json.dumps escapes newlines, so one `data:` line always suffices."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
