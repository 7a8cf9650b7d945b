"""`azure push` and `azure invoke`: the requests the SDK sends for each step (through a recording transport,
tests/azure/fake_arm.py), the real upload into Azurite, one-line errors, --dry-run sending nothing, and
invoke's 424/408/429 translated from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_arm import ACCOUNT, CONTAINER, RG, SUB, WS, FakeArm, FakeCredential, make_export

from phi3local.azure import commands
from phi3local.azure import workspace as workspace_mod
from phi3local.azure.deploy import model_prefix, push
from phi3local.azure.invoke import MODEL_STATUS_HEADER, InvokeError, chat_body, invoke
from phi3local.azure.spec import read_measurements
from phi3local.azure.workspace import (
    ARM_SCOPE,
    AzureOperationError,
    WorkspaceError,
    WorkspaceRef,
    connect,
    resolve_workspace,
)
from phi3local.config import load_recipe
from phi3local.errors import Phi3LocalError
from phi3local.safety.gate import SafetyGateError, default_report_dir, model_checksum

pytestmark = pytest.mark.filterwarnings("ignore::marshmallow.warnings.Marshmallow4Warning")
REF = WorkspaceRef(SUB, RG, WS, "test")


def recipe(*overrides: str):
    return load_recipe(None, ["azure.endpoint_name=phi3-chat", *overrides])


def measured():
    return read_measurements(per_token_ms=20.0, load_seconds=12.0, first_token_ms=150.0)


class FakeUpload:
    """Stands in for blob_upload.upload_folder where the upload itself is not under test."""

    def __init__(self):
        self.calls = []

    def __call__(self, client, folder, prefix, progress=None):
        files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
        self.calls.append((client, Path(folder), prefix, files))
        if progress:
            progress(0, 1)
            progress(1, 1)

        class Report:
            files_uploaded = files
            files_skipped: list = []
            bytes_sent = 1
            mib_per_s = 1.0

        return Report()


def plant_safety_report(onnx: Path, tuned_rate: float, base_rate: float | None, *, age_hours: float = 0.0,
                        checksum: str | None = None) -> Path:
    """A safety.json as `phi3local safety` writes it, for these files (or `checksum`), `age_hours` old."""
    report = {"written_by": "phi3local safety", "created_unix": time.time() - 3600 * age_hours,
              "model_sha256": checksum or model_checksum(onnx), "summary": {"overall": {"refusal_rate": tuned_rate}},
              "baseline": None if base_rate is None else {"summary": {"overall": {"refusal_rate": base_rate}}}}
    out = default_report_dir(onnx)
    out.mkdir(exist_ok=True)
    (out / "safety.json").write_text(json.dumps(report))
    return out / "safety.json"


def run_push(tmp_path, arm, *, dry_run=False, upload="fake", safety_rates=(0.9, 0.9), **kw):
    onnx = tmp_path / "onnx" if (tmp_path / "onnx").is_dir() else make_export(tmp_path / "onnx", "cuda")
    if safety_rates is not None:  # a passing safety report unless the test plants its own
        plant_safety_report(onnx, *safety_rates)
    upload = FakeUpload() if upload == "fake" else upload  # None: the real blob_upload
    lines = []
    made = []

    arm.credential = FakeCredential()

    def factory():
        made.append(1)
        return connect(REF, arm.credential, transport=arm)

    kw.setdefault("container_factory", lambda target: "container")
    result = push(onnx, tmp_path / "spec", recipe(*kw.pop("overrides", ())).azure, measured(), ws=REF,
                  client_factory=factory, dry_run=dry_run, say=lines.append, upload_fn=upload, **kw)
    return result, lines, made


# ------------------------------------------------------------------------------------------ push

def test_push_sends_what_the_sdk_would_and_uploads_to_azurite(tmp_path, azurite, caplog):
    from azure.storage.blob import BlobServiceClient

    caplog.set_level(logging.DEBUG)
    # The workspace's datastore is Azurite's account; its key comes from listSecrets, as on Azure.
    arm = FakeArm(account=azurite.account, container="azureml-blobstore-test", account_key=azurite.key)
    service = BlobServiceClient(azurite.account_url, credential=azurite.key)
    service.create_container("azureml-blobstore-test")
    result, lines, _ = run_push(tmp_path, arm, upload=None, blob_account_url=azurite.account_url,
                                container_factory=None, overrides=("azure.max_concurrent_requests_per_instance=2",))
    spec = result.spec

    # The model folder and the code folder are in the datastore's container, byte for byte.
    container = service.get_container_client("azureml-blobstore-test")
    prefix = model_prefix(spec)
    assert prefix.endswith("/onnx")  # the folder keeps its name: AZUREML_MODEL_DIR/onnx/
    for path in sorted(spec.onnx_dir.rglob("*")):
        if path.is_file():
            blob = container.download_blob(f"{prefix}/{path.relative_to(spec.onnx_dir).as_posix()}").readall()
            assert blob == path.read_bytes()
    code_blobs = [b.name for b in container.list_blobs(name_starts_with="phi3local/code/")]
    assert any(n.endswith("phi3local/serve/score.py") for n in code_blobs)

    # Model: registered at the uploaded copy, so the SDK uploads nothing itself.
    model = arm.put_body(f"/models/phi3local/versions/{spec.model_version}")["properties"]
    assert model["modelType"] == "custom_model"
    assert model["modelUri"].endswith(f"/datastores/workspaceblobstore/paths/{prefix}/")
    env = arm.put_body(f"/environments/phi3local-serve-cuda/versions/{spec.environment_version}")["properties"]
    assert env["image"] == recipe().azure.gpu_image and "onnxruntime-genai-cuda" in env["condaFile"]
    code = arm.put_body("/codes/")["properties"]
    assert code["codeUri"].startswith(f"{azurite.account_url}/azureml-blobstore-test/phi3local/code/")
    endpoint_puts = arm.sent("PUT", "/onlineEndpoints/phi3-chat")
    endpoint_puts = [r for r in endpoint_puts if "/deployments/" not in r.path]
    assert endpoint_puts[0].body["properties"]["authMode"] == "Key"

    dep = arm.put_body("/onlineEndpoints/phi3-chat/deployments/blue")["properties"]
    assert dep["requestSettings"] == {"maxConcurrentRequestsPerInstance": 2, "requestTimeout": "PT21S"}
    assert dep["livenessProbe"]["initialDelay"] == "PT24S" and dep["readinessProbe"]["initialDelay"] == "PT12S"
    assert dep["livenessProbe"]["failureThreshold"] == 30 and dep["livenessProbe"]["period"] == "PT10S"
    assert dep["environmentVariables"]["WORKER_COUNT"] == "2"
    assert dep["environmentVariables"]["PHI3LOCAL_MAX_TOKENS"] == "512"
    assert dep["instanceType"] == "Standard_NC24ads_A100_v4"
    assert dep["model"].endswith(f"/models/phi3local/versions/{spec.model_version}")
    assert dep["environmentId"].endswith(f"/environments/phi3local-serve-cuda/versions/{spec.environment_version}")
    assert dep["codeConfiguration"]["scoringScript"] == "phi3local/serve/score.py"

    # Traffic: the last endpoint PUT gives the deployment everything.
    assert endpoint_puts[-1].body["properties"]["traffic"] == {"blue": 100}
    order = [r.path.rsplit("/providers/Microsoft.MachineLearningServices/workspaces/ws-test", 1)[-1]
             for r in arm.sent("PUT")]
    assert [o.split("/")[1] for o in order] == ["models", "environments", "onlineEndpoints", "codes",
                                                "onlineEndpoints", "onlineEndpoints"]
    assert result.scoring_uri == "https://phi3-chat.eastus2.inference.ml.azure.com/score"
    assert f"scoring URI: {result.scoring_uri}" in lines

    # Only the ARM scope was asked for; neither the token nor the storage key reached a log or the output.
    assert arm.credential.scopes and set(arm.credential.scopes) == {ARM_SCOPE}
    shown = caplog.text + "\n".join(lines)
    assert azurite.key not in shown and "fake-token" not in shown


def test_a_second_push_reuses_the_endpoint_and_the_uploaded_files(tmp_path):
    arm = FakeArm()
    upload = FakeUpload()
    run_push(tmp_path, arm, upload=upload)
    first_prefixes = [c[2] for c in upload.calls]
    arm.requests.clear()
    run_push(tmp_path, arm, upload=upload)
    assert [c[2] for c in upload.calls[2:]] == first_prefixes  # same content, same blob prefixes
    endpoint_puts = [r for r in arm.sent("PUT", "/onlineEndpoints/") if "/deployments/" not in r.path]
    assert len(endpoint_puts) == 1  # only the traffic update: the existing endpoint (and its keys) is kept
    assert endpoint_puts[0].body["properties"]["traffic"] == {"blue": 100}


def test_dry_run_sends_nothing(tmp_path):
    arm = FakeArm()
    upload = FakeUpload()
    result, lines, made = run_push(tmp_path, arm, dry_run=True, upload=upload)
    assert arm.requests == [] and made == [] and upload.calls == []
    assert (result.spec.out_dir / "deployment.yml").is_file()
    assert any("nothing was sent" in line for line in lines)
    assert any(line.strip().startswith("deploy") for line in lines)


def test_dry_run_from_the_command_line_makes_no_client(tmp_path, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("a dry run must not connect")

    monkeypatch.setattr(workspace_mod, "connect", refuse)
    monkeypatch.setattr(workspace_mod, "default_credential", refuse)
    monkeypatch.chdir(tmp_path)
    onnx = make_export(tmp_path / "onnx")
    plant_safety_report(onnx, 0.9, 0.9)
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["azure", "push", str(onnx), "azure.endpoint_name=phi3-chat", "--dry-run",
                              "--per-token-ms", "20", "--load-seconds", "12"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "nothing was sent" in out and "request_timeout_ms 21000" in out
    assert (tmp_path / "onnx.azure" / "spec.json").is_file()


@pytest.mark.parametrize("method, path, status, code, message, operation, said", [
    ("PUT", r"/models/", 403, "AuthorizationFailed",
     "The client 'me' does not have authorization to perform action 'models/versions/write'",
     "register model phi3local", "lacks a role on the workspace"),
    ("PUT", r"/deployments/blue$", 409, "QuotaExceeded",
     "Not enough quota available for Standard_NC24ads_A100_v4 in SubscriptionId x. Current usage/limit: 0/0.",
     "create or update deployment blue on endpoint phi3-chat", "request more quota"),
    ("PUT", r"/onlineEndpoints/phi3-chat$", 500, "InternalServerError", "Something went wrong",
     "create endpoint phi3-chat", "Azure failed on its side"),
])
def test_a_failing_response_is_one_line_naming_the_operation(tmp_path, method, path, status, code, message, operation,
                                                             said):
    arm = FakeArm()
    arm.fail(method, path, status, code, message)
    with pytest.raises(AzureOperationError) as e:
        run_push(tmp_path, arm)
    text = str(e.value)
    assert isinstance(e.value, Phi3LocalError) and "\n" not in text
    assert text.startswith(operation) and f"failed: {status} {code}: {message}" in text and said in text
    assert e.value.status == status and e.value.code == code
    if status == 500:
        assert len(arm.sent(method, "/onlineEndpoints/phi3-chat")) > 1  # the SDK retried (without sleeping here)


def test_a_deployment_that_ends_failed_points_at_its_log(tmp_path):
    arm = FakeArm()
    arm.fail_operation(r"/deployments/blue$", "ResourceNotReady",
                       "User container has crashed or terminated: Liveness probe failed.")
    with pytest.raises(AzureOperationError) as e:
        run_push(tmp_path, arm)
    assert str(e.value) == ("create or update deployment blue on endpoint phi3-chat failed: ResourceNotReady: User "
                            "container has crashed or terminated: Liveness probe failed. (read the container log: az ml "
                            "online-deployment get-logs --endpoint-name phi3-chat --name blue)")
    assert not [r for r in arm.sent("PUT") if r.body and "traffic" in r.body.get("properties", {})
                and r.body["properties"]["traffic"]]  # no traffic moved to a broken deployment


def test_workspace_from_flags_config_json_or_recipe(tmp_path):
    cfg = tmp_path / "config.json"
    # The portal's file, with a BOM as some editors save it.
    cfg.write_bytes(b"\xef\xbb\xbf" + json.dumps({"subscription_id": "s1", "resource_group": "rg1",
                                                  "workspace_name": "ws1"}).encode())
    ref = resolve_workspace(None, config_file=cfg)
    assert (ref.subscription_id, ref.resource_group, ref.workspace_name) == ("s1", "rg1", "ws1")
    ref = resolve_workspace(recipe("azure.workspace=from-recipe").azure, config_file=cfg, workspace="from-flag")
    assert ref.workspace_name == "from-flag" and ref.resource_group == "rg1"
    with pytest.raises(WorkspaceError, match=r"missing resource_group, workspace_name \(give --resource-group, "
                                             r"--workspace"):
        resolve_workspace(None, subscription_id="s", search=False)
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    with pytest.raises(WorkspaceError, match="expected a JSON object"):
        resolve_workspace(None, config_file=bad)


def test_no_credential_is_explained():
    from azure.core.exceptions import ClientAuthenticationError

    with pytest.raises(AzureOperationError, match=r"register model m failed: no usable Azure credential .*az login"), \
            workspace_mod.azure_call("register model m"):
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")


def test_the_blob_target_never_shows_its_key():
    arm = FakeArm(account_key="c2VjcmV0LWtleQ==")
    target = workspace_mod.blob_target(connect(REF, FakeCredential(), transport=arm), "workspaceblobstore")
    assert target.credential == "c2VjcmV0LWtleQ==" and "c2VjcmV0" not in repr(target)
    assert target.account_url == f"https://{ACCOUNT}.blob.core.windows.net" and target.container_name == CONTAINER
    assert [r.method for r in arm.requests] == ["GET", "POST"]  # datastore, then listSecrets


# ------------------------------------------------------------------------------------------ invoke

class Scoring:
    """A scoring endpoint on 127.0.0.1 answering what the test sets; records what it was sent."""

    def __init__(self):
        self.status, self.headers, self.body = 200, {}, b"{}"
        self.received: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                outer.received.append((dict(self.headers), json.loads(self.rfile.read(length))))
                self.send_response(outer.status)
                for k, v in {"Content-Type": "application/json", **outer.headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def answer(self, status, body, headers=None):
        self.status, self.body, self.headers = status, json.dumps(body).encode(), headers or {}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scoring():
    s = Scoring()
    yield s
    s.close()


def endpoint_arm(scoring, instance_count=1, per_instance=1, timeout_ms=21000):
    arm = FakeArm(scoring_uri=scoring.uri)
    base = "/onlineEndpoints/phi3-chat"
    full = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices/workspaces/{WS}{base}"
    arm.answer("GET", base, 200, {"id": full, "name": "phi3-chat", "location": "eastus2", "properties": {
        "authMode": "Key", "scoringUri": scoring.uri, "traffic": {"blue": 100}, "provisioningState": "Succeeded"}})
    arm.answer("GET", f"{base}/deployments/blue", 200, {
        "id": f"{full}/deployments/blue", "name": "blue", "location": "eastus2",
        "sku": {"name": "Default", "capacity": instance_count},
        "properties": {"endpointComputeType": "Managed", "instanceType": "Standard_NC24ads_A100_v4",
                       "scaleSettings": {"scaleType": "Default"}, "provisioningState": "Succeeded",
                       "requestSettings": {"maxConcurrentRequestsPerInstance": per_instance,
                                           "requestTimeout": f"PT{timeout_ms // 1000}S"}}})
    return arm, connect(REF, FakeCredential(), transport=arm)


def test_invoke_answers_with_latency_and_sends_the_key(scoring):
    arm, ml = endpoint_arm(scoring)
    scoring.answer(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})
    result = invoke(ml, "phi3-chat", chat_body("hi", max_tokens=16), deployment="blue")
    assert result.ok and result.answer == "Hello there." and result.usage["completion_tokens"] == 3
    assert result.latency_s > 0
    headers, body = scoring.received[0]
    assert headers["Authorization"] == "Bearer primary-key" and headers["azureml-model-deployment"] == "blue"
    assert body == {"messages": [{"role": "user", "content": "hi"}], "stream": False, "max_tokens": 16}
    # invoke only reads: the endpoint (its URI) and its keys.
    assert [r.path.rsplit("/", 1)[-1] for r in arm.requests if r.method != "GET"] == ["listKeys"]


def test_424_reads_the_containers_real_status_and_body(scoring):
    _, ml = endpoint_arm(scoring)
    scoring.answer(424, {"error": {"message": "`max_tokens` is 4000, over this server's cap of 512", "type": "x",
                                   "param": "max_tokens", "code": "max_tokens_over_cap"}}, {MODEL_STATUS_HEADER: "422"})
    result = invoke(ml, "phi3-chat", chat_body("hi", max_tokens=4000))
    assert not result.ok and result.status == 424 and result.model_status == 422
    assert "the container (score.py) answered 422; Azure passes that on as 424" in result.error
    assert "over this server's cap of 512" in result.error and "raise azure.max_tokens" in result.error
    scoring.answer(424, {"error": {"message": "the server failed on this request; see its log", "code": "server_error"}},
                   {MODEL_STATUS_HEADER: "500"})
    result = invoke(ml, "phi3-chat", chat_body("hi"), deployment="blue")
    assert result.model_status == 500 and "az ml online-deployment get-logs --endpoint-name phi3-chat --name blue" \
        in result.error


def test_408_names_the_timeout_and_how_to_raise_it(scoring):
    _, ml = endpoint_arm(scoring, timeout_ms=21000)
    scoring.answer(408, {"message": "Request timed out"})
    result = invoke(ml, "phi3-chat", chat_body("hi"))
    assert result.status == 408 and "request_timeout_ms=21000" in result.error
    assert "azure.timeout_factor" in result.error and "180000 ms" in result.error


def test_429_names_the_concurrency_limit(scoring):
    _, ml = endpoint_arm(scoring, instance_count=2, per_instance=3)
    scoring.answer(429, {"message": "Too many requests"})
    result = invoke(ml, "phi3-chat", chat_body("hi"))
    assert result.status == 429
    assert "max_concurrent_requests_per_instance 3 x 2 instance(s) (x2 queued = 12)" in result.error


def test_invoke_command_prints_the_error_in_plain_words(scoring, monkeypatch, capsys):
    arm, ml = endpoint_arm(scoring)
    monkeypatch.setattr(workspace_mod, "connect", lambda ref, credential=None, **kw: ml)
    scoring.answer(424, {"error": {"message": "boom", "code": "server_error"}}, {MODEL_STATUS_HEADER: "500"})
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["azure", "invoke", "--endpoint", "phi3-chat", "--subscription", SUB,
                              "--resource-group", RG, "--workspace", WS])
    with pytest.raises(InvokeError, match="the container \\(score.py\\) answered 500"):
        args.func(args)
    out = capsys.readouterr().out
    assert "status 424 (container: 500)" in out and "not to stream" in out


# ------------------------------------------------------------------------------------------ the safety gate

def test_the_gate_blocks_a_planted_regression_before_anything_is_sent(tmp_path):
    arm = FakeArm()
    upload = FakeUpload()
    onnx = make_export(tmp_path / "onnx", "cuda")
    plant_safety_report(onnx, tuned_rate=0.60, base_rate=0.90)  # 30 points fewer refusals; allowed: 5
    with pytest.raises(SafetyGateError) as e:
        run_push(tmp_path, arm, upload=upload, safety_rates=None)
    text = str(e.value)
    assert "refusal rate on harmful prompts 60.0% vs the baseline's 90.0% (-30.0 points; allowed drop 5.0" in text
    assert "--allow-safety-regression" in text and "\n" not in text
    assert arm.requests == [] and upload.calls == []  # nothing uploaded, registered or deployed
    # The recipe's threshold decides: 35 points allowed passes the same report.
    result, _, _ = run_push(tmp_path, arm, upload=upload, safety_rates=None, safety=recipe(
        "safety.max_refusal_drop=0.35").safety)
    assert result.safety.status == "passed"


def test_the_override_deploys_and_is_recorded_in_the_deployments_tags(tmp_path):
    arm = FakeArm()
    onnx = make_export(tmp_path / "onnx", "cuda")
    report = plant_safety_report(onnx, tuned_rate=0.60, base_rate=0.90)
    result, lines, _ = run_push(tmp_path, arm, safety_rates=None, allow_safety_regression=True)
    assert result.scoring_uri and result.safety.overridden
    assert any(line.startswith("safety       regression (overridden by --allow-safety-regression)") for line in lines)
    tags = arm.put_body("/onlineEndpoints/phi3-chat/deployments/blue")["tags"]
    assert tags == {"phi3local.safety": "regression", "phi3local.safety.override": "true",
                    "phi3local.safety.refusal_drop": "0.3000", "phi3local.safety.report": str(report)}


def test_a_passing_gate_is_recorded_too(tmp_path):
    arm = FakeArm()
    run_push(tmp_path, arm, safety_rates=(0.88, 0.90))  # 2 points: within the 5 allowed
    tags = arm.put_body("/onlineEndpoints/phi3-chat/deployments/blue")["tags"]
    assert tags["phi3local.safety"] == "passed" and tags["phi3local.safety.override"] == "false"
    assert tags["phi3local.safety.refusal_drop"] == "0.0200"


@pytest.mark.parametrize("plant, status, said", [
    (None, "no-report", "no safety report at"),
    (dict(tuned_rate=0.9, base_rate=0.9, checksum="0" * 64), "other-model", "was written for other model files"),
    (dict(tuned_rate=0.9, base_rate=0.9, age_hours=200), "stale", "is 200 h old (safety.max_report_age_hours=168)"),
    (dict(tuned_rate=0.9, base_rate=None), "no-baseline", "has no baseline"),
])
def test_the_gate_refuses_what_it_cannot_check_and_says_which_command_to_run(tmp_path, plant, status, said):
    arm = FakeArm()
    onnx = make_export(tmp_path / "onnx", "cuda")
    if plant is not None:
        plant_safety_report(onnx, **plant)
    with pytest.raises(SafetyGateError) as e:
        run_push(tmp_path, arm, safety_rates=None)
    assert said in str(e.value) and f"phi3local safety {onnx} --baseline BASE_MODEL_DIR" in str(e.value)
    assert "the Azure environment cannot" in str(e.value) and arm.requests == []
    result, lines, _ = run_push(tmp_path, arm, dry_run=True, safety_rates=None)  # a dry run says so, sends nothing
    assert result.safety.status == status and "dry run: the safety gate would refuse this deployment" in lines
