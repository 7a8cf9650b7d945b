"""Upload a model folder (an ONNX export: a few small files and one large `model.onnx.data`) to Blob Storage.

Every file goes up as a block blob, in blocks staged in parallel and then committed:

- each block is sent with its Content-MD5, so the service rejects a block damaged on the way;
- block ids are `<index>-<md5 of the block>` (fixed length), so a block already staged by an interrupted
  push is reused only when it holds exactly the same bytes at the same place: a file changed since then
  (even with the same size and mtime) never reuses a stale block, and an unchanged one resends nothing
  it already sent. The blocks the blob has are read with `get_block_list("all")` before uploading;
- the whole-file MD5 is computed while reading and set at commit (`content_settings.content_md5`:
  Azure does not compute it for blobs made of blocks), then read back and compared;
- a file whose blob already has the same size and Content-MD5 is skipped.

Only the standard library, azure-storage-blob/azure-core and rich are used (the Azure virtual environment
has no torch). Errors meant for the user are `BlobUploadError` (a `Phi3LocalError`): one message naming the
account, container and blob, never the credential.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3local.azure.sdk import AzureSdkMissing, missing_message
from phi3local.errors import Phi3LocalError

try:
    from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        ResourceExistsError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.storage.blob import BlobBlock, BlobClient, BlobProperties, ContainerClient, ContentSettings
except ImportError as e:  # the main venv: one line naming `make install-azure`, not a traceback
    raise AzureSdkMissing(missing_message(e)) from None

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_BLOCK_SIZE = 8 * MiB
DEFAULT_MAX_CONCURRENCY = 4
# Azure limits: 50,000 committed blocks per blob, 4000 MiB per block, block ids of at most 64 bytes.
MAX_BLOCKS = 50_000
MAX_BLOCK_SIZE = 4000 * MiB
DEFAULT_EXCLUDE = (".lock",)

# Content types of the files an export holds; anything else is guessed from the suffix, else bytes.
CONTENT_TYPES = {
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".onnx": "application/octet-stream",
    ".data": "application/octet-stream",
    ".bin": "application/octet-stream",
    ".model": "application/octet-stream",
    ".safetensors": "application/octet-stream",
}

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes done, bytes total), from any thread, one call at a time, `done` never decreasing.
Done counts bytes the container holds: sent, found already staged, or in a skipped file."""

Credential = Any  # str (account key or SAS), AzureNamedKeyCredential, AzureSasCredential, TokenCredential, None


class BlobUploadError(Phi3LocalError):
    """An upload failed for a reason the user can act on (credentials, container, network, a changed file)."""

    def __init__(self, message: str, *, account: str | None = None, container: str | None = None, blob: str | None = None):
        super().__init__(message)
        self.account = account
        self.container = container
        self.blob = blob


class BlobIntegrityError(BlobUploadError):
    """The committed blob does not hold what was read locally (its Content-MD5 or size differs)."""


@dataclass
class FileReport:
    """One local file and what its push did."""

    path: str  # relative to the uploaded folder, with forward slashes
    blob_name: str
    size: int
    md5: str  # hex digest of the local file (= the blob's Content-MD5, base64-decoded)
    status: str  # "uploaded" or "skipped" (the blob already had this size and MD5)
    block_size: int = 0
    blocks_total: int = 0
    blocks_sent: int = 0
    blocks_reused: int = 0  # already staged (by an interrupted push) or committed, with the same bytes
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def content_md5(self) -> str:
        """The MD5 as Azure shows it (base64, the portal's and `az storage blob show`'s form)."""
        return base64.b64encode(bytes.fromhex(self.md5)).decode("ascii")


