"""What an Azure ML deployment of the scoring script ships: its code files and its environment.

    code folder:   write_code_folder(dest) -> dest/phi3local/... (CodeConfiguration(code=dest,
                   scoring_script=SCORING_SCRIPT))
    environment:   environment_file("cpu" | "cuda") (Environment(image=..., conda_file=...))

The code is the few modules score.py imports (no torch, no transformers); tests/test_serve.py runs
score.py from such a folder with nothing else of phi3local importable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[2]
SCORING_SCRIPT = "phi3local/serve/score.py"
CODE_FILES = (
    "phi3local/__init__.py",
    "phi3local/errors.py",
    "phi3local/export/__init__.py",
    "phi3local/export/chat.py",
    "phi3local/export/json_files.py",
    "phi3local/serve/__init__.py",
    "phi3local/serve/errors.py",
    "phi3local/serve/settings.py",
    "phi3local/serve/model_dir.py",
    "phi3local/serve/protocol.py",
    "phi3local/serve/stops.py",
    "phi3local/serve/engine.py",
    "phi3local/serve/service.py",
    "phi3local/serve/monitoring.py",
    "phi3local/serve/guard.py",
    "phi3local/safety/__init__.py",
    "phi3local/safety/content_safety.py",
    SCORING_SCRIPT,
)
ENVIRONMENTS = {"cpu": "environment-cpu.yml", "cuda": "environment-cuda.yml"}


def write_code_folder(dest: str | Path) -> list[Path]:
    """Copy the scoring code into dest (created; files already there are replaced); returns the files."""
    dest = Path(dest)
    written = []
    for rel in CODE_FILES:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_PARENT / rel, target)
        written.append(target)
    return written


def environment_file(target: str = "cpu") -> Path:
    """The conda file of a deployment on `target` ("cpu": onnxruntime-genai, "cuda": onnxruntime-genai-cuda)."""
    if target not in ENVIRONMENTS:
        from phi3local.serve.errors import ServeError

        raise ServeError(f"target must be one of {', '.join(ENVIRONMENTS)}, got {target!r}")
    return Path(__file__).resolve().with_name(ENVIRONMENTS[target])
