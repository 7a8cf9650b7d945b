"""A real Azurite blob emulator for the tests: 127.0.0.1 only, a free port, in memory, stopped at the end.

Installed by `tools/install-azurite.sh` into the repo's ignored `.tools/` (or point AZURITE_BLOB at an
`azurite-blob` executable). Missing, it fails the tests that need it (it does not skip them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's published development account (https://learn.microsoft.com/azure/storage/common/storage-use-azurite).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_TIMEOUT_S = 30


@dataclass(frozen=True)
class Azurite:
    host: str
    port: int
    account: str = ACCOUNT
    key: str = ACCOUNT_KEY

    @property
    def account_url(self) -> str:
        return f"http://{self.host}:{self.port}/{self.account}"


def _azurite_bin() -> Path:
    path = Path(os.environ.get("AZURITE_BLOB") or AZURITE_BIN)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"Azurite is not installed (no executable at {path}): run tools/install-azurite.sh "
            "(needs Node >= 18 and npm), or set AZURITE_BLOB to an azurite-blob executable",
            pytrace=False,
        )
    if shutil.which("node") is None:
        pytest.fail("Azurite needs Node.js: `node` is not on PATH", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own process group (start_new_session): node and nothing else
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def start_azurite(workdir: Path, attempts: int = 3) -> tuple[Azurite, subprocess.Popen]:
    exe = _azurite_bin()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "azurite.log"
    for _ in range(attempts):
        port = _free_port()
        cmd = [
            str(exe), "--inMemoryPersistence", "--blobHost", "127.0.0.1", "--blobPort", str(port),
            "--skipApiVersionCheck", "--disableTelemetry", "--silent",  # no --location: refused with in-memory
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _listening(port):
                return Azurite("127.0.0.1", port), proc
            time.sleep(0.1)
        _stop(proc)  # exited (most likely the port was taken meanwhile) or too slow: try another port
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    pytest.fail(f"Azurite did not start listening on 127.0.0.1 within {START_TIMEOUT_S} s:\n{tail}", pytrace=False)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Azurite:
    """A running Azurite blob service (session-wide; every test uses its own container)."""
    server, proc = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        _stop(proc)
