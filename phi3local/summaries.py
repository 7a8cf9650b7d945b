"""The short tables the CLI prints after a stage: what was written where, the figures that matter, what next.

Each takes the stage's report (the same dict written to its report file and printed by `--json`) and
returns a two-column table that fits 80 terminal columns, and the next command to run on a line of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from phi3local import hints
from phi3local.units import format_bytes


@dataclass
class Summary:
    """A table of figures and the next command to run (printed below it on one line, so it can be copied)."""

    table: Table
    next_command: str | None = None

    def print(self, console: Console) -> None:
        console.print(self.table)
        if self.next_command:
            hints.print_next(console, self.next_command)


def _table(title: str, rows: list[tuple[str, str]], next_command: str | None = None) -> Summary:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return Summary(table, next_command)


def merge_table(report: dict, out_dir: Path) -> Summary:
    verdict = "[green]passed[/]" if report.get("passed") else "[red]FAILED[/]"
    rows = [
        ("written to", str(out_dir)),
        ("base model", str(report.get("base_model"))),
        ("dtype", str(report.get("dtype"))),
        ("size", format_bytes(report.get("size_bytes"))),
        ("check", f"merged vs base+adapter: max |Δlogit| {report['max_abs_diff']:.2g} = "
                  f"{report['relative_diff']:.1e} of scale (tolerance {report['tolerance_relative']:g}) {verdict}"),
        ("adapter effect", f"max |Δlogit| {report['adapter_effect_max_abs']:.3g} against the base"),
        ("time", f"{report.get('seconds', 0):.1f} s"),
    ]
    return _table("merge", rows, hints.command("export", out_dir, "--out", out_dir.parent / (out_dir.name + "-onnx")))


def export_table(report: dict, out_dir: Path) -> Summary:
    rows = [
        ("written to", str(out_dir)),
        ("precision", f"{report['precision']} for {report['target']}"),
        ("size", format_bytes(report.get("size_bytes"))),
        ("time", f"{report.get('seconds', 0):.1f} s"),
    ]
    parity = report.get("parity") or {}
    if "max_abs_diff" in parity:
        verdict = ""
        if "passed" in parity:
            verdict = " [green]passed[/]" if parity["passed"] else " [red]FAILED[/]"
        rows.append(("parity", f"max |Δlogit| {parity['max_abs_diff']:.2g} = {parity['relative_error']:.1e} of "
                               f"scale{verdict}"))
        rows.append(("greedy tokens", f"{parity['greedy_identical']}/{parity['greedy_compared']} equal to PyTorch"))
        if parity.get("long_context"):
            rows.append(("long context", parity["long_context"]))
    elif "skipped" in parity:
        rows.append(("parity", f"not measured: {parity['skipped']}"))
    details = [out_dir / name for name in ("export_report.json", "parity.json") if (out_dir / name).is_file()]
    rows.append(("details", ", ".join(map(str, details))))
    return _table("export", rows, hints.command("chat", out_dir))


def eval_table(result: dict, model: Path, data: Path) -> Summary:
    rows = [("model", str(model)), ("data", f"{data} ({result.get('rows', '?')} rows)"),
            ("loss", f"{result['val_loss']:.4f}")]
    # Each task reports its own figures: perplexity and token accuracy (causal LM), accuracy and macro-F1
    # (classification), reward accuracy and margin (preference).
    shown = (("perplexity", "val_perplexity"), ("accuracy", "val_accuracy"), ("macro-F1", "val_macro_f1"),
             ("reward accuracy", "val_rewards/accuracies"), ("reward margin", "val_rewards/margins"))
    rows += [(label, f"{result[key]:.3f}") for label, key in shown if key in result]
    return _table("eval", rows)
