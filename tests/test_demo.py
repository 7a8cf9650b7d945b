"""The demo's task end to end at reduced steps: train -> merge -> ONNX export -> the before/after report.

`make demo` trains recipes/tiny-cpu.yaml on phi3local/assets/demo_chat.jsonl and ends with
`python -m phi3local.demo_report`; here the same chain runs shorter (200 steps at a higher lr) and the
30 held-out chats, none of them in the training data, must go from no exact answer to most of them.
Measured on a 2-core CPU: the demo (300 steps, lr 5e-3) 0/30 -> 30/30, val loss 6.26 -> 0.03; this
test's run 0/30 -> 30/30 (merged and ONNX), 6.26 -> 0.05, the whole module in about 15 s.
"""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path

import onnxruntime_genai  # noqa: F401  (the export extra is part of `make install`)
import pytest
from rich.console import Console

from phi3local import demo_report
from phi3local.config import load_recipe
from phi3local.data.demo import generate_held_out
from phi3local.train.recipe import run_training

REPO = Path(__file__).resolve().parents[1]
# The demo trains 300 steps at lr 5e-3 (recipes/tiny-cpu.yaml); the test 200 at 8e-3, the rest as the demo.
REDUCED = ["training.max_steps=200", "training.lr=8e-3"]
BAR = 0.8  # exact match of the exported ONNX model on the 30 held-out chats
# Of the merged model in PyTorch: the ONNX model can be lower, as onnxruntime-genai splits a word's trailing
# punctuation off ("what:" -> "what" ":") where the training tokenizer has a merged piece.
MERGED_BAR = 0.9


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import torch

    from phi3local.export.merge import merge_adapter
    from phi3local.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("demo")
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [
        f"output_dir={folder / 'run'}", *REDUCED, "training.display=none", "training.checkpoint_every=0",
        "eval.every=0", "eval.generate_samples=0",
    ])
    # One thread: this model is too small to gain from two, and on a machine whose cores other processes
    # also use, two OpenMP threads waiting on each other made these 200 steps 12x slower (68 s, not 5.4 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_training(recipe)
        merge_adapter(folder / "run", folder / "merged", dtype="float32")
        export_onnx(folder / "merged", folder / "onnx", precision="fp32", target="cpu", show=False)
        console = Console(file=io.StringIO(), width=80, color_system=None)
        result = demo_report.report(folder / "run", folder / "onnx", console=console, merged_dir=folder / "merged")
    finally:
        torch.set_num_threads(threads)
    return folder, summary, result, console.file.getvalue()


def test_exact_match_rises_and_val_loss_falls(demo):
    _, summary, result, _ = demo
    before, merged, after = result["before"], result["merged"], result["after"]
    assert before["total"] == merged["total"] == after["total"] == len(generate_held_out()) == 30
    # The base tiny model is random: it answers nothing. Measured at REDUCED: see the module docstring.
    assert before["right"] == 0, before["rows"][:3]
    assert merged["exact_match"] >= MERGED_BAR, [r for r in merged["rows"] if not r["exact"]]
    assert after["exact_match"] >= BAR, [r for r in after["rows"] if not r["exact"]]
    assert before["val_loss"] == summary["first_val_loss"] and after["val_loss"] == summary["final"]["val_loss"]
    assert after["val_loss"] < 1.0 < 5.0 < before["val_loss"], (before["val_loss"], after["val_loss"])


def test_report_fits_80_columns_and_shows_only_right_answers(demo):
    folder, _, result, text = demo
    lines = text.splitlines()
    shown = result["shown"]
    # It ends by suggesting a chat the model answers right: one line, never wrapped, however long the path.
    ask = min(shown, key=lambda r: len(r["question"]))["question"]
    command = f"chat {shlex.quote(str(folder / 'onnx'))} --prompt {shlex.quote(ask)}"
    assert lines[-2] == "Ask it yourself:" and lines[-1].startswith("  ") and lines[-1].endswith(command), lines[-2:]
    prose = lines[:-1]
    assert max(map(len, prose)) <= 80, max(prose, key=len)
    assert all(row in text for row in ("before: base tiny model", "after: merged model", "after: exported ONNX"))
    after = result["after"]
    assert f"{after['right']} of {after['total']} held-out chats right" in text
    assert len(shown) == 3 and all(r["exact"] for r in shown)
    assert {demo_report._kind(r["expected"]) for r in shown} == {"Who:", "The capital", "The opposite"}
    for r in shown:
        assert r["question"] in text and r["answer"] in text


def test_the_suggested_command_is_never_wrapped_whatever_the_path(tmp_path):
    """A 200-character folder name on a 40-column console: the command stays one line, as printed."""
    onnx = tmp_path / ("x" * 200) / "onnx"
    row = {"question": "Tom liked a funny mug at school. Who and what?", "answer": "Who: Tom. What: mug.",
           "expected": "Who: Tom. What: mug.", "exact": True}
    console = Console(file=io.StringIO(), width=40, color_system=None)
    demo_report.print_answers(console, [row], {"right": 1, "total": 1}, onnx)
    lines = console.file.getvalue().splitlines()
    assert lines[-1].endswith(f"chat {shlex.quote(str(onnx))} --prompt {shlex.quote(row['question'])}"), lines


def test_command_line_with_a_held_out_file(demo, capsys):
    folder, _, result, _ = demo
    right = next(r for r in result["after"]["rows"] if r["exact"])
    chats = [c for c in generate_held_out() if c["messages"][-2]["content"] == right["question"]]
    held_out = folder / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(c) + "\n" for c in chats))
    code = demo_report.main([str(folder / "run"), str(folder / "onnx"), "--held-out", str(held_out), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    figures = json.loads(out[out.index("{\n"):])
    assert figures["after"]["right"] == figures["after"]["total"] == 1 and figures["before"]["right"] == 0
    assert right["answer"] in out


def test_unusable_folders_and_files_are_one_clear_error(tmp_path, capsys):
    assert demo_report.main([str(tmp_path), str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(demo_report.DemoReportError, match=r"bad\.jsonl:1: .*expected assistant turn"):
        demo_report.load_chats(bad)
    bad.write_text("{not json\n")
    with pytest.raises(demo_report.DemoReportError, match=r"bad\.jsonl:1: not JSON"):
        demo_report.load_chats(bad)
