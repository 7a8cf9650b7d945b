"""`phi3local plan RECIPE`: the memory a training step of the recipe needs, before anything is downloaded.

The shapes come from the model folder's config.json, the local Hugging Face cache, or the family's known
shapes (`phi3local.model.shapes`); the plan itself from `phi3local.train.memory_plan`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# Nothing heavy at module level: the CLI calls register() while it builds its parser, also in a venv without
# torch (the Azure venv); phi3local.train.memory_plan imports torch through phi3local.train.batching.


def cmd_plan(args) -> int:
    from rich.console import Console

    from phi3local.config import load_recipe
    from phi3local.train.auto_settings import resolve
    from phi3local.train.memory_plan import MemoryPlanError, card_bytes, make_plan, parse_memory, plan_table

    console = Console()
    recipe = load_recipe(args.recipe, args.overrides)
    cards = [parse_memory(x) for value in args.device_memory or [] for x in value.split(",") if x.strip()]
    if not cards and recipe.training.target_memory_gb:
        cards = [recipe.training.target_memory_gb]
    device = args.device or ("cuda" if cards else None)
    targets: list[tuple[str, int | None]] = [(f"{gib:g} GiB card", card_bytes(gib)) for gib in cards] or [
        ("this machine", None)]
    reports = []
    for label, available in targets:
        try:
            _, report, reasons = resolve(recipe, None, device=device, available=available)
        except MemoryPlanError:
            # It does not fit: the plan at the recipe's own settings says by how much and what would.
            reasons = {}
            report = make_plan(recipe, device=device, available=available)
        if report is None:
            raise MemoryPlanError(reasons["plan"])
        reports.append((label, report, reasons))
    if args.json:
        print(json.dumps([{"target": label, **report.to_dict(), "auto": reasons} for label, report, reasons in reports],
                         indent=2))
        return 0 if all(r.plan.fits for _, r, _ in reports) else 1
    for label, report, reasons in reports:
        console.print(plan_table(report, title=f"{label}"))
        for key, why in reasons.items():
            console.print(f"  [dim]auto {key}: {why}[/]", soft_wrap=True)
        if not report.plan.fits:
            from phi3local.train.memory_plan import does_not_fit_message

            console.print(f"[red]does not fit:[/] {does_not_fit_message(report)}", soft_wrap=True, highlight=False)
        console.print()
    return 0 if all(r.plan.fits for _, r, _ in reports) else 1


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `plan` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "plan", help="the memory a training step needs, and the largest micro-batch / longest sequence that fit",
        epilog="Without --device-memory: the recipe's training.target_memory_gb, else this machine's free memory. "
               "Exit status 1 when the plan does not fit.")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/phi3-mini-4k-qlora.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.micro_batch_size=4")
    p.add_argument("--device-memory", action="append", metavar="SIZE",
                   help="a card's memory, e.g. 16GB (GiB; repeat or comma-separate for several cards)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="plan for this device type (default: cuda with "
                   "--device-memory, else this machine's)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=cmd_plan)
    return p
