"""What an Azure ML deployment of the scoring script ships: this package, whole, and its environment.

    code folder:   write_code_folder(dest) -> dest/phi3local/serve/... (CodeConfiguration(code=dest,
                   scoring_script=SCORING_SCRIPT))
    environment:   environment_file("cpu" | "cuda") (Environment(image=..., conda_file=...))

phi3local.serve is the serving runtime: everything score.py runs (protocol, service, engine, the ONNX chat
model, stops, settings, monitoring, the Content Safety guard) and nothing that needs torch or transformers.
Its modules import only each other and `phi3local.errors` (the base class the CLI prints as one line), so
the code folder is that package plus its parent's two files: there is no list of modules to keep up to date.
A module added to phi3local.serve ships by being there; an import from elsewhere in phi3local is refused
when the spec is written (phi3local.azure.spec.check_code_folder) and by tests/test_serve.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_PARENT = PACKAGE_DIR.parents[1]  # the folder holding phi3local/
PACKAGE = "phi3local.serve"
SCORING_SCRIPT = "phi3local/serve/score.py"
# Outside the package, the code folder needs the parent package's __init__.py (to import phi3local.serve at
# all) and phi3local.errors (Phi3LocalError, the one base of every error the package raises on purpose).
PARENT_FILES = ("phi3local/__init__.py", "phi3local/errors.py")
ENVIRONMENTS = {"cpu": "environment-cpu.yml", "cuda": "environment-cuda.yml"}
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")


def write_code_folder(dest: str | Path) -> list[Path]:
    """Copy the serving runtime into dest (created; an earlier copy of the package is replaced); returns the
    files written."""
    dest = Path(dest)
    package = dest / PACKAGE_DIR.relative_to(PACKAGE_PARENT)
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(PACKAGE_DIR, package, ignore=_SKIP)
    for rel in PARENT_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_PARENT / rel, dest / rel)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def module_names() -> list[str]:
    """Every module of the runtime package, as importable names (phi3local.serve, phi3local.serve.score, ...)."""
    names = [PACKAGE]
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts or path.name == "__init__.py":
            continue
        names.append(".".join((PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts)))
    return names


def environment_file(target: str = "cpu") -> Path:
    """The conda file of a deployment on `target` ("cpu": onnxruntime-genai, "cuda": onnxruntime-genai-cuda)."""
    if target not in ENVIRONMENTS:
        from phi3local.serve.errors import ServeError

        raise ServeError(f"target must be one of {', '.join(ENVIRONMENTS)}, got {target!r}")
    return PACKAGE_DIR / ENVIRONMENTS[target]
