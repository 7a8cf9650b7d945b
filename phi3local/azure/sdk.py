"""The Azure SDK packages, imported where a command first needs them: when one is missing, one line says how
to get the environment that has them (the Azure commands run from a virtual environment of their own:
azure-ai-ml and the inference server pin clashing opentelemetry versions, so the main one has no SDK).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from phi3local.errors import Phi3LocalError

# module -> the package that provides it (what `make install-azure` installs)
PACKAGES = {
    "azure.ai.ml": "azure-ai-ml",
    "azure.identity": "azure-identity",
    "azure.storage.blob": "azure-storage-blob",
    "azure.core": "azure-core",
}
REPO = Path(__file__).resolve().parents[2]


class AzureSdkMissing(Phi3LocalError, ImportError):
    """An Azure SDK package is not installed in this Python; the message says how to get the Azure venv."""


def missing_message(error: ImportError) -> str:
    """One line: which package this Python lacks (from the ImportError) and how to get the Azure venv."""
    name = getattr(error, "name", None) or ""
    package = next((pkg for module, pkg in PACKAGES.items() if name and (module == name or
                                                                        module.startswith(name + "."))),
                   "the Azure SDK")
    venv = REPO / ".venv-azure" / "bin" / "phi3local"
    if (REPO / "Makefile").is_file():  # a source checkout: the Makefile's target, then that venv's command
        how = f"run `make install-azure` in {REPO}, then `{venv} azure ...`"
    else:
        how = ("run `make install-azure` in a source checkout, or pip install azure-ai-ml azure-identity "
               "azure-storage-blob into a virtual environment of its own")
    return (f"{package} is not installed in this Python ({sys.prefix}: {error}); the Azure commands have a virtual "
            f"environment of their own: {how}")


def require(*modules: str) -> None:
    """Import each module (default: azure.ai.ml), or raise AzureSdkMissing naming the package and the fix."""
    for module in modules or ("azure.ai.ml",):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise AzureSdkMissing(missing_message(e)) from None
