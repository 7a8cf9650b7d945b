"""Commands the CLI tells the user to run next, written so they run as printed from where the user stands.

A hint repeats the program the way the user started it: `phi3local` when that name on PATH is this very
program (an activated venv), else the path they typed (`.venv/bin/phi3local`, `/abs/.venv/bin/phi3local`), or
`python -m phi3local`. Arguments (recipe paths, overrides) are the user's own, quoted for a POSIX shell. A hint
is printed unwrapped whatever the terminal's width, so it can be copied in one piece.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAME = "phi3local"


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def program(argv0: str | None = None) -> str:
    """The words that start this program again, from the current folder, in a fresh shell or this one."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    name = Path(argv0).name
    if name == "__main__.py" and Path(argv0).parent.name == NAME:  # python -m phi3local
        python = shutil.which("python3")
        exe = "python3" if python and _same_file(python, sys.executable) else shlex.quote(sys.executable)
        return f"{exe} -m {NAME}"
    if name != NAME:  # in-process (`python -m phi3local.demo_report`, a notebook): this interpreter's script
        return _script_beside_interpreter()
    on_path = shutil.which(NAME)
    if on_path and _same_file(on_path, argv0):
        return NAME
    return shlex.quote(argv0)


def _script_beside_interpreter() -> str:
    """The venv's own console script: `phi3local` when PATH finds it, else its path (relative below the cwd)."""
    script = Path(sys.executable).parent / NAME
    if not script.is_file():
        return NAME
    on_path = shutil.which(NAME)
    if on_path and _same_file(on_path, script):
        return NAME
    absolute = Path(os.path.abspath(script))
    try:
        return shlex.quote(str(absolute.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(absolute))


def command(*words: str | os.PathLike, args: Sequence[str | os.PathLike] = ()) -> str:
    """`program() word ...`: a whole command line, each word quoted as the shell needs it."""
    parts = [str(w) for w in (*words, *args)]
    return " ".join([program(), *(shlex.quote(p) for p in parts)])


def print_next(console: Any, cmd: str, label: str = "next:") -> None:
    """`next: CMD` on one line that is never wrapped (soft wrap), without markup or highlighting in CMD."""
    from rich.text import Text

    line = Text(f"{label} ", style="cyan")
    line.append(cmd, style="bold")
    console.print(line, soft_wrap=True, highlight=False)
