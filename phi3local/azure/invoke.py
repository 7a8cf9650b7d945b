"""`phi3local azure invoke`: one test chat request to the endpoint, the answer, the latency, and any error in
plain words.

The request is a plain HTTPS POST of an OpenAI-style chat body to the endpoint's scoring URI with its key
(azure-core's pipeline, no retry, no logging policy: a failure is reported as it happened and the key never
reaches a log). What the statuses mean on a managed online endpoint (READ: Microsoft's docs):
  424: the container answered something other than 200; its status is in the header
       ms-azureml-model-error-statuscode and its body is passed through;
  408: the request took longer than the deployment's request_timeout_ms;
  429: more requests in flight than the endpoint admits (2 x max_concurrent_requests_per_instance x
       instance_count).
Managed endpoints are reported not to stream through this server (azureml-inference-server#53), so the
request asks for a whole answer (stream: false).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from phi3local.azure.workspace import azure_call
from phi3local.errors import Phi3LocalError

MODEL_STATUS_HEADER = "ms-azureml-model-error-statuscode"
STREAMING_NOTE = ("managed online endpoints are reported not to stream through this server "
                  "(azureml-inference-server#53): the test request asks for the whole answer")


class InvokeError(Phi3LocalError):
    """The endpoint answered with an error; the message says what it means and what to do."""

    def __init__(self, message: str, result: InvokeResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class InvokeResult:
    status: int
    latency_s: float
    answer: str | None = None
    usage: dict | None = None
    finish_reason: str | None = None
    model_status: int | None = None  # the container's own status behind a 424
    error: str | None = None  # the plain-words explanation of a failure
    body: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # the deployment's limits, when they could be read

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def chat_body(prompt: str, system: str | None = None, max_tokens: int | None = None) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body: dict[str, Any] = {"messages": messages, "stream": False}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def _container_error(body: str) -> tuple[str | None, str | None]:
    """(code, message) of an OpenAI-style error body from score.py, else (None, the body's start)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, body.strip()[:300] or None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error.get("code"), error.get("message")
    return None, body.strip()[:300] or None


def explain(status: int, headers: Any, body: str, endpoint: str, deployment: str | None,
            settings: dict[str, Any]) -> tuple[str, int | None]:
    """The plain-words meaning of a failed scoring call, and the container's own status behind a 424."""
    dep = deployment or "the deployment taking traffic"
    logs = f"az ml online-deployment get-logs --endpoint-name {endpoint} --name {deployment or '<deployment>'}"
    if status == 424:
        raw = headers.get(MODEL_STATUS_HEADER)
        try:
            real = int(raw) if raw is not None else None
        except ValueError:
            real = None
        code, message = _container_error(body)
        said = f"{real}" if real is not None else "an error (no ms-azureml-model-error-statuscode header)"
        text = f"the container (score.py) answered {said}; Azure passes that on as 424"
        if message:
            text += f": {message}"
        if code == "max_tokens_over_cap":
            text += " (ask for fewer tokens, or raise azure.max_tokens and push again)"
        elif real is not None and 400 <= real < 500:
            text += " (the request was refused by score.py: fix the request)"
        else:
            text += f" (score.py failed: read the container log: {logs})"
        return text, real
    if status == 408:
        limit = settings.get("request_timeout_ms")
        said = f"request_timeout_ms={limit}" if limit else "its request_timeout_ms"
        return (f"{dep} did not answer within {said}: Azure cut the request off (408). Ask for fewer tokens "
                "(--max-tokens), or raise the timeout: push again with a larger azure.timeout_factor or a smaller "
                "azure.max_tokens (the service allows at most 180000 ms)"), None
    if status == 429:
        per = settings.get("max_concurrent_requests_per_instance")
        count = settings.get("instance_count")
        if per and count:
            limit = f"max_concurrent_requests_per_instance {per} x {count} instance(s) (x2 queued = {2 * per * count})"
        else:
            limit = "max_concurrent_requests_per_instance x instance_count (x2 queued)"
        return (f"too many concurrent requests (429): the endpoint admits {limit} in flight. Wait and retry, or raise "
                "azure.max_concurrent_requests_per_instance or azure.instance_count and push again"), None
    if status in (401, 403):
        return (f"the endpoint refused the key ({status}): the endpoint's keys may have been regenerated, or its "
                "auth mode is not key"), None
    if status == 404:
        return ("no deployment answered (404): the endpoint has no deployment with traffic, or --deployment names "
                "one that does not exist (push sets the traffic)"), None
    if status in (502, 503):
        return (f"the deployment is not ready or its container is unhealthy ({status}): wait for provisioning, "
                f"then read the container log: {logs}"), None
    _code, message = _container_error(body)
    return f"the endpoint answered {status}" + (f": {message}" if message else ""), None


def deployment_settings(ml: Any, endpoint: str, deployment: str | None) -> dict[str, Any]:
    """The limits 408/429 are about, read from the deployment (best effort: {} when it cannot be read)."""
    try:
        if deployment is None:
            traffic = ml.online_endpoints.get(endpoint).traffic or {}
            deployment = max(traffic, key=traffic.get) if traffic else None
        if deployment is None:
            return {}
        d = ml.online_deployments.get(deployment, endpoint)
    except Exception:  # noqa: BLE001 - only used to make an error message more precise
        return {}
    rs = getattr(d, "request_settings", None)
    return {"deployment": deployment, "instance_count": getattr(d, "instance_count", None),
            "request_timeout_ms": getattr(rs, "request_timeout_ms", None),
            "max_concurrent_requests_per_instance": getattr(rs, "max_concurrent_requests_per_instance", None)}


def invoke(ml: Any, endpoint: str, body: dict[str, Any], *, deployment: str | None = None, timeout_s: float = 200.0,
           transport: Any = None) -> InvokeResult:
    """POST body to the endpoint's scoring URI with its primary key; a failure is explained, not raised.

    timeout_s: how long to wait here (above the service's 180 s maximum, so the service's 408 is what shows).
    transport: an azure-core HttpTransport (default: requests).
    """
    from azure.core import PipelineClient
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError
    from azure.core.rest import HttpRequest

    with azure_call(f"read endpoint {endpoint}"):
        uri = ml.online_endpoints.get(endpoint).scoring_uri
    with azure_call(f"read the keys of endpoint {endpoint}"):
        key = ml.online_endpoints.get_keys(endpoint).primary_key
    if not uri:
        raise InvokeError(f"endpoint {endpoint} has no scoring URI yet: is it still being created?")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": "application/json"}
    if deployment:
        headers["azureml-model-deployment"] = deployment  # bypass the traffic split
    request = HttpRequest("POST", uri, headers=headers, content=json.dumps(body).encode("utf-8"))
    # No policies: no retries (the first answer is the one to explain) and no logging (the key stays out of logs).
    client = PipelineClient(base_url=uri, transport=transport, policies=[])
    t0 = time.perf_counter()
    try:
        response = client.send_request(request, connection_timeout=30, read_timeout=timeout_s)
        response.read()
    except (ServiceRequestError, ServiceResponseError) as e:
        raise InvokeError(f"could not reach {uri}: {str(e).splitlines()[0][:300]}") from None
    latency = time.perf_counter() - t0
    text = response.content.decode("utf-8", "replace")
    result = InvokeResult(response.status_code, latency, body=text)
    if response.status_code == 200:
        try:
            data = json.loads(text)
            choice = data["choices"][0]
            result.answer = choice["message"]["content"]
            result.finish_reason = choice.get("finish_reason")
            result.usage = data.get("usage")
        except (ValueError, KeyError, IndexError, TypeError):
            result.error = f"the endpoint answered 200 but not with a chat completion: {text[:300]!r}"
        return result
    if response.status_code in (408, 429):
        result.settings = deployment_settings(ml, endpoint, deployment)
    result.error, result.model_status = explain(response.status_code, response.headers, text, endpoint, deployment,
                                                result.settings)
    return result