@dataclass
class UploadReport:
    """What `upload_folder` did: per-file results and the totals."""

    account: str
    container: str
    prefix: str
    files: list[FileReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files_uploaded(self) -> list[str]:
        return [f.path for f in self.files if f.status == "uploaded"]

    @property
    def files_skipped(self) -> list[str]:
        return [f.path for f in self.files if f.status == "skipped"]

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def bytes_sent(self) -> int:
        return sum(f.bytes_sent for f in self.files)

    @property
    def blocks_sent(self) -> int:
        return sum(f.blocks_sent for f in self.files)

    @property
    def blocks_reused(self) -> int:
        return sum(f.blocks_reused for f in self.files)

    @property
    def md5(self) -> dict[str, str]:
        """Relative path -> hex MD5 of every file (uploaded or skipped)."""
        return {f.path: f.md5 for f in self.files}

    @property
    def mib_per_s(self) -> float:
        """Bytes sent per second of the whole push (0 when nothing was sent)."""
        return self.bytes_sent / MiB / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "container": self.container,
            "prefix": self.prefix,
            "seconds": round(self.seconds, 3),
            "files_uploaded": self.files_uploaded,
            "files_skipped": self.files_skipped,
            "bytes_total": self.bytes_total,
            "bytes_sent": self.bytes_sent,
            "blocks_sent": self.blocks_sent,
            "blocks_reused": self.blocks_reused,
            "md5": self.md5,
            "files": [asdict(f) for f in self.files],
        }


# ---------------------------------------------------------------------------------------------------------
# Client


