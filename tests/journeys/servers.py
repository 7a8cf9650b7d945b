"""`phi3local serve` as a journey's user leaves it running: from their shell, on a free loopback port, until the
journey is done with it."""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.journeys.conftest import User

READY_S = 60
STOP_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(user: User, model_dir: str, log: Path) -> Iterator[int]:
    """`phi3local serve MODEL_DIR --port PORT` in the user's folder, its output in `log`; yields the port once
    `/` answers 200. On leaving it gets SIGTERM, and must stop within STOP_S (else it is killed and that fails)."""
    port = free_port()
    server = user.start(shlex.join([user.script, "serve", model_dir, "--port", str(port)]), log)
    try:
        deadline = time.monotonic() + READY_S
        while True:
            assert server.poll() is None, f"serve exited with {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve not ready after {READY_S} s:\n{log.read_text()}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired as e:
            server.kill()
            server.wait()
            raise AssertionError(f"serve did not stop within {STOP_S} s of SIGTERM:\n{log.read_text()}") from e
