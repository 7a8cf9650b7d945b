"""Journeys of the README's "Serve" and "Hand off to Azure" (issue 23): the commands as written, from a user's
folder, with a real CPU ONNX export the main venv's `phi3local export` made.

The Azure commands run from `.venv-azure/bin/phi3local` (`make install-azure`: no torch, transformers or
Hugging Face Hub there); the same commands from the main venv, which has no Azure SDK, stop with one line
naming `make install-azure`. `phi3local serve` starts without a traceback in its log. No help line of
`azure ... --help` is wider than 80 columns, whatever the terminal's width.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
import yaml

from .conftest import AZURE_BIN, MAIN_BIN, REPO, User
from .servers import serving

HELP_WIDTH = 80
FINETUNE_DATA = "azure-phi3-finetune-chat/train.jsonl"  # Azure's sample chat data (SOURCE.md), read in place


@pytest.fixture(scope="module")
def cpu_export(tmp_path_factory) -> Path:
    """A CPU fp32 ONNX export by the main venv's CLI (`phi3local export`, parity check and measurements.json
    included), of the tiny random Phi-3 the export tests build (tests/export_helpers.py: no training needed)."""
    import export_helpers as H

    assert (MAIN_BIN / "phi3local").is_file(), f"no console script in {MAIN_BIN}: run `make install`"
    base = H.tiny_base(tmp_path_factory)
    maker = User(tmp_path_factory.mktemp("exporter"))
    maker.run("export", base, "--out", "runs/onnx", "--precision", "fp32", "--target", "cpu").ok()
    onnx = maker.cwd / "runs" / "onnx"
    assert (onnx / "measurements.json").is_file() and (onnx / "parity.json").is_file()
    return onnx


def with_export(person: User, export: Path) -> User:
    """The user's own runs/onnx (a copy: push writes runs/onnx.azure beside it)."""
    shutil.copytree(export, person.cwd / "runs" / "onnx")
    return person


def one_line_naming_make_install_azure(result) -> None:
    result.failed()
    lines = result.out.strip().splitlines()
    assert len(lines) == 1, result.out
    assert "make install-azure" in lines[0] and "azure-ai-ml is not installed" in lines[0], lines[0]
    assert str(AZURE_BIN / "phi3local") in lines[0]


# ---------------------------------------------------------------------------------- --help

@pytest.mark.parametrize("action", ["", "spec", "push", "invoke", "train", "finetune"])
def test_azure_help_from_the_azure_venv_fits_80_columns_on_any_terminal(azure_user, action):
    words = ["azure", action, "--help"] if action else ["azure", "--help"]
    for columns in ("60", "200"):
        out = azure_user.run(*words, env={"COLUMNS": columns}).ok().out
        wide = [line for line in out.splitlines() if len(line) > HELP_WIDTH]
        assert not wide, f"COLUMNS={columns}: {wide}"
        assert "usage: phi3local azure" in out
    if not action:  # the Azure venv's own --help too (the CLI registers every command without torch)
        assert "azure" in azure_user.run("--help").ok().out


# ---------------------------------------------------------------------------------- the README's lines

def test_readme_spec_line_from_the_azure_venv(azure_user, user, cpu_export):
    readme = ["azure", "spec", "runs/onnx", "--out", "runs/azure-spec", "azure.endpoint_name=phi3-chat"]
    with_export(azure_user, cpu_export)
    out = azure_user.run(*readme).ok().out
    spec = azure_user.cwd / "runs" / "azure-spec"
    deployment = yaml.safe_load((spec / "deployment.yml").read_text())
    # A CPU export gets a CPU VM and the CPU build, unasked; the timeout comes from the export's measurements.
    assert deployment["instance_type"] == "Standard_F8s_v2" and deployment["endpoint_name"] == "phi3-chat"
    assert "runs/onnx/measurements.json" in out and "Standard_F8s_v2: the default for a CPU export" in out
    assert (spec / "conda-cpu.yml").is_file()
    # The code folder is the serving runtime, whole.
    code = spec / "code" / "phi3local"
    assert {p.name for p in (code / "serve").glob("*.py")} >= {"score.py", "chat.py", "engine.py", "protocol.py"}
    assert sorted(p.name for p in code.glob("*.py")) == ["__init__.py", "errors.py"]

    one_line_naming_make_install_azure(with_export(user, cpu_export).run(*readme))


def test_readme_push_dry_run_from_the_azure_venv(azure_user, user, cpu_export):
    readme = ["azure", "push", "runs/onnx", "--dry-run"]
    with_export(azure_user, cpu_export)
    out = azure_user.run(*readme).ok().out
    text = " ".join(out.split())
    # No azure.endpoint_name: it is derived from the folder's name, and said.
    assert "endpoint onnx / deployment blue: 1 x Standard_F8s_v2" in text
    assert "endpoint name onnx: derived from the folder name 'onnx'" in text
    assert "nothing was sent" in text and "create endpoint onnx (if missing)" in text
    assert (azure_user.cwd / "runs" / "onnx.azure" / "deployment.yml").is_file()

    one_line_naming_make_install_azure(with_export(user, cpu_export).run(*readme))


def test_finetune_dry_run_on_azures_sample_data(azure_user, user, shared_data):
    data = shared_data / FINETUNE_DATA
    line = ["azure", "finetune", data, "--model", "Phi-4-mini-instruct", "--dry-run"]
    out = azure_user.run(*line).ok().out
    assert "71 training rows, 8 validation rows" in out and "dry run: nothing was sent" in out

    one_line_naming_make_install_azure(user.run(*line))


def test_train_dry_run_of_a_recipe(azure_user, user, shared_data):
    line = ["azure", "train", REPO / "recipes" / "tiny-cpu.yaml", "--compute", "gpu-cluster", "--dry-run",
            f"data.train_file={shared_data / FINETUNE_DATA}"]
    out = azure_user.run(*line).ok().out
    assert "compute      gpu-cluster: 1 node(s) x 1 process(es)" in out and "dry run: nothing was sent" in out

    one_line_naming_make_install_azure(user.run(*line))


def test_train_dry_run_with_fsdp_over_two_nodes(azure_user, shared_data):
    line = ["azure", "train", REPO / "recipes" / "tiny-cpu.yaml", "--compute", "gpu-cluster", "--dry-run",
            "--parallelism", "fsdp", "--instance-count", "2", "--gpus-per-node", "2",
            f"data.train_file={shared_data / FINETUNE_DATA}"]
    out = azure_user.run(*line).ok().out
    assert "4 ranks (FSDP2, one per GPU" in out and "dry run: nothing was sent" in out
    refused = azure_user.run(*line[:-5], f"data.train_file={shared_data / FINETUNE_DATA}").failed().out
    assert "training.parallelism=fsdp shards the model over several processes" in refused


def test_invoke_without_a_workspace_is_one_line(azure_user, user):
    line = ["azure", "invoke", "--endpoint", "phi3-chat", "--prompt", "Hello"]
    out = azure_user.run(*line).failed(code=2).out
    assert len(out.strip().splitlines()) == 1 and "workspace is not fully named" in out

    one_line_naming_make_install_azure(user.run(*line))


# ---------------------------------------------------------------------------------- serve

def test_serve_starts_without_a_traceback(user, cpu_export):
    with_export(user, cpu_export)
    log = user.home / "serve.log"
    with serving(user, "runs/onnx", log) as port:
        answer = requests.post(f"http://127.0.0.1:{port}/score", timeout=60,
                               json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    text = log.read_text()
    assert "Worker with pid" in text and "ready for serving traffic" in text
    assert "Traceback" not in text and "Error while fetching model IDs" not in text, text
