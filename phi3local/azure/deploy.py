"""`phi3local azure push`: the spec, the upload, then model, environment, endpoint, deployment and traffic.

    1. write the spec folder (spec.write_spec: YAML checked by the SDK's loaders, code folder checked);
       the safety gate (phi3local.safety.gate) reads MODEL_DIR.safety/safety.json for these files and
       refuses a refusal-rate drop over safety.max_refusal_drop unless overridden (both go into the tags);
    2. --dry-run stops here: it prints the plan and sends nothing (no client is even made);
    3. upload the ONNX folder and the code folder to the workspace's blob datastore ourselves
       (blob_upload: resumable, MD5-checked; the SDK's own uploader cannot be redirected or resumed);
    4. register the model at azureml://datastores/<datastore>/paths/<prefix>/, create or update the
       environment, create the endpoint if missing, create or update the deployment, then give it 100%
       of the traffic; print the scoring URI.

Names are content-derived (model and environment versions, blob prefixes), so a push that failed half-way
can simply be run again: it re-uses what is already there instead of making new copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3local.azure.spec import Measurements, Spec, fingerprint, plan_lines, write_spec
from phi3local.azure.workspace import (
    BlobTarget,
    WorkspaceRef,
    azure_call,
    blob_target,
    upload_to_datastore,
)
from phi3local.safety.gate import OVERRIDE_FLAG, GateDecision, SafetyGateError, check_gate

PREFIX = "phi3local"


@dataclass
class PushResult:
    spec: Spec
    dry_run: bool
    steps: list[str] = field(default_factory=list)  # what was (or, dry, would be) done, in order
    scoring_uri: str | None = None
    model_id: str | None = None
    uploads: dict[str, Any] = field(default_factory=dict)  # "model"/"code" -> blob_upload report
    safety: GateDecision | None = None


def model_prefix(spec: Spec) -> str:
    # The folder keeps its own name at the end: it is what appears under AZUREML_MODEL_DIR.
    return f"{PREFIX}/models/{spec.model_name}/{spec.model_version}/{spec.onnx_dir.resolve().name}"


def code_prefix(spec: Spec) -> str:
    return f"{PREFIX}/code/{fingerprint(spec.code_dir)}"


def plan_steps(spec: Spec, ws: WorkspaceRef | None, datastore: str) -> list[str]:
    where = str(ws) if ws else "(workspace not resolved)"
    return [
        f"workspace    {where}",
        f"upload       {spec.onnx_dir} -> datastore {datastore}: {model_prefix(spec)}/",
        f"upload       {spec.code_dir} -> datastore {datastore}: {code_prefix(spec)}/",
        f"register     model {spec.model_name}:{spec.model_version} (custom_model)",
        f"create       environment {spec.environment_name}:{spec.environment_version}",
        f"create       endpoint {spec.endpoint_name} (if missing)",
        f"deploy       {spec.deployment_name} on {spec.endpoint_name}",
        f"traffic      {spec.deployment_name} 100%",
    ]


def push(onnx_dir: str | Path, spec_dir: str | Path, azure: Any, measurements: Measurements, *,
         ws: WorkspaceRef | None = None, client_factory: Callable[[], Any] | None = None, dry_run: bool = False,
         say: Callable[[str], None] = print, console: Any = None, blob_account_url: str | None = None,
         upload_fn: Any = None, container_factory: Any = None, safety: Any = None,
         safety_report: str | Path | None = None, allow_safety_regression: bool = False) -> PushResult:
    """Deploy the export in onnx_dir to a managed online endpoint (see the module docstring).

    client_factory: makes the MLClient (workspace.connect); only called when not dry_run.
    safety: the recipe's safety section (max_refusal_drop, max_report_age_hours); safety_report: a
    safety.json other than MODEL_DIR.safety/safety.json; allow_safety_regression: deploy past the gate.
    blob_account_url, upload_fn, container_factory: an emulator's URL and blob_upload replacements (tests).
    """
    spec = write_spec(onnx_dir, spec_dir, azure, measurements)
    result = PushResult(spec, dry_run)
    for line in plan_lines(spec):
        say(line)
    result.safety = gate = _safety_gate(spec, safety, safety_report, allow_safety_regression)
    if not gate.allowed and not dry_run:
        raise SafetyGateError(f"not deployed: {gate.message}")
    say(f"safety       {gate.status}{f' (overridden by {OVERRIDE_FLAG})' if gate.overridden else ''}: {gate.message}")
    result.steps = plan_steps(spec, ws, azure.datastore)
    if dry_run:
        if not gate.allowed:
            say("dry run: the safety gate would refuse this deployment")
        say(f"dry run: spec written to {spec.out_dir}; nothing was sent. It would:")
        for line in result.steps:
            say(f"  {line}")
        return result
    if client_factory is None:
        raise ValueError("push needs a client_factory unless dry_run")
    ml = client_factory()

    target: BlobTarget = blob_target(ml, azure.datastore, account_url=blob_account_url)
    m_prefix, c_prefix = model_prefix(spec), code_prefix(spec)
    result.uploads["model"] = upload_to_datastore(target, spec.onnx_dir, m_prefix, console=console, upload_fn=upload_fn,
                                                  client_factory=container_factory, description="model")
    _say_upload(say, "model", result.uploads["model"])
    result.uploads["code"] = upload_to_datastore(target, spec.code_dir, c_prefix, console=console, upload_fn=upload_fn,
                                                 client_factory=container_factory, description="code")
    _say_upload(say, "code", result.uploads["code"])

    ents = spec.entities
    model = ents["model"]
    model.path = target.datastore_uri(m_prefix)
    with azure_call(f"register model {spec.model_name}:{spec.model_version}"):
        registered = ml.models.create_or_update(model)
    result.model_id = registered.id
    say(f"registered model {registered.name}:{registered.version}")

    with azure_call(f"create environment {spec.environment_name}:{spec.environment_version}"):
        env = ml.environments.create_or_update(ents["environment"])
    say(f"environment {env.name}:{env.version}")

    endpoint = _ensure_endpoint(ml, ents["endpoint"], say)

    deployment = ents["deployment"]
    deployment.model = registered.id
    deployment.environment = env.id
    deployment.code_configuration.code = target.blob_url(c_prefix)
    deployment.tags = {**(deployment.tags or {}), **gate.tags()}  # the gate's decision, an override included
    logs = (f"read the container log: az ml online-deployment get-logs --endpoint-name {spec.endpoint_name} "
            f"--name {spec.deployment_name}")
    with azure_call(f"create or update deployment {spec.deployment_name} on endpoint {spec.endpoint_name}", logs):
        # The scoring script was checked when the spec was written; the SDK's check needs a local folder.
        ml.online_deployments.begin_create_or_update(deployment, skip_script_validation=True).result()
    say(f"deployment {spec.deployment_name} succeeded")

    endpoint.traffic = {spec.deployment_name: 100}
    with azure_call(f"set traffic of endpoint {spec.endpoint_name} to {spec.deployment_name} 100%"):
        ml.online_endpoints.begin_create_or_update(endpoint).result()
    with azure_call(f"read endpoint {spec.endpoint_name}"):
        result.scoring_uri = ml.online_endpoints.get(spec.endpoint_name).scoring_uri
    say(f"scoring URI: {result.scoring_uri}")
    say(f"try it: phi3local azure invoke --endpoint {spec.endpoint_name}")
    return result


def _safety_gate(spec: Spec, safety: Any, report: str | Path | None, override: bool) -> GateDecision:
    if safety is None:
        from phi3local.config import SafetyConfig

        safety = SafetyConfig()
    return check_gate(spec.onnx_dir, safety.max_refusal_drop, safety.max_report_age_hours, report, override)


def _ensure_endpoint(ml: Any, wanted: Any, say: Callable[[str], None]) -> Any:
    """The existing endpoint (kept as it is: re-creating it would reset its traffic and keys), or a new one."""
    from azure.core.exceptions import ResourceNotFoundError

    with azure_call(f"read endpoint {wanted.name}"):
        try:
            existing = ml.online_endpoints.get(wanted.name)
        except ResourceNotFoundError:
            existing = None
    if existing is not None:
        say(f"endpoint {wanted.name} exists: kept")
        return existing
    with azure_call(f"create endpoint {wanted.name}"):
        created = ml.online_endpoints.begin_create_or_update(wanted).result()
    say(f"endpoint {wanted.name} created")
    return created


def _say_upload(say: Callable[[str], None], what: str, report: Any) -> None:
    uploaded = len(getattr(report, "files_uploaded", []) or [])
    skipped = len(getattr(report, "files_skipped", []) or [])
    sent = getattr(report, "bytes_sent", 0) or 0
    rate = getattr(report, "mib_per_s", 0.0) or 0.0
    say(f"uploaded {what}: {uploaded} file(s) sent, {skipped} already there, {sent / 2**20:.1f} MiB at {rate:.1f} MiB/s")
