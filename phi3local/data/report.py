"""Numbers about prepared data (token-length percentiles, histogram) and the `rich` summary of `prepare`."""

from __future__ import annotations

import math
from typing import Any


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of an ascending list; 0 for an empty one."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def length_summary(lengths: list[int], trained: list[int]) -> dict[str, Any]:
    values = sorted(lengths)
    total = sum(values)
    n_trained = sum(trained)
    return {
        "rows": len(values),
        "tokens": total,
        "trained_tokens": n_trained,
        "trained_share": round(n_trained / total, 4) if total else 0.0,
        "min": values[0] if values else 0,
        "mean": round(total / len(values), 1) if values else 0.0,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1] if values else 0,
    }


def _nice_width(span: int, bins: int) -> int:
    raw = max(1, math.ceil(span / bins))
    magnitude = 10 ** int(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        width = int(step * magnitude)
        if width >= raw:
            return max(1, width)
    return raw


def histogram(lengths: list[int], bins: int = 12) -> dict[str, list[int]]:
    """Equal-width bins with round edges: {"edges": [e0..en], "counts": [..n]}; bin i is [e_i, e_i+1)."""
    if not lengths:
        return {"edges": [], "counts": []}
    lo, hi = min(lengths), max(lengths)
    width = _nice_width(hi - lo + 1, bins)
    start = lo // width * width
    n = max(1, math.ceil((hi + 1 - start) / width))
    counts = [0] * n
    for x in lengths:
        counts[min((x - start) // width, n - 1)] += 1
    return {"edges": [start + i * width for i in range(n + 1)], "counts": counts}


def text_histogram(hist: dict[str, list[int]], bar_width: int = 40) -> list[str]:
    edges, counts = hist["edges"], hist["counts"]
    if not counts:
        return ["(no rows)"]
    top = max(counts) or 1
    label_width = len(f"{edges[-2]}-{edges[-1] - 1}")
    lines = []
    for i, count in enumerate(counts):
        label = f"{edges[i]}-{edges[i + 1] - 1}".rjust(label_width)
        bar = "█" * round(count / top * bar_width) if count else ""
        lines.append(f"{label} │{bar} {count}")
    return lines


def overlap_warning(stats: dict[str, Any]) -> str | None:
    """A warning when validation rows also sit in the training data (its loss then flatters the model)."""
    split = stats.get("split", {})
    overlap = split.get("validation_rows_also_in_train", 0)
    if not overlap:
        return None
    train, validation = stats["inputs"]["train"], stats["inputs"]["validation"]
    text = (f"warning: {overlap} of {split.get('validation_rows', overlap)} validation rows are also in the training "
            f"data (data.validation_file={validation['path']}, data.train_file={train['path']})")
    if validation.get("sha256") == train.get("sha256"):
        same = "the very same file" if validation["path"] == train["path"] else "files with identical contents"
        text += f": they are {same}"
    return text + "; the validation loss then overstates how well the model generalises"


def print_summary(stats: dict[str, Any], console, max_rows_shown: int = 20) -> None:
    """Tables of the row counts per step, the split and token lengths, the skipped rows, and a histogram."""
    from rich.table import Table

    out_dir = stats.get("out_dir", "")
    if stats.get("reused"):
        console.print(f"[bold]prepare[/]: reused {out_dir} (same inputs, tokenizer and data settings)")
    else:
        console.print(f"[bold]prepare[/]: wrote {out_dir} in {stats.get('seconds', 0):.1f} s")
    steps = stats["steps"]
    names = list(steps)
    table = Table(title="Rows per step")
    table.add_column("step")
    for name in names:
        table.add_column(f"{name} ({stats['inputs'][name]['format']})", justify="right")
    for key in ("read", "invalid", "whitespace_normalized", "system_prompt_added", "duplicates",
                "over_length", "too_short", "too_long", "truncated", "kept"):
        table.add_row(key.replace("_", " "), *[str(steps[n].get(key, 0)) for n in names])
    console.print(table)

    split = stats["split"]
    tokens = stats["tokens"]
    table = Table(title=f"Split ({split['method']})")
    for col in ("split", "rows", "tokens", "trained share", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for name in ("train", "validation"):
        t = tokens[name]
        table.add_row(name, str(t["rows"]), str(t["tokens"]), f"{t['trained_share']:.1%}", str(t["p50"]),
                      str(t["p90"]), str(t["p99"]), str(t["max"]))
    console.print(table)
    if stats.get("labels"):
        table = Table(title="Labels")
        table.add_column("label")
        table.add_column("train", justify="right")
        table.add_column("validation", justify="right")
        for name in stats["labels"]["names"]:
            table.add_row(name, str(stats["labels"]["train"].get(name, 0)),
                          str(stats["labels"]["validation"].get(name, 0)))
        console.print(table)

    skipped = stats.get("skipped_rows", [])
    filtered = stats.get("filtered_rows", [])
    if skipped or filtered:
        table = Table(title=f"Rows left out: {len(skipped)} skipped, {len(filtered)} filtered")
        for col in ("where", "field", "reason"):
            table.add_column(col, overflow="fold")
        both = [(r["where"], r["field"], r["reason"]) for r in skipped]
        both += [(r["where"], r["step"], r["reason"]) for r in filtered]
        for row in both[:max_rows_shown]:
            table.add_row(*row)
        if len(both) > max_rows_shown:
            table.add_row("...", "", f"{len(both) - max_rows_shown} more, all listed in stats.json")
        console.print(table)
    trunc = stats.get("truncated", {})
    if trunc.get("rows"):
        console.print(f"{trunc['rows']} rows truncated to max_seq_len "
                      f"({trunc['turns_dropped']} oldest exchanges dropped in all)")
    console.print("Token lengths (all kept rows):")
    for line in text_histogram(stats["histogram"]):
        console.print("  " + line, highlight=False)
    warning = overlap_warning(stats)
    if warning:
        # One unwrapped line, without markup: file names may hold '[' and must be shown as written.
        console.print(warning, style="bold yellow", markup=False, highlight=False, soft_wrap=True)
