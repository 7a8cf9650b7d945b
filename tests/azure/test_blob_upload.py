"""phi3local.azure.blob_upload against a real Azurite (tests/azure/azurite.py): MD5s, resume after kill -9,
skipping unchanged files, changed files, clear errors."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# The Azure SDKs live in .venv-azure (they clash with the serving stack): `make test` runs tests/azure there.
from azure.storage.blob import ContainerClient  # noqa: E402
from rich.console import Console

from phi3local.azure import blob_upload  # noqa: E402
from phi3local.azure.blob_upload import (  # noqa: E402
    BlobIntegrityError,
    BlobUploadError,
    make_container_client,
    upload_folder,
)
from phi3local.errors import Phi3LocalError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def md5_hex(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_model_folder(root: Path, big_mib: float, extra: bool = True) -> Path:
    """An ONNX-export-like folder: a big random model.onnx.data and small files."""
    root.mkdir(parents=True)
    (root / "model.onnx.data").write_bytes(os.urandom(int(big_mib * MiB)))
    (root / "genai_config.json").write_text(json.dumps({"model": {"type": "phi3", "context_length": 4096}}))
    if extra:
        (root / "model.onnx").write_bytes(os.urandom(300 * 1024))
        (root / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(2000)}}))
        (root / ".phi3local.json").write_text('{"stage": "export"}\n')
        (root / "sub").mkdir()
        (root / "sub" / "empty.txt").write_bytes(b"")
    return root


def rewrite_same_size_same_mtime(path: Path) -> None:
    """New random bytes of the same size, and the old mtime put back (so only the content tells)."""
    st = path.stat()
    path.write_bytes(os.urandom(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def container(azurite) -> ContainerClient:
    """A fresh container in Azurite for each test."""
    name = f"t{uuid.uuid4().hex[:16]}"
    client = make_container_client(azurite.account_url, name, azurite.key)
    client.create_container()
    return client


def uncommitted(client: ContainerClient, blob_name: str) -> list:
    try:
        return client.get_blob_client(blob_name).get_block_list("uncommitted")[1]
    except Exception:  # no blob yet
        return []


def assert_blobs_match(client: ContainerClient, folder: Path, prefix: str) -> None:
    local = sorted(p for p in folder.rglob("*") if p.is_file())
    remote = {b.name: b for b in client.list_blobs(name_starts_with=prefix + "/")}
    assert sorted(remote) == sorted(f"{prefix}/{p.relative_to(folder).as_posix()}" for p in local)
    for p in local:
        name = f"{prefix}/{p.relative_to(folder).as_posix()}"
        props = client.get_blob_client(name).get_blob_properties()
        assert props.size == p.stat().st_size, name
        assert props.content_settings.content_md5 is not None, f"{name}: no Content-MD5 stored"
        assert bytes(props.content_settings.content_md5).hex() == md5_hex(p), name


def test_push_stores_every_md5_and_size(container, tmp_path):
    folder = make_model_folder(tmp_path / "onnx", big_mib=40.3)
    seen: list[tuple[int, int]] = []
    report = upload_folder(container, folder, "models/phi3/v1", progress=lambda d, t: seen.append((d, t)))

    assert_blobs_match(container, folder, "models/phi3/v1")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert sorted(report.files_uploaded) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert report.files_skipped == []
    assert report.bytes_sent == report.bytes_total == total
    big = next(f for f in report.files if f.path == "model.onnx.data")
    assert big.blocks_total == big.blocks_sent == 6 and big.blocks_reused == 0  # 40.3 MiB in 8 MiB blocks
    assert report.md5 == {p.relative_to(folder).as_posix(): md5_hex(p) for p in folder.rglob("*") if p.is_file()}
    assert big.content_md5 == base64.b64encode(bytes.fromhex(big.md5)).decode()
    # the progress callback: starts at 0, never goes back, ends at the total
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    props = container.get_blob_client("models/phi3/v1/genai_config.json").get_blob_properties()
    assert props.content_settings.content_type == "application/json"
    mib = report.bytes_sent / MiB
    print(f"\n[blob_upload] {mib:.1f} MiB to Azurite in {report.seconds:.2f} s = {report.mib_per_s:.0f} MiB/s")


CHILD = r"""
import os, sys, time
from phi3local.azure.blob_upload import make_container_client, upload_folder
client = make_container_client(os.environ["T_ACCOUNT_URL"], os.environ["T_CONTAINER"], os.environ["T_KEY"])
def throttle(done, total):
    time.sleep(0.1)  # the callback runs after each staged block: at most ~10 blocks/s
