"""`phi3local azure spec`: the Azure ML YAML of a deployment (model, environment, endpoint, deployment) and
its code folder, every value derived from the export and from measurements, checked by the SDK's loaders.

    <out>/model.yml         custom_model pointing at the ONNX folder
    <out>/environment.yml   base image + conda file (onnxruntime-genai-cuda on GPU VMs, the CPU build otherwise)
    <out>/conda-<t>.yml     that conda file (phi3local/serve/environment-<t>.yml)
    <out>/endpoint.yml      managed online endpoint, key auth
    <out>/deployment.yml    request settings, probes, WORKER_COUNT, the serving limits
    <out>/code/             the serving runtime, phi3local/serve/ whole (score.py and all it imports;
                            phi3local.serve.bundle)
    <out>/spec.json         the derived values and the reasons for them (also the folder's marker)

Every YAML starts with its $schema line as Azure ML's own examples do, so `az ml ... create -f` takes them
as they are. Unset names and sizes are derived: the endpoint's name from the export folder's name
(`endpoint_name_for`), the VM size from the export's target (`instance_type_for`). Derivations (see
`derive_serving`):
  request_timeout_ms = timeout_factor x (first-token ms + max_tokens x per-token ms), clamped to the
      service's [5 s default, 180 s maximum] with a note;
  probe initial delays from the measured model load time x load_factor, and failure thresholds that outlast
      a full-length answer, both floored at the service's defaults (10 s, 30 failures);
  WORKER_COUNT = max_concurrent_requests_per_instance (each worker holds one copy of the model).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phi3local.cost import instance_estimate, load_price_table
from phi3local.errors import Phi3LocalError

SCHEMA_URL = "https://azuremlschemas.azureedge.net/latest/{}.schema.json"
SCHEMAS = {"model": "model", "environment": "environment", "endpoint": "managedOnlineEndpoint",
           "deployment": "managedOnlineDeployment"}
FILES = {"model": "model.yml", "environment": "environment.yml", "endpoint": "endpoint.yml",
         "deployment": "deployment.yml"}
MARKER = "spec.json"
CODE_DIR = "code"
MEASUREMENTS_FILE = "measurements.json"  # read from the ONNX folder when no --measurements is given

# READ (Microsoft's docs; the SDK sends None and the service applies them): the request timeout defaults
# to 5 s and may be at most 180 s.
SERVICE_DEFAULT_TIMEOUT_MS = 5_000
SERVICE_MAX_TIMEOUT_MS = 180_000
# Probe period and timeout: the service's own defaults (10 s, 2 s); the delays and thresholds are derived,
# floored at the service's defaults (initial delay 10 s, 30 failures).
PROBE_PERIOD_S = 10
PROBE_TIMEOUT_S = 2
SERVICE_PROBE_DELAY_S = 10
SERVICE_PROBE_FAILURES = 30
# gunicorn threads per worker: one generates, the other answers GET / (liveness) meanwhile. A sync
# worker answers nothing while it generates (FACTS: a probe waited 2.7 s behind one stream).
THREADS_PER_WORKER = 2
ENV_WORKER_COUNT = "WORKER_COUNT"

# Endpoint and deployment names, as azure-ai-ml 1.35.2 validates them before sending
# (azure/ai/ml/entities/_endpoint/_endpoint_helpers.py, validate_endpoint_or_deployment_name): 3 to 32
# characters, a letter first, then letters, digits or '-', a letter or digit last. READ (Microsoft's docs):
# an endpoint's name is also unique within its Azure region (it is the scoring URI's host name).
NAME_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")
NAME_MAX = 32
NAME_PREFIX = "phi3local-"  # in front of a derived name that would not start with a letter, or be too short
# The VM size when azure.instance_type is unset: the export's target decides (see AzureConfig.instance_type).
DEFAULT_INSTANCE_TYPES = {"cpu": "Standard_F8s_v2", "cuda": "Standard_NC24ads_A100_v4"}
# GPU VM families of managed online endpoints: NC (T4, V100, A100, H100), ND, NV.
GPU_SIZE = re.compile(r"^Standard_N[CDV]", re.IGNORECASE)

# phi3local modules the copied files import only inside functions that the scoring path never calls:
# not shipped on purpose (the check below refuses any other missing import). None at present: the serving
# runtime imports nothing of phi3local outside itself but phi3local.errors.
LAZY_NOT_SHIPPED: dict[str, str] = {}


class SpecError(Phi3LocalError):
    """The spec cannot be written or an Azure ML YAML is invalid; the message names the file and the rule."""

    exit_code = 2


# ------------------------------------------------------------------------------------------ measurements

@dataclass(frozen=True)
class Measurements:
    """How fast the exported model answers, measured: the inputs of the timeout and probe derivations."""

    per_token_ms: float  # decode time per new token
    load_seconds: float  # model load time of one worker (score.init())
    first_token_ms: float | None = None  # prompt processing up to the first token; None: not measured
    source: str = "flags"  # where the numbers came from (a file, flags), for the plan
    measured_on: str | None = None  # the machine, when the file says


def _positive(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SpecError(f"{where}: {name} must be a number > 0, got {value!r}")
    return float(value)


def read_measurements(onnx_dir: str | Path | None = None, path: str | Path | None = None, *,
                      per_token_ms: float | None = None, first_token_ms: float | None = None,
                      load_seconds: float | None = None) -> Measurements:
    """The measurements: flags override a JSON file (--measurements, else <onnx_dir>/measurements.json).

    The file holds `per_token_ms` (or `tokens_per_second`, as phi3local's generate results write it),
    `load_seconds`, optionally `first_token_ms` (or `time_to_first_token` in seconds) and `measured_on`.
    Nothing is assumed: a missing number is an error that says how to give it.
    """
    values: dict[str, Any] = {}
    source = "flags"
    file = Path(path) if path else (Path(onnx_dir) / MEASUREMENTS_FILE if onnx_dir else None)
    if file is not None and (path or file.is_file()):
        if not file.is_file():
            raise SpecError(f"{file}: no such measurements file")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise SpecError(f"{file}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{file}: expected a JSON object")
        where = str(file)
        if "per_token_ms" in data:
            values["per_token_ms"] = _positive(data["per_token_ms"], "per_token_ms", where)
        elif "tokens_per_second" in data:
            values["per_token_ms"] = 1000.0 / _positive(data["tokens_per_second"], "tokens_per_second", where)
        if "first_token_ms" in data:
            values["first_token_ms"] = _positive(data["first_token_ms"], "first_token_ms", where)
        elif "time_to_first_token" in data:
            values["first_token_ms"] = 1000.0 * _positive(data["time_to_first_token"], "time_to_first_token", where)
        if "load_seconds" in data:
            values["load_seconds"] = _positive(data["load_seconds"], "load_seconds", where)
        values["measured_on"] = data.get("measured_on") if isinstance(data.get("measured_on"), str) else None
        source = where
    flags = {"per_token_ms": per_token_ms, "first_token_ms": first_token_ms, "load_seconds": load_seconds}
    for name, value in flags.items():
        if value is not None:
            values[name] = _positive(value, name, "command line")
            source = f"{source} + flags" if source != "flags" and "flags" not in source else source
    missing = [n for n in ("per_token_ms", "load_seconds") if n not in values]
    if missing:
        flag = {"per_token_ms": "--per-token-ms", "load_seconds": "--load-seconds"}
        raise SpecError(
            f"no measured {' and '.join(missing)}: the request timeout and the probe delays are derived from how "
            f"fast this model runs, not assumed. Give {', '.join(flag[m] for m in missing)}, or --measurements FILE "
            f"(JSON: per_token_ms or tokens_per_second, load_seconds, optional first_token_ms), or put that file "
            f"in the ONNX folder as {MEASUREMENTS_FILE} (`phi3local export` writes it when the export runs on the "
            "machine it was made on: export on hardware like the target VM, e.g. a CUDA box for a GPU instance)")
    return Measurements(values["per_token_ms"], values["load_seconds"], values.get("first_token_ms"), source,
                        values.get("measured_on"))


# ------------------------------------------------------------------------------------------ derivations

@dataclass(frozen=True)
class Probe:
    initial_delay: int
    period: int
    timeout: int
    failure_threshold: int
    success_threshold: int = 1

    def to_yaml(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ServingPlan:
    target: str  # "cpu" or "cuda": the onnxruntime-genai build and the base image
    instance_type: str
    instance_count: int
    max_concurrent_requests_per_instance: int
    request_timeout_ms: int
    worker_count: int
    threads_per_worker: int
    max_tokens: int
    liveness: Probe
    readiness: Probe
    environment_variables: dict[str, str]
    notes: list[str] = field(default_factory=list)  # every clamp and assumption, said once

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_gpu_instance(instance_type: str) -> bool:
    return bool(GPU_SIZE.match(instance_type))


def export_target(onnx_dir: Path) -> str:
    """'cuda' or 'cpu': what the export runs on, from genai_config.json (what onnxruntime-genai reads)."""
    cfg_path = onnx_dir / "genai_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecError(f"{cfg_path}: cannot read it ({e})") from None
    options = (((cfg.get("model") or {}).get("decoder") or {}).get("session_options") or {}).get("provider_options") or []
    providers = {name.lower() for entry in options if isinstance(entry, dict) for name in entry}
    if "cuda" in providers:
        return "cuda"
    if providers - {"cpu"}:
        raise SpecError(f"{cfg_path}: execution provider(s) {', '.join(sorted(providers))} are not served here "
                        "(export with --target cuda or --target cpu)")
    return "cpu"


def instance_type_for(azure: Any, target: str) -> tuple[str, str | None]:
    """The deployment's VM size and, when it was not set, the note saying where it came from.

    azure.instance_type when set (refused when the export cannot run on it), else the export's target's
    default (DEFAULT_INSTANCE_TYPES: a CPU export gets a CPU VM, a CUDA export a GPU one)."""
    chosen = azure.instance_type
    if not chosen:
        chosen = DEFAULT_INSTANCE_TYPES[target]
        return chosen, (f"instance type {chosen}: the default for a {target.upper()} export "
                        "(set azure.instance_type to choose another)")
    gpu = is_gpu_instance(chosen)
    other = DEFAULT_INSTANCE_TYPES["cpu"]
    if gpu and target != "cuda":
        raise SpecError(f"azure.instance_type {chosen} is a GPU VM but the export targets CPU: export with "
                        f"--target cuda for it, or choose a CPU size (e.g. azure.instance_type={other}, or leave "
                        "it unset)")
    if not gpu and target == "cuda":
        raise SpecError(f"the export targets CUDA but azure.instance_type {chosen} has no GPU: choose a "
                        "Standard_NC* size (or leave it unset), or export with --target cpu")
    return chosen, None


def endpoint_name_for(azure: Any, onnx_dir: Path) -> tuple[str, str | None]:
    """The endpoint's name and, when it was derived, the note saying from what.

    azure.endpoint_name when set (checked against NAME_RULE), else the export folder's name made valid:
    lower case, each run of other characters one '-', NAME_PREFIX in front when it would not start with a
    letter or be under 3 characters, cut to 32."""
    if azure.endpoint_name:
        return azure.endpoint_name, None
    folder = Path(onnx_dir).resolve().name
    name = re.sub(r"[^a-z0-9]+", "-", folder.lower()).strip("-")
    if not name[:1].isalpha() or len(name) < 3:
        name = (NAME_PREFIX + name).strip("-")
    name = name[:NAME_MAX].rstrip("-")
    return name, (f"endpoint name {name}: derived from the folder name {folder!r} (endpoint names are unique in "
                  "an Azure region: set azure.endpoint_name=NAME to choose it)")


def derive_serving(azure: Any, measurements: Measurements, target: str,
                   instance_type: str | None = None) -> ServingPlan:
    """Request settings, probes and worker environment of the deployment, from the recipe's azure section and
    the measurements. instance_type: the VM size (default: instance_type_for). Raises SpecError when the
    export cannot run on the chosen VM size."""
    from phi3local.serve.settings import ServeSettings

    notes: list[str] = []
    if instance_type is None:
        instance_type, said = instance_type_for(azure, target)
        notes += [said] if said else []
    m = measurements
    first = m.first_token_ms or 0.0
    if m.first_token_ms is None:
        notes.append("no first-token latency was measured: prompt processing is not in the timeout")
    answer_ms = first + azure.max_tokens * m.per_token_ms
    wanted = math.ceil(azure.timeout_factor * answer_ms / 1000.0) * 1000  # whole seconds
    timeout_ms = min(max(wanted, SERVICE_DEFAULT_TIMEOUT_MS), SERVICE_MAX_TIMEOUT_MS)
    if wanted > SERVICE_MAX_TIMEOUT_MS:
        fits = max(int((SERVICE_MAX_TIMEOUT_MS / azure.timeout_factor - first) / m.per_token_ms), 0)
        notes.append(
            f"request_timeout_ms clamped to the service maximum {SERVICE_MAX_TIMEOUT_MS} (180 s): {azure.max_tokens} "
            f"tokens x {m.per_token_ms:.1f} ms x factor {azure.timeout_factor:g} would need {wanted} ms. Long answers "
            f"will get 408: lower azure.max_tokens to {fits} or less, or use a faster azure.instance_type")
    elif wanted < SERVICE_DEFAULT_TIMEOUT_MS:
        notes.append(f"request_timeout_ms raised from the derived {wanted} ms to the service default "
                     f"{SERVICE_DEFAULT_TIMEOUT_MS} (never stricter than Azure's own default)")
    # The container must not be restarted while a worker loads the model...
    live_delay = math.ceil(azure.load_factor * m.load_seconds)
    # ...nor while every thread is busy with a full-length answer (GET / then waits behind them).
    threshold = math.ceil(timeout_ms / 1000 / PROBE_PERIOD_S) + 1
    # Readiness: first asked when a worker can have loaded; until then the endpoint sends it nothing.
    ready_delay = math.ceil(m.load_seconds)
    # Like the timeout, never stricter than the service's own defaults (the measured load leaves out the
    # container's start and imports).
    if live_delay < SERVICE_PROBE_DELAY_S or ready_delay < SERVICE_PROBE_DELAY_S:
        notes.append(f"probe initial delays raised to the service default {SERVICE_PROBE_DELAY_S} s where the "
                     f"measured load ({m.load_seconds:g} s) gave less")
    threshold = max(threshold, SERVICE_PROBE_FAILURES)
    liveness = Probe(max(live_delay, SERVICE_PROBE_DELAY_S), PROBE_PERIOD_S, PROBE_TIMEOUT_S, threshold)
    readiness = Probe(max(ready_delay, SERVICE_PROBE_DELAY_S), PROBE_PERIOD_S, PROBE_TIMEOUT_S, threshold)
    workers = azure.max_concurrent_requests_per_instance
    settings = ServeSettings(max_tokens_cap=azure.max_tokens, model_name=azure.model_name,
                             collect=getattr(azure, "collect_requests", False))
    # Only these variables, never this machine's environment. Not serve.server.server_environment: it adds
    # gunicorn flags by probing the gunicorn installed *here*, which need not be the deployment's.
    env = {**settings.to_env(), "GUNICORN_CMD_ARGS": f"--threads {THREADS_PER_WORKER}", ENV_WORKER_COUNT: str(workers)}
    if m.measured_on:
        notes.append(f"latencies measured on {m.measured_on}; the Azure VM may differ")
    return ServingPlan(target, instance_type, azure.instance_count, workers, timeout_ms, workers,
                       THREADS_PER_WORKER, azure.max_tokens, liveness, readiness, env, notes)


# ------------------------------------------------------------------------------------------ hashing

def fingerprint(folder: Path, content_limit: int = 1 << 20) -> str:
    """A short id of a folder's files: small files by content, large ones by size and mtime (reading GBs of
    weights to name a version would double the push time; the upload itself checks every byte's MD5)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == ".lock":
            continue
        st = p.stat()
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + str(st.st_size).encode() + b"\0")
        h.update(p.read_bytes() if st.st_size <= content_limit else str(st.st_mtime_ns).encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------ code folder

def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, root: Path) -> list[tuple[str, bool]]:
    """(module, at_import_time) of every phi3local import in a file; from-imports of submodules count too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if n is not f}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        eager = id(node) not in lazy_nodes
        if isinstance(node, ast.Import):
            found += [(a.name, eager) for a in node.names if a.name.split(".")[0] == "phi3local"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] != "phi3local":
                continue
            found.append((module, eager))
            found += [(f"{module}.{a.name}", eager) for a in node.names]  # maybe submodules; checked below
    return found


def check_code_folder(code_dir: Path, source_root: Path) -> None:
    """Every phi3local module the copied files import exists in the copy (with its packages' __init__.py).

    `source_root` is the folder holding the phi3local package the files were copied from: a from-import
    name is a submodule when the source has such a file. Imports inside functions of modules listed in
    LAZY_NOT_SHIPPED may stay out of the copy. Raises SpecError listing what is missing.
    """
    missing: dict[str, str] = {}
    for path in sorted(code_dir.rglob("*.py")):
        for module, eager in _imports(path, code_dir):
            is_module = _module_file(source_root, module) is not None
            parent, _, _name = module.rpartition(".")
            if not is_module and _module_file(source_root, parent) is not None and module.count(".") > 0:
                continue  # `from phi3local.x import name`: a name inside module x, not a module
            if not eager and module in LAZY_NOT_SHIPPED:
                continue
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if _module_file(code_dir, name) is None:
                    missing.setdefault(name, str(path.relative_to(code_dir)))
    if missing:
        listed = "; ".join(f"{m} (imported by {f})" for m, f in sorted(missing.items()))
        raise SpecError(f"the deployment's code folder {code_dir} lacks modules its files import: {listed}. The "
                        "serving runtime (phi3local/serve/) ships whole and may import only itself and "
                        "phi3local.errors: move the module into phi3local/serve/ (or, for an import only inside a "
                        "function the scoring path never calls, list it in phi3local.azure.spec.LAZY_NOT_SHIPPED)")


def write_code(code_dir: Path) -> str:
    """Copy the serving runtime (phi3local.serve.bundle) into code_dir, check it, return the scoring script."""
    from phi3local.serve import bundle

    if code_dir.exists():
        shutil.rmtree(code_dir)
    bundle.write_code_folder(code_dir)
    for path in code_dir.rglob("*.py"):
        try:
            ast.parse(path.read_text(encoding="utf-8"), str(path))
        except SyntaxError as e:
            raise SpecError(f"{path}: not valid Python: {e}") from None
    check_code_folder(code_dir, bundle.PACKAGE_PARENT)
    return bundle.SCORING_SCRIPT


def conda_file(target: str) -> Path:
    from phi3local.serve import bundle

    path = bundle.environment_file(target)
    if not path.is_file():
        raise SpecError(f"{path}: the serving environment's conda file is missing from the package")
    return path


# ------------------------------------------------------------------------------------------ YAML

@dataclass
class Spec:
    out_dir: Path
    onnx_dir: Path
    files: dict[str, Path]  # kind -> YAML path
    code_dir: Path
    scoring_script: str
    model_name: str
    model_version: str
    environment_name: str
    environment_version: str
    endpoint_name: str
    deployment_name: str
    plan: ServingPlan
    measurements: Measurements
    entities: dict[str, Any] = field(default_factory=dict)  # kind -> the SDK entity its loader returned
    price_table: str | None = None  # the user's price table (azure.price_table), for the plan's cost lines

    def summary(self) -> dict[str, Any]:
        return {
            "written_by": "phi3local azure spec",
            "onnx_dir": str(self.onnx_dir),
            "model": f"{self.model_name}:{self.model_version}",
            "environment": f"{self.environment_name}:{self.environment_version}",
            "endpoint": self.endpoint_name,
            "deployment": self.deployment_name,
            "scoring_script": self.scoring_script,
            "measurements": asdict(self.measurements),
            "plan": self.plan.to_dict(),
            "files": {k: p.name for k, p in self.files.items()},
        }


def _dump(path: Path, kind: str, body: dict[str, Any], comment: str) -> None:
    # $schema first, as Azure ML's examples write it; then the body in the order given.
    text = f"$schema: {SCHEMA_URL.format(SCHEMAS[kind])}\n# {comment}\n" + yaml.safe_dump(
        body, sort_keys=False, default_flow_style=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def _validation_message(e: Exception) -> str:
    """The marshmallow message of an SDK loader without its boilerplate: 'field.sub: reason; ...'."""
    raw = e.messages if hasattr(e, "messages") else str(e)
    text = raw[0] if isinstance(raw, list) and raw and isinstance(raw[0], str) else str(raw)
    match = re.search(r"failed:\s*(\{.*\})", text, re.DOTALL)
    if match:
        try:
            data = json.loads(match.group(1))
        except ValueError:
            data = None
        if isinstance(data, dict):
            parts: list[str] = []

            def walk(node: Any, key: str) -> None:
                if isinstance(node, dict):
                    for k, v in node.items():
                        walk(v, f"{key}.{k}" if key else str(k))
                elif isinstance(node, list):
                    for v in node:
                        walk(v, key) if isinstance(v, (dict, list)) else parts.append(f"{key}: {v}")
                else:
                    parts.append(f"{key}: {node}")

            walk(data, "")
            return "; ".join(parts)
    return " ".join(text.split())[:1000]


def load_yaml(kind: str, path: Path) -> Any:
    """The SDK entity of one YAML through the SDK's own loader; an invalid file is a SpecError with its message."""
    from azure.ai.ml import load_environment, load_model, load_online_deployment, load_online_endpoint
    from marshmallow.exceptions import ValidationError

    loader = {"model": load_model, "environment": load_environment, "endpoint": load_online_endpoint,
              "deployment": load_online_deployment}[kind]
    try:
        return loader(source=str(path))
    except ValidationError as e:
        raise SpecError(f"{path}: Azure ML refuses this {kind} YAML: {_validation_message(e)}") from e
    except Exception as e:
        # The SDK also raises its ValidationException for e.g. a bad name or a missing conda file.
        if type(e).__module__.startswith("azure.ai.ml"):
            raise SpecError(f"{path}: Azure ML refuses this {kind} YAML: {' '.join(str(e).split())[:1000]}") from e
        raise


def load_spec(out_dir: Path) -> dict[str, Any]:
    """Load all four YAMLs of a spec folder through the SDK loaders (kind -> entity)."""
    return {kind: load_yaml(kind, Path(out_dir) / name) for kind, name in FILES.items()}


def _check_out_dir(out_dir: Path, onnx_dir: Path) -> None:
    if out_dir.resolve() == onnx_dir.resolve() or onnx_dir.resolve() in out_dir.resolve().parents:
        raise SpecError(f"--out {out_dir} is inside the ONNX folder {onnx_dir}: the spec would be uploaded as part "
                        "of the model; choose a folder outside it")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise SpecError(f"--out {out_dir} is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        marker = out_dir / MARKER
        try:
            ours = json.loads(marker.read_text(encoding="utf-8")).get("written_by") == "phi3local azure spec"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise SpecError(f"--out {out_dir} holds files that `phi3local azure spec` did not write: choose an empty "
                            "or new folder (a spec folder is replaced only when it carries its spec.json)")


def write_spec(onnx_dir: str | Path, out_dir: str | Path, azure: Any, measurements: Measurements) -> Spec:
    """Write the spec folder for the export in onnx_dir, load every YAML back through the SDK, return it."""
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if not (onnx_dir / "genai_config.json").is_file():
        raise SpecError(f"{onnx_dir} is not an ONNX export (no genai_config.json): run `phi3local export` first")
    endpoint, endpoint_note = endpoint_name_for(azure, onnx_dir)
    for what, name in (("azure.endpoint_name", endpoint), ("azure.deployment_name", azure.deployment_name)):
        if not NAME_RULE.match(name):
            raise SpecError(f"{what}={name!r}: must be 3-32 letters, digits or '-', start with a letter and end "
                            "with a letter or digit")
    _check_out_dir(out_dir, onnx_dir)
    target = export_target(onnx_dir)
    plan = derive_serving(azure, measurements, target)
    if endpoint_note:
        plan.notes.insert(0, endpoint_note)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (*FILES.values(), MARKER, "conda-cpu.yml", "conda-cuda.yml"):
        (out_dir / name).unlink(missing_ok=True)
    code_dir = out_dir / CODE_DIR
    scoring_script = write_code(code_dir)

    conda_src = conda_file(target)
    conda_name = f"conda-{target}.yml"
    shutil.copyfile(conda_src, out_dir / conda_name)
    image = azure.gpu_image if target == "cuda" else azure.cpu_image
    env_name = f"phi3local-serve-{target}"
    env_version = hashlib.sha256(image.encode() + b"\0" + conda_src.read_bytes()).hexdigest()[:12]
    model_version = fingerprint(onnx_dir)
    rel_model = Path(_relpath(onnx_dir, out_dir))

    _dump(out_dir / FILES["model"], "model", {
        "name": azure.model_name,
        "version": model_version,
        "type": "custom_model",
        # `push` uploads this folder itself and registers the uploaded copy (azureml://datastores/...).
        "path": rel_model.as_posix(),
        "description": f"onnxruntime-genai export ({target}) written by phi3local",
        "tags": {"phi3local.target": target, "phi3local.fingerprint": model_version},
    }, "the exported ONNX folder as a custom model; its version is derived from the folder's files")
    _dump(out_dir / FILES["environment"], "environment", {
        "name": env_name,
        "version": env_version,
        "image": image,
        "conda_file": conda_name,
        "description": f"azmlinfsrv + onnxruntime-genai{'-cuda' if target == 'cuda' else ''} for phi3local's score.py",
    }, f"{'GPU' if target == 'cuda' else 'CPU'} serving environment for {plan.instance_type}")
    _dump(out_dir / FILES["endpoint"], "endpoint", {
        "name": endpoint,
        "auth_mode": "key",
        "description": "phi3local chat completions (POST /score, OpenAI-style body)",
    }, "managed online endpoint; `azure invoke` reads its key")
    _dump(out_dir / FILES["deployment"], "deployment", {
        "name": azure.deployment_name,
        "endpoint_name": endpoint,
        "model": f"azureml:{azure.model_name}:{model_version}",
        "environment": f"azureml:{env_name}:{env_version}",
        "code_configuration": {"code": CODE_DIR, "scoring_script": scoring_script},
        "instance_type": plan.instance_type,
        "instance_count": plan.instance_count,
        "request_settings": {
            "request_timeout_ms": plan.request_timeout_ms,
            "max_concurrent_requests_per_instance": plan.max_concurrent_requests_per_instance,
        },
        "liveness_probe": plan.liveness.to_yaml(),
        "readiness_probe": plan.readiness.to_yaml(),
        "environment_variables": plan.environment_variables,
        **({"data_collector": data_collector()} if getattr(azure, "collect_requests", False) else {}),
    }, "request_timeout_ms, probes and WORKER_COUNT are derived in spec.json (plan, measurements)")

    spec = Spec(out_dir, onnx_dir, {k: out_dir / v for k, v in FILES.items()}, code_dir, scoring_script,
                azure.model_name, model_version, env_name, env_version, endpoint, azure.deployment_name, plan,
                measurements, price_table=getattr(azure, "price_table", None))
    spec.entities = load_spec(out_dir)
    (out_dir / MARKER).write_text(json.dumps(spec.summary(), indent=2) + "\n", encoding="utf-8")
    return spec


def data_collector() -> dict[str, Any]:
    """The deployment's data_collector: score.py's collections (phi3local.serve.monitoring), redacted there."""
    return {"collections": {name: {"enabled": "True"} for name in ("model_inputs", "model_outputs")}}


def _relpath(path: Path, start: Path) -> str:
    import os

    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def plan_lines(spec: Spec) -> list[str]:
    """The derived values, one per line, for the command's output."""
    p, m = spec.plan, spec.measurements
    first = f", first token {m.first_token_ms:.0f} ms" if m.first_token_ms is not None else ""
    lines = [
        f"model        {spec.model_name}:{spec.model_version}  ({spec.onnx_dir})",
        f"environment  {spec.environment_name}:{spec.environment_version}  ({p.target} build)",
        f"endpoint     {spec.endpoint_name} / deployment {spec.deployment_name}: {p.instance_count} x {p.instance_type}",
        f"measured     {m.per_token_ms:.2f} ms/token{first}, model load {m.load_seconds:.1f} s  ({m.source})",
        f"timeout      request_timeout_ms {p.request_timeout_ms} (max_tokens {p.max_tokens})",
        f"concurrency  {p.max_concurrent_requests_per_instance} request(s)/instance = WORKER_COUNT {p.worker_count} "
        f"(one model copy each), {p.threads_per_worker} threads/worker; 429 beyond "
        f"{2 * p.max_concurrent_requests_per_instance * p.instance_count} in flight",
        f"probes       liveness after {p.liveness.initial_delay} s, readiness after {p.readiness.initial_delay} s, "
        f"every {p.liveness.period} s, {p.liveness.failure_threshold} failures allowed",
    ]
    lines += [f"note         {n}" for n in p.notes]
    estimate = instance_estimate(p.instance_type, p.instance_count, load_price_table(spec.price_table))
    lines += [f"{'instance' if i == 0 else '':<12} {line}" for i, line in enumerate(estimate.lines)]
    return lines
