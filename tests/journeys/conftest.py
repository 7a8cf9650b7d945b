"""Journeys: the product run the way the README tells a user to run it.

The installed console script (`.venv/bin/phi3local`, `.venv-azure/bin/phi3local`) as a subprocess, from a
folder outside the checkout, with an environment that holds none of the developers' state: an empty
PHI3LOCAL_CACHE and Hugging Face home, no PYTHONPATH, PATH without the venv (a fresh shell) unless a journey
activates it, NO_COLOR, and a terminal width the journey picks. Nothing in the output may be a traceback, and
every `next:` command the CLI prints runs as printed, in the same folder and shell environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
MAIN_BIN = Path(sys.executable).parent  # the venv this suite runs in: the README's .venv
AZURE_BIN = REPO / ".venv-azure" / "bin"
NEXT_LINE = re.compile(r"^\s*next:\s+(?P<cmd>\S.*?)\s*$", re.MULTILINE)


@dataclass
class Result:
    args: list[str]
    cwd: Path
    returncode: int
    out: str  # stdout and stderr together, as a terminal shows them

    def ok(self) -> Result:
        assert self.returncode == 0, f"{shlex.join(self.args)} (in {self.cwd}) exited {self.returncode}:\n{self.out}"
        return self.clean()

    def failed(self, code: int | None = None) -> Result:
        assert self.returncode != 0, f"{shlex.join(self.args)} should have failed:\n{self.out}"
        if code is not None:
            assert self.returncode == code, f"exit {self.returncode}, expected {code}:\n{self.out}"
        return self.clean()

    def clean(self) -> Result:
        assert "Traceback" not in self.out, f"{shlex.join(self.args)} printed a traceback:\n{self.out}"
        return self

    def next_commands(self) -> list[str]:
        return [m.group("cmd") for m in NEXT_LINE.finditer(self.out)]


class User:
    """One user at a shell: a home folder outside the checkout, a fresh environment, a terminal width."""

    def __init__(self, home: Path, columns: int = 60, activated: bool = False, venv_bin: Path = MAIN_BIN):
        self.home = home
        self.cwd = home / "work"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.venv_bin = venv_bin
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
                if p and Path(p).resolve() not in (MAIN_BIN.resolve(), AZURE_BIN.resolve())]
        if activated:
            path.insert(0, str(venv_bin))
        self.env = {
            "PATH": os.pathsep.join(path), "HOME": str(home), "LANG": "C.UTF-8",
            "PHI3LOCAL_CACHE": str(home / "cache" / "phi3local"), "HF_HOME": str(home / "cache" / "huggingface"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "NO_COLOR": "1", "COLUMNS": str(columns), "TERM": "dumb", "OMP_NUM_THREADS": "2",
            "TMPDIR": str(home / "tmp"),
        }
        (home / "tmp").mkdir(exist_ok=True)
        self.script = str(venv_bin / "phi3local")  # the absolute path a user copies from the README's .venv

    def run(self, *args: str | os.PathLike, program: str | None = None, timeout: float = 600,
            cwd: Path | None = None, env: dict | None = None) -> Result:
        argv = [program or self.script, *map(str, args)]
        return self.shell(shlex.join(argv), timeout=timeout, cwd=cwd, env=env)

    def shell(self, line: str, timeout: float = 600, cwd: Path | None = None, env: dict | None = None) -> Result:
        """A command line as the user types it (a printed hint, say), through bash."""
        cwd = cwd or self.cwd
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env={**self.env, **(env or {})}, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
        return Result(["bash", "-c", line], cwd, proc.returncode, proc.stdout)

    def start(self, line: str, log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """A command line left running (to be interrupted as a user presses Ctrl-C), its output in `log`.

        `exec` makes the command itself the process that gets the signal, as in an interactive shell.
        """
        with open(log, "w") as out:
            return subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=cwd or self.cwd, env=self.env, text=True,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def user(tmp_path) -> User:
    """A user whose shell has not activated the venv: they call `/abs/.venv/bin/phi3local`."""
    assert (MAIN_BIN / "phi3local").is_file(), f"no console script in {MAIN_BIN}: run `make install`"
    return User(tmp_path / "user")


@pytest.fixture
def azure_user(tmp_path) -> User:
    """A user of the Azure venv (`make install-azure`), calling `.venv-azure/bin/phi3local`."""
    assert (AZURE_BIN / "phi3local").is_file(), f"no console script in {AZURE_BIN}: run `make install-azure`"
    return User(tmp_path / "azure-user", venv_bin=AZURE_BIN)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"journeys need the shared artifacts at {SHARED_DATA}"
    return SHARED_DATA
