"""The Azure venv has no torch, transformers or Hugging Face Hub: the Azure commands, the CLI's registration
and the serving runtime (phi3local.serve, what a deployment ships) import here as they are."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "huggingface_hub")

IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
from phi3local.serve import bundle
import phi3local.azure

names = [f"phi3local.azure.{m.name}" for m in pkgutil.iter_modules(phi3local.azure.__path__)]
names += bundle.module_names()
result = {"imported": [], "missing": {}}
for name in names:
    try:
        importlib.import_module(name)
        result["imported"].append(name)
    except ModuleNotFoundError as e:
        result["missing"][name] = e.name
from phi3local import cli

cli.build_parser()
result["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "huggingface_hub"})
print(json.dumps(result))
"""


def _serving_requirements() -> set[str]:
    """The import names of what the deployment's conda file installs (the serving stack, not this venv's)."""
    from phi3local.serve import bundle

    env = yaml.safe_load(bundle.environment_file("cpu").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    names = {re.split(r"[<>=\[ ]", line)[0].strip().lower().replace("-", "_") for line in pip}
    return names | {"azureml", "flask", "werkzeug"}  # azureml-* packages share the azureml namespace


def test_torch_transformers_and_the_hub_are_really_absent_here():
    assert [m for m in HEAVY if importlib.util.find_spec(m) is not None] == []


def test_every_azure_module_and_the_runtime_import_without_torch():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=180, cwd=REPO,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    azure = [n for n in result["imported"] if n.startswith("phi3local.azure.")]
    assert {"phi3local.azure.commands", "phi3local.azure.spec", "phi3local.azure.blob_upload",
            "phi3local.azure.jobs", "phi3local.azure.deploy"} <= set(azure)
    assert not [n for n in result["missing"] if n.startswith("phi3local.azure")], result["missing"]
    # A runtime module may lack only what the deployment's own environment installs (numpy, onnxruntime-genai,
    # the inference server): never torch or anything else this venv does not have on purpose.
    allowed = _serving_requirements()
    lacking = {name: module for name, module in result["missing"].items()
               if module.split(".")[0].lower() not in allowed}
    assert lacking == {}
    assert {"phi3local.serve.protocol", "phi3local.serve.stops", "phi3local.serve.settings",
            "phi3local.serve.bundle", "phi3local.serve.content_safety"} <= set(result["imported"])
