"""What the commands print: a short summary table by default, the report file's figures as JSON with --json."""

import json
from pathlib import Path

import export_helpers as H
import pytest

from phi3local.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return H.tiny_run(tmp_path_factory)


def run_cli(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_merge_and_export_print_a_summary_or_json_with_the_report_files_figures(run, tmp_path, capsys):
    merged, onnx = tmp_path / "merged", tmp_path / "onnx"
    out = run_cli(capsys, "merge", run, "--out", merged)
    assert "{" not in out and "written to" in out and "passed" in out and f"phi3local export {merged}" in out
    assert max(len(line) for line in out.splitlines() if not line.startswith("next: ")) <= 80
    out = run_cli(capsys, "merge", run, "--out", merged, "--overwrite", "--json")
    printed = json.loads(out)
    saved = json.loads((merged / "merge_report.json").read_text())
    assert printed["max_abs_diff"] == saved["max_abs_diff"] and printed["size_bytes"] == saved["size_bytes"]

    out = run_cli(capsys, "export", merged, "--out", onnx, "--precision", "fp32")
    assert "{" not in out and "parity" in out and "passed" in out and f"phi3local chat {onnx}" in out
    assert ".tmp-" not in out  # the summary names the published folder, never the staging one
    assert max(len(line) for line in out.splitlines() if not line.startswith("next: ")) <= 80
    out = run_cli(capsys, "export", merged, "--out", onnx, "--precision", "fp32", "--overwrite", "--json")
    printed = json.loads(out)
    saved = json.loads((onnx / "export_report.json").read_text())
    assert printed["parity"]["max_abs_diff"] == saved["parity"]["max_abs_diff"]
    assert printed["size_bytes"] == saved["size_bytes"]


def test_eval_prints_a_summary_or_json(run, tmp_path, capsys):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hello {i}"},
                                                     {"role": "assistant", "content": "Once upon a time"}]}) + "\n"
                            for i in range(6)))
    out = run_cli(capsys, "eval", run, "--data", data)
    assert "{" not in out and "perplexity" in out and "6 rows" in out
    printed = json.loads(run_cli(capsys, "eval", run, "--data", data, "--json"))
    assert printed["rows"] == 6 and printed["val_loss"] > 0



def test_cli_train_prints_no_weight_loading_bars(tmp_path):
    """A fresh process, as a user starts it (transformers not yet imported when phi3local.quiet runs)."""
    import subprocess
    import sys

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join((REPO / "phi3local" / "assets" / "demo_chat.jsonl").read_text().splitlines(True)[:12]))
    argv = [sys.executable, "-m", "phi3local", "train", str(REPO / "recipes" / "tiny-cpu.yaml"),
            f"output_dir={tmp_path / 'run'}", f"data.train_file={chats}", "training.max_steps=1", "eval.every=0",
            "eval.generate_samples=0", "training.display=plain", "training.micro_batch_size=2",
            "training.peak_flops=1e12"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trainable parameters" in done.stdout
    assert "Loading weights" not in done.stdout + done.stderr


def test_silencing_turns_off_transformers_bars_and_keeps_the_download_bars(capfd):
    import huggingface_hub.utils as hub
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from phi3local.model.load import resolve_model_path
    from phi3local.quiet import silence_loading_bars

    was_on = transformers_logging.is_progress_bar_enabled()
    try:
        transformers_logging.enable_progress_bar()
        AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
        assert "Loading weights" in capfd.readouterr().err  # the control: the bar is drawn by default
        silence_loading_bars()
        AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
        assert "Loading weights" not in capfd.readouterr().err
        assert not hub.are_progress_bars_disabled("huggingface_hub.http_get")  # a download still shows progress
    finally:
        (transformers_logging.enable_progress_bar if was_on else transformers_logging.disable_progress_bar)()
