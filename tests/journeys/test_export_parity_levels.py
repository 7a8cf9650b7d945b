"""Journey: a user exports a LongRoPE model (the tiny Phi-3.5-mini stand-in: its switch at 64 tokens) and chooses
how much parity to check. At real size on a CPU the full check's prompts past the switch take most of an hour
(docs/benchmarks.md, Phi-4-mini's export), so `--parity short` checks the short prompts only and says what it
left out, and `--parity none` checks nothing and says so."""

from __future__ import annotations

import json

from phi3local.data.demo import demo_texts
from phi3local.export.parity import DEFAULT_PROMPTS
from phi3local.model.family import ensure_tiny_member

COLUMNS = 60  # the `user` fixture's terminal


def _export(user, model, out, level: str):
    result = user.run("export", model, "--out", out, "--precision", "fp32", "--parity", level).ok()
    assert not [line for line in result.out.splitlines() if len(line) > COLUMNS and not line.startswith("next: ")], \
        result.out  # the command to copy is never wrapped
    return result


def test_parity_full_short_and_none_on_a_longrope_model(user):
    model = ensure_tiny_member("longrope", user.home / "models" / "tiny-longrope", demo_texts())

    full = _export(user, model, user.cwd / "full", "full")
    report = json.loads((user.cwd / "full" / "parity.json").read_text())
    assert len(report["prompts"]) == len(DEFAULT_PROMPTS) + 2 and report["passed"] is True  # + past, across
    assert "long_context" not in report and "long context" not in full.out

    short = _export(user, model, user.cwd / "short", "short")
    report = json.loads((user.cwd / "short" / "parity.json").read_text())
    assert len(report["prompts"]) == len(DEFAULT_PROMPTS) and report["passed"] is True
    assert "--parity short" in report["long_context"]
    assert "long context" in short.out and "not compared" in short.out
    exported = json.loads((user.cwd / "short" / "export_report.json").read_text())
    assert exported["parity"]["long_context"] == report["long_context"]

    none = _export(user, model, user.cwd / "none", "none")
    assert not (user.cwd / "none" / "parity.json").exists()
    assert json.loads((user.cwd / "none" / "export_report.json").read_text())["parity"] == {"skipped": "--parity none"}
    assert "not measured: --parity none" in " ".join(none.out.split())
    assert "parity.json" not in none.out  # the details row names only files that exist
    assert (user.cwd / "none" / "measurements.json").is_file()  # `azure spec` sizes the deployment from it

    bad = user.run("export", model, "--out", user.cwd / "bad", "--parity", "half").failed(2)
    assert "invalid choice: 'half'" in bad.out and not (user.cwd / "bad").exists()