def make_container_client(
    account_url: str,
    container: str,
    credential: Credential = None,
    *,
    account_name: str | None = None,
    **client_kwargs: Any,
) -> ContainerClient:
    """A ContainerClient for `container` in the account at `account_url`.

    `account_url`: `https://<account>.blob.core.windows.net` on Azure, `http://127.0.0.1:<port>/devstoreaccount1`
    for Azurite. `credential`: a TokenCredential (e.g. `azure.identity.DefaultAzureCredential()`; the identity
    needs "Storage Blob Data Contributor"), an account key as a str (the account name is taken from the URL
    unless `account_name` is given), a SAS token as a str (recognised by its `sig=`), an AzureSasCredential or
    AzureNamedKeyCredential, or None when the URL carries a SAS. `client_kwargs` go to ContainerClient
    (e.g. `connection_timeout`, `read_timeout`, `retry_total`). The credential is never logged.
    """
    if not container:
        raise BlobUploadError("no container name given")
    if isinstance(credential, str):
        if "sig=" in credential:
            credential = AzureSasCredential(credential.lstrip("?"))
        elif account_name:
            credential = AzureNamedKeyCredential(account_name, credential)
    try:
        return ContainerClient(account_url, container, credential=credential, **client_kwargs)
    except ValueError as exc:  # a malformed URL, or a key whose account cannot be determined
        raise BlobUploadError(f"cannot use storage account URL {account_url!r} for container {container!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Progress


def rich_progress(console: Console | None = None, *, transient: bool = False) -> Progress:
    """A rich Progress with a bar, bytes done/total, bytes/s and time left; use as a context manager."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def progress_callback(progress: Progress, description: str = "upload") -> ProgressCallback:
    """A ProgressCallback that drives a new task of `progress` (from `rich_progress()`).

        with rich_progress() as progress:
            report = upload_folder(client, folder, prefix, progress=progress_callback(progress, "push"))
    """
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update


# ---------------------------------------------------------------------------------------------------------
# Local files


@dataclass(frozen=True)
class _LocalFile:
    path: Path
    rel: str
    blob_name: str
    size: int
    mtime_ns: int


def file_md5(path: str | os.PathLike, chunk: int = DEFAULT_BLOCK_SIZE) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            digest.update(data)
    return digest.hexdigest()


def block_size_for(size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """`block_size`, enlarged (to whole MiB) when the file would need more than Azure's 50,000 blocks."""
    if size > block_size * MAX_BLOCKS:
        block_size = -(-size // (MAX_BLOCKS * MiB)) * MiB
    if block_size > MAX_BLOCK_SIZE:
        raise BlobUploadError(f"a file of {size} bytes is too large for one block blob")
    return block_size


def block_id(index: int, block_md5_hex: str) -> str:
    """The id of block `index` holding bytes of this MD5: same length (38 characters) for every block.

    The SDK base64-encodes it on the wire and decodes it in `get_block_list`.
    """
    return f"{index:05d}-{block_md5_hex}"


def _blob_name(prefix: str, rel: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


def _content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CONTENT_TYPES:
        return CONTENT_TYPES[suffix]
    import mimetypes

    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def list_files(folder: str | os.PathLike, prefix: str = "", exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[_LocalFile]:
    """The regular files under `folder` (sorted, recursive) with their blob names; symbolic links are refused."""
    root = Path(folder)
    if root.is_symlink() or not root.is_dir():
        raise BlobUploadError(f"{root} is not a folder (a model folder to upload was expected)")
    patterns = tuple(exclude)
    found: list[_LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames.sort()
        for name in dirnames:
            if (here / name).is_symlink():
                raise BlobUploadError(f"{here / name} is a symbolic link; upload refuses links (copy the files instead)")
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns):
                continue
            if path.is_symlink():
                raise BlobUploadError(f"{path} is a symbolic link; upload refuses links (copy the file instead)")
            st = path.stat()
            if not path.is_file():
                raise BlobUploadError(f"{path} is not a regular file")
            blob_name = _blob_name(prefix, rel)
            if len(blob_name) > 1024:
                raise BlobUploadError(f"blob name too long (over 1024 characters): {blob_name[:80]}...")
            found.append(_LocalFile(path, rel, blob_name, st.st_size, st.st_mtime_ns))
    return found


# ---------------------------------------------------------------------------------------------------------
# Errors


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    line = str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__
    return line[:200]


def _user_error(exc: AzureError, account: str, container: str, blob: str | None, action: str) -> BlobUploadError:
    """One line for an Azure failure, naming the account, container and blob; no XML, no headers, no key."""
    where = f"storage account {account!r}, container {container!r}" + (f", blob {blob!r}" if blob else "")
    code = getattr(exc, "error_code", None) or ""
    code = str(getattr(code, "value", code))  # the SDK gives a StorageErrorCode enum or a str
    status = getattr(exc, "status_code", None)
    code_text = f" ({' '.join(str(x) for x in (status, code) if x)})" if (status or code) else ""
    if type(exc).__name__ == "AzureSigningError":  # the SDK could not sign with the key (not base64)
        msg = f"the account key given for storage account {account!r} is not a valid key (container {container!r})"
    elif isinstance(exc, ClientAuthenticationError) and status is None:  # no token (azure-identity)
        msg = (
            f"could not get an Azure token to {action} ({where}): {_first_line(exc)} — sign in (az login) or"
            " configure a managed identity, or use an account key or SAS"
        )
    elif status in (401, 403) or isinstance(exc, ClientAuthenticationError):
        msg = (
            f"Azure Storage refused access while trying to {action} ({where}){code_text}: {_first_line(exc)}"
            " — check that the account key or SAS belongs to this account (and the SAS allows read, write,"
            " list), or that the signed-in identity has the role 'Storage Blob Data Contributor' on it, and"
            " that the account's network rules admit this machine"
        )
    elif code == "ContainerNotFound" or (isinstance(exc, ResourceNotFoundError) and blob is None):
        msg = (
            f"container {container!r} does not exist in storage account {account!r}:"
            " create it first (or pass create_container=True)"
        )
    elif isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        msg = f"could not reach storage account {account!r} to {action} ({where}): {_first_line(exc)}"
    elif code == "InvalidBlobOrBlock":
        msg = (
            f"Azure Storage rejected a block while trying to {action} ({where}){code_text}: {_first_line(exc)}"
            " — the blob may hold uncommitted blocks from another tool; delete the blob and push again"
        )
    else:
        msg = f"Azure Storage error while trying to {action} ({where}){code_text}: {_first_line(exc)}"
    return BlobUploadError(msg, account=account, container=container, blob=blob)


# ---------------------------------------------------------------------------------------------------------
# Upload


class _Progress:
    """Bytes done across threads; calls the user's callback one call at a time."""

    def __init__(self, total: int, callback: ProgressCallback | None):
        self.total = total
        self.done = 0
        self._callback = callback
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._callback is not None:
                self._callback(self.done, self.total)


class _Uploader:
    def __init__(self, client: ContainerClient, block_size: int, max_concurrency: int, progress: _Progress):
        self.client = client
        self.account = client.account_name or "?"
        self.container = client.container_name
        self.block_size = block_size
        self.max_concurrency = max_concurrency
        self.progress = progress
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="blob-upload")
        # Blocks held in memory: those being sent plus the one being read.
        self.slots = threading.BoundedSemaphore(max_concurrency)

    def error(self, exc: AzureError, blob: str | None, action: str) -> BlobUploadError:
        return _user_error(exc, self.account, self.container, blob, action)

    # -- remote state

    def properties(self, blob: BlobClient) -> BlobProperties | None:
        try:
            return blob.get_blob_properties()
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "ContainerNotFound":
                raise self.error(exc, blob.blob_name, "read the blob's properties") from exc
            return None  # BlobNotFound: no blob yet
        except AzureError as exc:
            raise self.error(exc, blob.blob_name, "read the blob's properties") from exc

    def existing_blocks(self, blob: BlobClient) -> dict[str, int]:
        """Block id -> size of the blocks the blob holds, committed or staged (empty if there is no blob)."""
        try:
            committed, uncommitted = blob.get_block_list("all")
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "ContainerNotFound":
                raise self.error(exc, blob.blob_name, "list the blob's blocks") from exc
            return {}
        except AzureError as exc:
            raise self.error(exc, blob.blob_name, "list the blob's blocks") from exc
        return {b.id: b.size for b in [*committed, *uncommitted]}

    # -- one file

    def upload(self, f: _LocalFile, skip_unchanged: bool) -> FileReport:
        start = time.perf_counter()
        blob = self.client.get_blob_client(f.blob_name)
        if skip_unchanged:
            props = self.properties(blob)
            remote_md5 = props.content_settings.content_md5 if props is not None else None
            if props is not None and props.size == f.size and remote_md5:
                local_md5 = file_md5(f.path)
                if bytes.fromhex(local_md5) == bytes(remote_md5):
                    log.debug("skip %s: blob %s has the same size and MD5", f.rel, f.blob_name)
                    self.progress.add(f.size)
                    return FileReport(f.rel, f.blob_name, f.size, local_md5, "skipped", seconds=time.perf_counter() - start)

        block_size = block_size_for(f.size, self.block_size)
        n_blocks = -(-f.size // block_size)
        have = self.existing_blocks(blob) if n_blocks else {}
        report = FileReport(f.rel, f.blob_name, f.size, "", "uploaded", block_size=block_size, blocks_total=n_blocks)
        whole = hashlib.md5(usedforsecurity=False)
        ids: list[str] = []
        futures: list[Future] = []
        failed: list[BaseException] = []

        def stage(bid: str, data: bytes) -> None:
            try:
                blob.stage_block(bid, data, length=len(data), validate_content="md5")
            except AzureError as exc:
                raise self.error(exc, f.blob_name, "stage a block") from exc
            finally:
                self.slots.release()
            self.progress.add(len(data))

        def collect(fut: Future) -> None:
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                failed.append(exc)

        try:
            with open(f.path, "rb") as fh:
                for index in range(n_blocks):
                    want = min(block_size, f.size - index * block_size)
                    data = fh.read(want)
                    if len(data) != want:
                        raise self._changed(f)
                    whole.update(data)
                    bid = block_id(index, hashlib.md5(data, usedforsecurity=False).hexdigest())
                    ids.append(bid)
                    if have.get(bid) == want:
                        report.blocks_reused += 1
                        self.progress.add(want)
                        continue
                    self.slots.acquire()
                    if failed:
                        self.slots.release()
                        break
                    fut = self.pool.submit(stage, bid, data)
                    fut.add_done_callback(collect)
                    futures.append(fut)
                    report.blocks_sent += 1
                    report.bytes_sent += want
                    del data
            for fut in futures:
                fut.exception()  # wait for every block (errors are gathered by collect)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        if failed:
            raise failed[0]
        st = f.path.stat()
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            raise self._changed(f)

        md5 = whole.digest()
        report.md5 = md5.hex()
        try:
            blob.commit_block_list(
                [BlobBlock(block_id=bid) for bid in ids],
                content_settings=ContentSettings(content_type=_content_type(f.path), content_md5=bytearray(md5)),
            )
        except AzureError as exc:
            raise self.error(exc, f.blob_name, "commit the block list") from exc
        self.verify(blob, f, md5)
        report.seconds = time.perf_counter() - start
        log.debug("uploaded %s: %d blocks sent, %d reused", f.rel, report.blocks_sent, report.blocks_reused)
        return report

    def verify(self, blob: BlobClient, f: _LocalFile, md5: bytes) -> None:
        props = self.properties(blob)
        stored = props.content_settings.content_md5 if props is not None else None
        if props is None or props.size != f.size or stored is None or bytes(stored) != md5:
            got = "no blob" if props is None else f"size {props.size}, Content-MD5 {bytes(stored).hex() if stored else 'none'}"
            raise BlobIntegrityError(
                f"after upload, blob {f.blob_name!r} (storage account {self.account!r}, container {self.container!r})"
                f" does not match {f.path}: expected size {f.size}, MD5 {md5.hex()}; the service reports {got}",
                account=self.account,
                container=self.container,
                blob=f.blob_name,
            )

    def _changed(self, f: _LocalFile) -> BlobUploadError:
        return BlobUploadError(
            f"{f.path} changed while it was being uploaded (blob {f.blob_name!r} was not committed); push again once"
            " nothing writes to it",
            account=self.account,
            container=self.container,
            blob=f.blob_name,
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def check_container(client: ContainerClient, create: bool = False) -> None:
    """Fail early, with one clear message, when the container is missing or the credentials are refused."""
    account, container = client.account_name or "?", client.container_name
    try:
        if create:
            try:
                client.create_container()
                return
            except ResourceExistsError:
                return
        client.get_container_properties()
    except AzureError as exc:
        action = "create the container" if create else "open the container"
        raise _user_error(exc, account, container, None, action) from exc


def upload_folder(
    client: ContainerClient,
    folder: str | os.PathLike,
    prefix: str = "",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    progress: ProgressCallback | None = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    skip_unchanged: bool = True,
    create_container: bool = False,
) -> UploadReport:
    """Upload every file under `folder` to `<prefix>/<relative path>` in the container of `client`.

    Files go one after another, each in blocks of `block_size` bytes (8 MiB; enlarged for files over
    50,000 blocks) sent `max_concurrency` at a time (memory: about `max_concurrency` x `block_size`; above 10,
    requests' connection pool of 10 per host discards the extra connections after use, with a warning).
    A push interrupted in any way (Ctrl-C, kill -9, a lost network) resumes where it stopped: staged blocks
    are reused, only missing ones are sent. Files whose blob already has the same size and MD5 are skipped
    (`skip_unchanged=False` re-sends them). Files matching `exclude` (fnmatch on the relative path or the
    name) are left out. Raises BlobUploadError (or BlobIntegrityError) with a message for the user.
    """
    if block_size < 1 or block_size > MAX_BLOCK_SIZE:
        raise BlobUploadError(f"block size must be between 1 byte and 4000 MiB, not {block_size}")
    if max_concurrency < 1:
        raise BlobUploadError(f"max_concurrency must be at least 1, not {max_concurrency}")
    start = time.perf_counter()
    files = list_files(folder, prefix, exclude)
    check_container(client, create=create_container)
    tracker = _Progress(sum(f.size for f in files), progress)
    report = UploadReport(client.account_name or "?", client.container_name, prefix.strip("/"))
    if progress is not None:
        progress(0, tracker.total)
    uploader = _Uploader(client, block_size, max_concurrency, tracker)
    try:
        for f in files:
            report.files.append(uploader.upload(f, skip_unchanged))
    finally:
        uploader.close()
    report.seconds = time.perf_counter() - start
    return report


def iter_blobs(client: ContainerClient, prefix: str = "") -> Iterator[BlobProperties]:
    """The blobs under `prefix/` (for a listing after a push)."""
    prefix = prefix.strip("/")
    try:
        yield from client.list_blobs(name_starts_with=f"{prefix}/" if prefix else None)
    except AzureError as exc:
        raise _user_error(exc, client.account_name or "?", client.container_name, None, "list the blobs") from exc
