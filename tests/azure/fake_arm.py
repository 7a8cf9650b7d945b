"""A fake Azure Resource Manager behind azure-core's transport seam, for MLClient tests with no Azure.

`MLClient(FakeCredential(), sub, rg, ws, transport=FakeArm())` sends every ARM call to `FakeArm.send`,
which records it and answers from a few canned routes (the ones FACTS-AZURE.md lists as enough for model
registration, endpoint, deployment, keys and jobs to complete). Anything else gets a 404 naming the
route, so a test sees at once when the SDK asks for something new. `fail(...)` makes one route answer
with an ARM error (403, 409 quota, 500), to test how the package reports failures.

The SDK's code runs unchanged; only the wire is fake. `sleep` is a no-op so long-running-operation polling
and retries take no time.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline._tools import is_rest
from azure.core.pipeline.transport import HttpTransport, RequestsTransportResponse
from azure.core.rest._requests_basic import RestRequestsTransportResponse
from requests.structures import CaseInsensitiveDict

SUB = "00000000-0000-0000-0000-000000000000"
RG = "rg-test"
WS = "ws-test"
ACCOUNT = "fakeaccount"
CONTAINER = "azureml-blobstore-fake"
LOCATION = "eastus2"
MANAGEMENT = "https://management.azure.com"


class FakeCredential:
    """A TokenCredential that hands out a dummy token and remembers the scopes asked for."""

    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.extend(scopes)
        return AccessToken("fake-token", int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        self.scopes.extend(scopes)
        return AccessTokenInfo("fake-token", int(time.time()) + 3600)

    def close(self) -> None:
        pass


@dataclass
class Sent:
    """One request as it went over the (fake) wire."""

    method: str
    url: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any  # parsed JSON, raw bytes, or None

    def __repr__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


class FakeArm(HttpTransport):
    """Records every request; answers PUT by echoing the body (and GET of it afterwards), plus canned routes."""

    def __init__(self, *, location: str = LOCATION, account: str = ACCOUNT, container: str = CONTAINER,
                 scoring_uri: str | None = None, keys: tuple[str, str] = ("primary-key", "secondary-key"),
                 account_key: str = "ZmFrZWtleQ==") -> None:
        self.location = location
        self.account_key = account_key
        self.account = account
        self.container = container
        self.scoring_uri = scoring_uri
        self.keys = keys
        self.requests: list[Sent] = []
        self.slept: list[float] = []
        self.stored: dict[str, Any] = {}
        self.canned: dict[tuple[str, str], tuple[int, Any]] = {}
        self._failures: list[_Failure] = []
        self._failed_operations: list[tuple[re.Pattern, str, str]] = []

    # --- test controls -----------------------------------------------------------------------------
    def fail(self, method: str, path_regex: str, status: int, code: str = "Error", message: str = "failed",
             headers: dict[str, str] | None = None) -> None:
        """Answer requests matching method and path_regex (re.search on the path) with an ARM error body."""
        self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, code, message, headers or {}))

    def fail_operation(self, path_regex: str, code: str, message: str) -> None:
        """A long-running PUT matching path_regex is accepted, then its operation ends Failed (e.g. a deployment
        whose container never became ready)."""
        self._failed_operations.append((re.compile(path_regex), code, message))

    def answer(self, method: str, path_suffix: str, status: int, body: Any) -> None:
        """A canned answer for requests whose path ends with path_suffix."""
        self.canned[(method.upper(), path_suffix)] = (status, body)

    def sent(self, method: str | None = None, contains: str = "") -> list[Sent]:
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def put_body(self, contains: str) -> Any:
        """The body of the one PUT whose path contains `contains` (fails the test if not exactly one)."""
        puts = self.sent("PUT", contains)
        assert len(puts) == 1, f"expected one PUT {contains}, got {puts} (all: {self.requests})"
        return puts[0].body

    # --- HttpTransport -------------------------------------------------------------------------------
    def __enter__(self) -> FakeArm:
        return self

    def __exit__(self, *args: Any) -> None:
        pass

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def sleep(self, duration: float) -> None:
        self.slept.append(duration)

    def send(self, request: Any, **kwargs: Any) -> Any:
        parts = urlsplit(request.url)
        raw = _request_body(request)
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = raw
        sent = Sent(request.method.upper(), request.url, parts.path, parse_qs(parts.query), dict(request.headers), body)
        self.requests.append(sent)
        status, payload, headers = self._route(sent, parts)
        return _response(request, status, payload, headers)

    # --- routes ------------------------------------------------------------------------------------
    def _route(self, r: Sent, parts: Any) -> tuple[int, Any, dict[str, str]]:
        for f in self._failures:
            if f.method == r.method and f.pattern.search(r.path):
                return f.status, {"error": {"code": f.code, "message": f.message}}, f.headers
        for (method, suffix), (status, body) in self.canned.items():
            if method == r.method and r.path.endswith(suffix):
                return status, body, {}
        path = r.path.rstrip("/")
        low = path.lower()
        host = f"{parts.scheme}://{parts.netloc}"
        if r.method == "GET" and "/operationresults/" in low or low.endswith("/operationstatus"):
            resource = re.sub(r"/operationResults/.*$", "", path, flags=re.IGNORECASE)
            for pattern, code, message in self._failed_operations:
                if pattern.search(resource):
                    return 200, {"status": "Failed", "error": {"code": code, "message": message}}, {}
            return 200, {"status": "Succeeded"}, {}
        if r.method == "PUT":
            return self._put(r, path, host)
        if r.method == "GET" and re.search(r"/workspaces/[^/]+$", path):
            return 200, self._workspace(path), {}
        if r.method == "GET" and re.search(r"/datastores/[^/]+$", path):
            return 200, self._datastore(path), {}
        if r.method == "POST" and low.endswith("/listsecrets"):
            return 200, {"secretsType": "AccountKey", "key": self.account_key}, {}
        if r.method == "POST" and low.endswith("/startpendingupload"):
            blob = f"https://{self.account}.blob.core.windows.net/{self.container}/LocalUpload/fake"
            return 200, {"blobReferenceForConsumption": {
                "blobUri": blob, "credential": {"credentialType": "SAS", "sasUri": blob + "?sig=fake"}},
                "pendingUploadId": "fake", "pendingUploadType": "TemporaryBlobReference"}, {}
        if r.method == "POST" and low.endswith("/listkeys"):
            return 200, {"primaryKey": self.keys[0], "secondaryKey": self.keys[1]}, {}
        if r.method == "GET" and path in self.stored:
            return 200, self.stored[path], {}
        if r.method == "GET" and (low.endswith("/versions") or low.endswith("/deployments")):
            return 200, {"value": []}, {}
        return 404, {"error": {"code": "NotFound", "message": f"fake ARM has no route for {r.method} {path}"}}, {}

    def _workspace(self, path: str) -> dict:
        return {"id": path, "name": path.rsplit("/", 1)[-1], "location": self.location,
                "type": "Microsoft.MachineLearningServices/workspaces", "kind": "Default",
                "properties": {"discoveryUrl": f"https://{self.location}.api.azureml.ms/discovery",
                               "mlFlowTrackingUri": f"azureml://{self.location}.api.azureml.ms/mlflow/v1.0{path}"}}

    def _datastore(self, path: str) -> dict:
        return {"id": path, "name": path.rsplit("/", 1)[-1], "type": "Microsoft.MachineLearningServices/workspaces/datastores",
                "properties": {"datastoreType": "AzureBlob", "accountName": self.account,
                               "containerName": self.container, "endpoint": "core.windows.net", "protocol": "https",
                               "isDefault": True, "credentials": {"credentialsType": "AccountKey"}}}

    def _put(self, r: Sent, path: str, host: str) -> tuple[int, Any, dict[str, str]]:
        echo = dict(r.body) if isinstance(r.body, dict) else {}
        echo["id"] = path
        echo["name"] = path.rsplit("/", 1)[-1]
        props = echo.setdefault("properties", {})
        props.setdefault("provisioningState", "Succeeded")
        low = path.lower()
        headers: dict[str, str] = {}
        status = 200
        if "/models/" in low:
            # The model entity reads flavors back; the service fills it in.
            props.setdefault("flavors", {})
        if re.search(r"/onlineendpoints/[^/]+$", low):
            props.setdefault("scoringUri", self.scoring_uri or f"https://{echo['name']}.{self.location}.inference.ml.azure.com/score")
            props.setdefault("swaggerUri", props["scoringUri"].rsplit("/", 1)[0] + "/swagger.json")
            status = 201
        if "/deployments/" in low:
            props.setdefault("scaleSettings", {"scaleType": "Default"})
            status = 201
        if "/jobs/" in low:
            props.setdefault("status", "Queued")
            props.setdefault("services", {"Studio": {"endpoint": f"https://ml.azure.com/runs/{echo['name']}"}})
        if status == 201:
            headers["Azure-AsyncOperation"] = f"{host}{path}/operationResults/op1?api-version=2023-01-01"
        self.stored[path] = echo
        return status, echo, headers


def _request_body(request: Any) -> bytes:
    # Legacy pipeline requests keep the body in .data, azure.core.rest requests in .content.
    data = request.content if is_rest(request) else request.data
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    return b""


def _response(request: Any, status: int, payload: Any, headers: dict[str, str]) -> Any:
    # Build a requests.Response and let azure-core wrap it, exactly as its own RequestsTransport does.
    resp = requests.Response()
    resp.status_code = status
    resp.reason = {200: "OK", 201: "Created", 202: "Accepted", 403: "Forbidden", 404: "Not Found",
                   408: "Request Timeout", 409: "Conflict", 424: "Failed Dependency", 429: "Too Many Requests",
                   500: "Internal Server Error"}.get(status, "Status")
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    resp._content = body
    resp._content_consumed = True
    resp.headers = CaseInsensitiveDict({"Content-Type": "application/json; charset=utf-8",
                                        "Content-Length": str(len(body)), "x-ms-request-id": "fake-request", **headers})
    resp.url = request.url
    resp.encoding = "utf-8"
    if is_rest(request):
        rest = RestRequestsTransportResponse(request=request, internal_response=resp)
        rest.read()
        return rest
    return RequestsTransportResponse(request, resp)


def add_registry_model(arm: FakeArm, name: str, version: str, registry: str = "azureml") -> None:
    """Routes that let `MLClient(registry_name=...).models.get(name, label="latest")` find `version`."""
    arm.answer("GET", f"/registries/{registry}/discovery", 200, {
        "primaryRegionResourceProviderUri": f"https://{arm.location}.api.azureml.ms/", "subscriptionId": SUB,
        "resourceGroup": "registry-rg", "registryName": registry, "primaryRegion": arm.location,
        "regions": [arm.location]})
    body = {"id": f"azureml://registries/{registry}/models/{name}/versions/{version}", "name": version,
            "properties": {"flavors": {}, "modelType": "mlflow_model"}}
    arm.answer("GET", f"/registries/{registry}/models/{name}/versions", 200, {"value": [body]})
    arm.answer("GET", f"/registries/{registry}/models/{name}/versions/{version}", 200, body)


def make_export(folder, target: str = "cuda", weights_bytes: int = 300_000):
    """A folder shaped like `phi3local export`'s output (genai_config.json naming the execution provider,
    weights, tokenizer files, export_report.json): enough for the spec and the upload, not for inference."""
    import os
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    providers = [{"cuda": {}}] if target == "cuda" else []
    (folder / "genai_config.json").write_text(json.dumps({"model": {
        "type": "phi3", "context_length": 4096, "eos_token_id": [32000, 32007],
        "decoder": {"filename": "model.onnx", "session_options": {"provider_options": providers}}}}))
    (folder / "model.onnx").write_bytes(b"onnx-graph" * 100)
    (folder / "model.onnx.data").write_bytes(os.urandom(weights_bytes))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "export_report.json").write_text(json.dumps({"precision": "int4", "target": target}))
    return folder
