"""How sizes and durations are written for people, the same everywhere (panels, summaries, benchmarks)."""

from __future__ import annotations

import math


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None or NaN -> '-'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} GiB"


def format_seconds(s: float) -> str:
    """3725 -> '1:02:05'."""
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
