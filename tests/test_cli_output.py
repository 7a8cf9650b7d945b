"""What the commands print: a short summary table by default, the report file's figures as JSON with --json."""

import json

import export_helpers as H
import pytest

from phi3local.cli import main


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
