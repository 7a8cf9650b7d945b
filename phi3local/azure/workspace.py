"""Connecting to the Azure ML workspace: which one (flags, a portal config.json, the recipe), the client, and
one-line errors for the Azure calls.

Credentials come only from `azure.identity.DefaultAzureCredential` (environment, managed identity, the
Azure CLI's `az login`, ...): nothing here writes or logs a credential, a token or a storage key. A storage
key the workspace's datastore hands out (`listSecrets`) is kept in memory for the upload and dropped.

Every Azure call of the package goes through `azure_call("what it does")`, which turns the SDK's exceptions
into an `AzureOperationError` (a Phi3LocalError): the operation, the HTTP status, the service's error code
and message on one line, and what to try.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3local.errors import Phi3LocalError

if TYPE_CHECKING:
    from azure.ai.ml import MLClient

ARM_SCOPE = "https://management.azure.com/.default"
CONFIG_NAMES = ("config.json", ".azureml/config.json")  # where Azure ML's own from_config looks


class WorkspaceError(Phi3LocalError):
    """The workspace is not named completely, or its config.json cannot be used."""

    exit_code = 2


class AzureOperationError(Phi3LocalError):
    """An Azure call failed; the message names the operation, the status and the service's reason."""

    def __init__(self, message: str, *, operation: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.code = code


@dataclass(frozen=True)
class WorkspaceRef:
    subscription_id: str
    resource_group: str
    workspace_name: str
    source: str  # where the names came from, for messages

    def __str__(self) -> str:
        return f"{self.workspace_name} (resource group {self.resource_group}, subscription {self.subscription_id})"


def read_config_json(path: str | Path) -> dict[str, str]:
    """The workspace names of a config.json as the Azure ML portal downloads it."""
    path = Path(path)
    if not path.is_file():
        raise WorkspaceError(f"{path}: no such file (download it from the workspace's page in the Azure portal, "
                             "'Download config.json')")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkspaceError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise WorkspaceError(f"{path}: expected a JSON object with subscription_id, resource_group, workspace_name")
    # The portal writes workspace_name; older files and the SDK also accept "workspace".
    out = {"subscription_id": data.get("subscription_id"), "resource_group": data.get("resource_group"),
           "workspace_name": data.get("workspace_name") or data.get("workspace")}
    for key, value in out.items():
        if value is not None and not isinstance(value, str):
            raise WorkspaceError(f"{path}: {key} must be a string, got {value!r}")
    return {k: v for k, v in out.items() if v}


def find_config_json(start: Path | None = None) -> Path | None:
    """./config.json or ./.azureml/config.json in the working folder or one of its parents (as the SDK does)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def resolve_workspace(azure_cfg: Any = None, *, subscription_id: str | None = None, resource_group: str | None = None,
                      workspace: str | None = None, config_file: str | Path | None = None,
                      search: bool = True) -> WorkspaceRef:
    """The workspace to use: flags first, then config.json (given, or found like the SDK), then the recipe."""
    sources: list[str] = []
    names: dict[str, str | None] = {"subscription_id": None, "resource_group": None, "workspace_name": None}
    if azure_cfg is not None:
        recipe = {"subscription_id": azure_cfg.subscription_id, "resource_group": azure_cfg.resource_group,
                  "workspace_name": azure_cfg.workspace}
        if any(recipe.values()):
            sources.append("recipe azure section")
        names.update({k: v for k, v in recipe.items() if v})
    path = Path(config_file) if config_file else (find_config_json() if search else None)
    if path is not None:
        found = read_config_json(path)
        if found:
            sources.append(str(path))
        names.update(found)
    flags = {"subscription_id": subscription_id, "resource_group": resource_group, "workspace_name": workspace}
    if any(flags.values()):
        sources.append("flags")
    names.update({k: v for k, v in flags.items() if v})
    missing = [k for k, v in names.items() if not v]
    if missing:
        flag = {"subscription_id": "--subscription", "resource_group": "--resource-group", "workspace_name": "--workspace"}
        raise WorkspaceError(
            f"the Azure ML workspace is not fully named: missing {', '.join(missing)} (give "
            f"{', '.join(flag[m] for m in missing)}, or --config config.json as the portal downloads it, "
            "or azure.subscription_id / azure.resource_group / azure.workspace in the recipe)")
    return WorkspaceRef(names["subscription_id"], names["resource_group"], names["workspace_name"],  # type: ignore[arg-type]
                        " + ".join(sources) or "?")


def default_credential() -> Any:
    """DefaultAzureCredential without the interactive browser (a CLI must not hang waiting for a login)."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def connect(ref: WorkspaceRef, credential: Any = None, **client_kwargs: Any) -> MLClient:
    """An MLClient of the workspace. It sends nothing until used; `client_kwargs` (e.g. `transport=`) go to it."""
    from azure.ai.ml import MLClient

    return MLClient(credential or default_credential(), ref.subscription_id, ref.resource_group,
                    ref.workspace_name, **client_kwargs)


def registry_client(registry: str = "azureml", credential: Any = None, **client_kwargs: Any) -> MLClient:
    """An MLClient of a model registry (the `azureml` registry holds the models Azure fine-tunes)."""
    from azure.ai.ml import MLClient

    return MLClient(credential or default_credential(), registry_name=registry, **client_kwargs)


# ------------------------------------------------------------------------------------------ errors

_HINTS = {
    401: "the credential was refused: sign in again (`az login`) or check AZURE_* environment variables",
    403: "your identity lacks a role on the workspace (e.g. AzureML Data Scientist, or Contributor)",
    404: "check the subscription, resource group and workspace names (and the region of the resource)",
    429: "Azure is throttling requests: wait a minute and run it again",
}


def _service_error(e: Any) -> tuple[str | None, str]:
    error = getattr(e, "error", None)
    code = getattr(error, "code", None) if error is not None else None
    message = getattr(error, "message", None) if error is not None else None
    if not message:
        message = str(getattr(e, "message", None) or e)
    # The SDK's messages repeat the code and add "Code:/Message:" lines; the first meaningful line is enough.
    text = re.sub(r"^\(\w+\)\s*", "", message.strip()).splitlines()[0] if message.strip() else type(e).__name__
    return code, text


def _hint(status: int | None, code: str | None, text: str) -> str | None:
    lowered = f"{code or ''} {text}".lower()
    if "quota" in lowered:
        return ("not enough quota for this VM size in the workspace's region: request more quota (Azure portal, "
                "Quotas) or choose another azure.instance_type")
    if status == 409:
        return "a conflicting resource or operation exists: wait for the running operation to finish, or use another name"
    if status is not None and status >= 500:
        return "Azure failed on its side (the SDK already retried): try again later"
    return _HINTS.get(status) if status is not None else None


def translate(e: BaseException, operation: str, failed_hint: str | None = None) -> AzureOperationError:
    """The one-line AzureOperationError of an SDK exception raised while doing `operation`.

    failed_hint: what to say when a long-running operation was accepted and then ended Failed (its error
    arrives with the poll's 200, which is no HTTP failure to show)."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    if isinstance(e, ClientAuthenticationError) and getattr(e, "status_code", None) is None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return AzureOperationError(
            f"{operation} failed: no usable Azure credential ({first[:300]}); sign in with `az login`, or set "
            "AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET, or run where a managed identity is available",
            operation=operation)
    if isinstance(e, HttpResponseError):
        status = e.status_code
        code, text = _service_error(e)
        if status is None or status < 400:
            hint = failed_hint
            where = f"{code or 'Failed'}"
            return AzureOperationError(f"{operation} failed: {where}: {text}" + (f" ({hint})" if hint else ""),
                                       operation=operation, status=None, code=code)
        hint = _hint(status, code, text)
        where = f"{status} {code}" if code else f"{status}"
        return AzureOperationError(f"{operation} failed: {where}: {text}" + (f" ({hint})" if hint else ""),
                                   operation=operation, status=status, code=code)
    if isinstance(e, ServiceRequestError):
        return AzureOperationError(f"{operation} failed: could not reach Azure ({str(e).splitlines()[0][:300]}); "
                                   "check the network or proxy", operation=operation)
    # azure.ai.ml's own exceptions (ValidationException, MlException, ...) carry a message for the user.
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return AzureOperationError(f"{operation} failed: {text[0] if text else type(e).__name__}", operation=operation)


@contextlib.contextmanager
def azure_call(operation: str, failed_hint: str | None = None) -> Iterator[None]:
    """Run Azure calls; any Azure or SDK exception becomes an AzureOperationError naming `operation`."""
    from azure.core.exceptions import AzureError

    try:
        yield
    except Phi3LocalError:
        raise
    except AzureError as e:
        raise translate(e, operation, failed_hint) from e
    except Exception as e:
        # The SDK raises its own MlException family (and marshmallow errors) outside azure.core's tree.
        if type(e).__module__.startswith(("azure.", "marshmallow")):
            raise translate(e, operation, failed_hint) from e
        raise


# ------------------------------------------------------------------------------------------ datastore

@dataclass(frozen=True)
class BlobTarget:
    """Where a workspace datastore keeps its blobs, and a credential to write them (held in memory only)."""

    datastore: str
    account_name: str
    container_name: str
    account_url: str
    credential: Any = None

    def __repr__(self) -> str:  # never show the credential
        return f"BlobTarget({self.datastore}: {self.account_url}/{self.container_name})"

    def datastore_uri(self, prefix: str) -> str:
        """The azureml:// URI of a folder under this datastore, as assets and job inputs take it."""
        return f"azureml://datastores/{self.datastore}/paths/{prefix.strip('/')}/"

    def blob_url(self, prefix: str) -> str:
        return f"{self.account_url.rstrip('/')}/{self.container_name}/{prefix.strip('/')}"


def blob_target(ml_client: MLClient, datastore: str, credential: Any = None, account_url: str | None = None) -> BlobTarget:
    """The blob container behind `datastore` and how to write to it.

    A datastore with a stored account key or SAS (the default workspaceblobstore has a key) gives that
    secret through `listSecrets`, as the SDK's own uploads do; an identity-based one uses `credential`
    (DefaultAzureCredential: the identity then needs Storage Blob Data Contributor on the account).
    `account_url` replaces https://<account>.blob.<endpoint> (an emulator in tests).
    """
    with azure_call(f"read datastore {datastore}"):
        store = ml_client.datastores.get(datastore, include_secrets=True)
    if getattr(store, "type", None) not in ("azure_blob", "AzureBlob") or not getattr(store, "container_name", None):
        raise AzureOperationError(f"datastore {datastore} is a {getattr(store, 'type', '?')} datastore, not Azure "
                                  "Blob: set azure.datastore to a blob datastore (workspaceblobstore is one)",
                                  operation=f"read datastore {datastore}")
    creds = getattr(store, "credentials", None)
    secret = getattr(creds, "account_key", None) or getattr(creds, "sas_token", None)
    protocol = getattr(store, "protocol", None) or "https"
    endpoint = getattr(store, "endpoint", None) or "core.windows.net"
    url = account_url or f"{protocol}://{store.account_name}.blob.{endpoint}"
    return BlobTarget(datastore, store.account_name, store.container_name, url, secret or credential or default_credential())


def container_client(target: BlobTarget) -> Any:
    """A ContainerClient writing to the target (blob_upload's helper; the key, if any, stays in memory)."""
    from phi3local.azure.blob_upload import make_container_client

    return make_container_client(target.account_url, target.container_name, target.credential,
                                 account_name=target.account_name)


def upload_to_datastore(target: BlobTarget, folder: Path, prefix: str, *, console: Any = None,
                        upload_fn: Any = None, client_factory: Any = None, description: str = "upload") -> Any:
    """Upload `folder` to `prefix/` of the target with a progress bar (bytes/s); returns blob_upload's report.

    Unchanged files already there are skipped and an interrupted upload resumes (blob_upload). `upload_fn`
    and `client_factory` replace blob_upload.upload_folder and `container_client` (tests)."""
    from phi3local.azure import blob_upload

    upload_fn = upload_fn or blob_upload.upload_folder
    client = (client_factory or container_client)(target)
    with blob_upload.rich_progress(console, transient=False) as progress:
        return upload_fn(client, folder, prefix, progress=blob_upload.progress_callback(progress, description))
