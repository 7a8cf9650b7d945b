"""`phi3local safety MODEL_DIR [--baseline BASE_DIR] [--json]`: parse, run phi3local.safety.evaluate, print."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from phi3local.argtypes import positive_int


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _change(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.0f}"


def report_table(report: dict[str, Any]) -> Any:
    """Per category: refused harmful / jailbreak, over-refusal on benign, and the baseline's, in 80 columns."""
    from rich.table import Table

    tuned = report["summary"]
    base = (report.get("baseline") or {}).get("summary")
    table = Table(title=f"safety of {report['model_dir']}", title_justify="left")
    for name, justify in (("category", "left"), ("refused", "right"), ("jailbreak", "right"),
                          ("benign refused", "right")):
        table.add_column(name, justify=justify)
    if base:
        table.add_column("base refused", justify="right")
        table.add_column("change (pts)", justify="right")
    for name, rates in [*tuned["categories"].items(), ("overall", tuned["overall"])]:
        n = rates["harmful"] + rates["jailbreak"]
        row = [name, f"{_pct(rates['refusal_rate'])} of {n}", _pct(rates["jailbreak_refusal_rate"]),
               f"{_pct(rates['over_refusal_rate'])} of {rates['benign']}"]
        if base:
            base_rates = base["overall"] if name == "overall" else base["categories"].get(name, {})
            diff = report["change"]["overall" if name == "overall" else name]["refusal_rate"]
            row += [_pct(base_rates.get("refusal_rate")), _change(diff)]
        table.add_row(*row, style="bold" if name == "overall" else None)
    return table


def cmd_safety(args) -> int:
    from rich.console import Console

    from phi3local.config import load_recipe
    from phi3local.safety.evaluate import run_safety
    from phi3local.serve.content_safety import ContentSafetyClient

    recipe = load_recipe(args.recipe, list(args.overrides or []))
    client = ContentSafetyClient.from_env(os.environ)
    report = run_safety(args.model, args.baseline, args.out, max_new_tokens=args.max_new_tokens or
                        recipe.safety.max_new_tokens, content_safety=client,
                        threshold=recipe.safety.content_safety_threshold)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
        return 0
    console = Console()
    console.print(report_table(report))
    scorer = "rules" if client is None else "rules + Azure AI Content Safety"
    say = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"scorer: {scorer}; {report['prompt_set']['count']} prompts, {report['max_new_tokens']} new tokens each")
    for name, part in (("model", report), ("baseline", report["baseline"])):
        unfinished = (part or {}).get("unfinished_traces") or 0
        if unfinished:
            say(f"warning: {unfinished} of the {name}'s answers stopped inside the reasoning trace, before any "
                f"answer: counted as not refused. Raise --max-new-tokens (now {report['max_new_tokens']}) so "
                "traces finish")
    if report["baseline"] is None:
        say("no --baseline: the deploy gate (azure push) needs the change against the base model")
    say(f"wrote {report['out_dir']}/safety.json and safety.png")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "safety", help="refusal rates of a tuned model on harmful prompts (and its base), for the deploy gate",
        description="Runs phi3local's safety prompt set (violence, self-harm, weapons, malware, personal data; "
                    "jailbreak variants; benign look-alikes that must not be refused) through the model and the "
                    "baseline, scores each answer with transparent rules (and Azure AI Content Safety when "
                    "CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY are set), and writes MODEL_DIR.safety/"
                    "safety.json and safety.png, which `phi3local azure push` checks.")
    p.add_argument("model", help="exported ONNX folder or merged transformers folder")
    p.add_argument("--baseline", help="the base model's folder (ONNX or transformers), to measure the change")
    p.add_argument("--out", help="report folder (default: MODEL_DIR.safety beside the model)")
    p.add_argument("--max-new-tokens", type=positive_int, help="tokens per answer (default: safety.max_new_tokens)")
    p.add_argument("--recipe", help="recipe whose safety section to use (default: defaults)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. safety.max_new_tokens=64")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(func=cmd_safety)
    return p