upload_folder(client, sys.argv[1], sys.argv[2], block_size=1024 * 1024, max_concurrency=2, progress=throttle)
print("FINISHED")
"""


def test_resume_after_kill_sends_only_missing_blocks(azurite, container, tmp_path):
    folder = make_model_folder(tmp_path / "onnx", big_mib=24, extra=False)
    prefix, blob_name = "models/resume", "models/resume/model.onnx.data"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "T_ACCOUNT_URL": azurite.account_url, "T_CONTAINER": container.container_name, "T_KEY": azurite.key}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), prefix], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(uncommitted(container, blob_name)) < 5:
            if child.poll() is not None:
                out, err = child.communicate()
                pytest.fail(f"the uploading child ended before the kill (rc {child.returncode}):\n{out.decode()}{err.decode()}")
            assert time.monotonic() < deadline, "the child staged no 5 blocks within 30 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    # the list, once no request of the dead child can still land
    staged = uncommitted(container, blob_name)
    while True:
        time.sleep(0.3)
        again = uncommitted(container, blob_name)
        if len(again) == len(staged):
            break
        staged = again
    total_blocks = 24
    assert 5 <= len(staged) < total_blocks
    assert all(b.size == MiB for b in staged)

    report = upload_folder(container, folder, prefix, block_size=MiB, max_concurrency=2)

    big = next(f for f in report.files if f.path == "model.onnx.data")
    assert report.files_skipped == ["genai_config.json"]  # committed by the child before the big file
    assert big.blocks_total == total_blocks
    assert big.blocks_reused == len(staged) > 0
    assert big.blocks_sent == total_blocks - len(staged)
    assert big.bytes_sent == (total_blocks - len(staged)) * MiB
    assert_blobs_match(container, folder, prefix)
    print(f"\n[blob_upload] killed after {len(staged)} of {total_blocks} blocks staged;"
          f" resume sent {big.blocks_sent}, reused {big.blocks_reused}")


def test_second_push_uploads_nothing(container, tmp_path):
    folder = make_model_folder(tmp_path / "onnx", big_mib=12)
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    with blob_upload.rich_progress(console) as progress:  # the CLI's bar, here into a string
        first = upload_folder(container, folder, "m", progress=blob_upload.progress_callback(progress, "push m"))
        task = progress.tasks[0]
        assert task.completed == task.total == first.bytes_total
    assert "push m" in console.file.getvalue()
    seen: list[tuple[int, int]] = []
    second = upload_folder(container, folder, "m", progress=lambda d, t: seen.append((d, t)))
    assert second.bytes_sent == 0 and second.blocks_sent == 0 and second.blocks_reused == 0
    assert second.files_uploaded == []
    assert sorted(second.files_skipped) == sorted(first.files_uploaded)
    assert second.md5 == first.md5
    assert seen[-1] == (first.bytes_total, first.bytes_total)
    assert_blobs_match(container, folder, "m")


class Interrupt(Exception):
    pass


def test_changed_file_is_reuploaded_without_stale_blocks(container, tmp_path):
    folder = make_model_folder(tmp_path / "onnx", big_mib=6, extra=False)
    data = folder / "model.onnx.data"
    blob_name = "m/model.onnx.data"
    upload_folder(container, folder, "m", block_size=MiB)  # v1 committed

    # v2, same size and mtime: a push interrupted after 3 blocks leaves v2 blocks staged
    rewrite_same_size_same_mtime(data)
    calls = []

    def interrupt_after_3_blocks(done, total):
        calls.append(done)
        if len(calls) > 4:  # the first call is (0, total); genai_config.json is skipped: one call
            raise Interrupt

    with pytest.raises(Interrupt):
        upload_folder(container, folder, "m", block_size=MiB, max_concurrency=1, progress=interrupt_after_3_blocks)
    assert len(uncommitted(container, blob_name)) >= 3

    # v3, same size and mtime again: neither the committed v1 nor the staged v2 blocks may be used
    rewrite_same_size_same_mtime(data)
    report = upload_folder(container, folder, "m", block_size=MiB)
    f = next(f for f in report.files if f.path == "model.onnx.data")
    assert f.status == "uploaded"
    assert f.blocks_reused == 0 and f.blocks_sent == 6 and f.bytes_sent == 6 * MiB
    assert report.files_skipped == ["genai_config.json"]
    assert_blobs_match(container, folder, "m")
    assert uncommitted(container, blob_name) == []  # the commit dropped the stale v2 blocks

    # only the last MiB changes: the five unchanged committed blocks are reused, one is sent
    with open(data, "r+b") as fh:
        fh.seek(5 * MiB)
        fh.write(os.urandom(MiB))
    report = upload_folder(container, folder, "m", block_size=MiB)
    f = next(f for f in report.files if f.path == "model.onnx.data")
    assert (f.blocks_reused, f.blocks_sent) == (5, 1)
    assert_blobs_match(container, folder, "m")


def test_wrong_key_and_missing_container_give_one_clear_message(azurite, container, tmp_path):
    folder = make_model_folder(tmp_path / "onnx", big_mib=1, extra=False)
    wrong_key = base64.b64encode(b"not the key" * 6).decode()

    bad = make_container_client(azurite.account_url, container.container_name, wrong_key)
    with pytest.raises(BlobUploadError) as err:
        upload_folder(bad, folder, "m")
    msg = str(err.value)
    assert isinstance(err.value, Phi3LocalError)
    assert "refused access" in msg and "'devstoreaccount1'" in msg and repr(container.container_name) in msg
    for noise in ("Traceback", "<?xml", "RequestId", "ErrorCode:", "\n", wrong_key, azurite.key):
        assert noise not in msg
    assert (err.value.account, err.value.container) == ("devstoreaccount1", container.container_name)

    not_base64 = make_container_client(azurite.account_url, container.container_name, "not a key!")
    with pytest.raises(BlobUploadError, match="'devstoreaccount1' is not a valid key"):
        upload_folder(not_base64, folder, "m")

    missing = make_container_client(azurite.account_url, "no-such-container", azurite.key)
    with pytest.raises(BlobUploadError) as err:
        upload_folder(missing, folder, "m")
    msg = str(err.value)
    assert "container 'no-such-container' does not exist in storage account 'devstoreaccount1'" in msg
    for noise in ("Traceback", "<?xml", "RequestId", "\n", azurite.key):
        assert noise not in msg

    # nothing was written by the refused pushes
    assert list(container.list_blobs()) == []

    # create_container=True makes it instead
    report = upload_folder(missing, folder, "m", create_container=True)
    assert len(report.files_uploaded) == 2
    missing.delete_container()


def test_md5_mismatch_after_commit_is_an_error(container, tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path / "onnx", big_mib=1, extra=False)
    real = blob_upload.ContentSettings

    def wrong_md5(**kw):
        kw["content_md5"] = bytearray(hashlib.md5(b"something else").digest())
        return real(**kw)

    monkeypatch.setattr(blob_upload, "ContentSettings", wrong_md5)
    with pytest.raises(BlobIntegrityError) as err:
        upload_folder(container, folder, "m")
    assert "does not match" in str(err.value) and "m/genai_config.json" in str(err.value)
    monkeypatch.setattr(blob_upload, "ContentSettings", real)
    # the wrong MD5 stored is not taken for "unchanged": the next push re-uploads and fixes it
    report = upload_folder(container, folder, "m")
    assert sorted(report.files_uploaded) == ["genai_config.json", "model.onnx.data"]
    assert_blobs_match(container, folder, "m")
