"""`phi3local monitor LOG.jsonl [--json]`: what a served model's request records say (phi3local.serve.monitoring).

    requests, error rates (4xx, 5xx, streams that failed), latency percentiles (p50/p90/p99/max), prompt and
    completion tokens per request, refusal rate of the answers (phi3local.safety.scorer's rules), and the same
    over time in equal windows from the first record to the last; a table, LOG.png beside the log, or JSON.

The latency percentiles are over the answered requests only (a 2xx status and no error): a 4xx is refused
in a fraction of a millisecond and a 5xx or failed stream stops early, so counting them would pull the
percentiles away from what an answer takes. Errors are counted on their own (errors_4xx, errors_5xx,
stream_failures, error_rate over all requests), with their latency apart (error_latency_ms).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phi3local.argtypes import positive_int
from phi3local.data.report import percentile as nearest_rank
from phi3local.errors import Phi3LocalError
from phi3local.safety.scorer import classify

REQUIRED = ("correlation_id", "unix", "latency_ms", "status")


class MonitorLogError(Phi3LocalError, ValueError):
    """The log cannot be read; the message names the file and line."""

    exit_code = 2


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MonitorLogError(f"{path}: no such log (phi3local serve --monitor-log {path} writes one)") from None
    except UnicodeDecodeError as e:
        raise MonitorLogError(f"{path}: not UTF-8 text ({e.reason})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise MonitorLogError(f"{path}:{number}: not a JSON record ({e.msg})") from None
        missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            raise MonitorLogError(f"{path}:{number}: missing {', '.join(missing)} (not a phi3local request record)")
        records.append(record)
    if not records:
        raise MonitorLogError(f"{path}: no records")
    return sorted(records, key=lambda r: r["unix"])


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values, as prepare reports lengths; None when there are none."""
    return nearest_rank(sorted(values), q) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def is_answered(record: dict[str, Any]) -> bool:
    """A 2xx status and no error (a stream that failed after its 200 carries one)."""
    return 200 <= record["status"] < 300 and record.get("error") is None


def _latencies(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    values = [float(r["latency_ms"]) for r in records]
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values) if values else None}


def _stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    answered = [r for r in records if is_answered(r)]
    failed = [r for r in records if not is_answered(r)]
    refused = [r for r in answered if r.get("answer") is not None and classify(r["answer"]).label == "refusal"]
    n = len(records)
    return {
        "requests": n,
        "errors_4xx": sum(400 <= r["status"] < 500 for r in records),
        "errors_5xx": sum(r["status"] >= 500 for r in records),
        "stream_failures": sum(r["status"] == 200 and r.get("error") is not None for r in records),
        "error_rate": sum(r["status"] >= 400 or r.get("error") is not None for r in records) / n if n else None,
        "answered": len(answered),
        "latency_ms": _latencies(answered),  # answered requests only
        "error_latency_ms": _latencies(failed),  # 4xx, 5xx and failed streams
        "prompt_tokens_mean": _mean([r["prompt_tokens"] for r in answered if r.get("prompt_tokens") is not None]),
        "completion_tokens_mean": _mean([r["completion_tokens"] for r in answered
                                         if r.get("completion_tokens") is not None]),
        "refusal_rate": len(refused) / len(answered) if answered else None,
    }


def summarize(records: Sequence[dict[str, Any]], windows: int = 6) -> dict[str, Any]:
    """Overall stats, and the same in `windows` equal time windows from the first record to the last."""
    start, end = records[0]["unix"], records[-1]["unix"]
    width = (end - start) / windows if end > start else 1.0
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(windows)]
    for r in records:
        buckets[min(int((r["unix"] - start) / width), windows - 1)].append(r)
    over_time = [{"start_unix": start + i * width, "end_unix": start + (i + 1) * width, **_stats(b)}
                 for i, b in enumerate(buckets) if b]
    return {"first": records[0].get("time"), "last": records[-1].get("time"), "seconds": end - start,
            "overall": _stats(records), "over_time": over_time}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _window_unit(span_seconds: float) -> tuple[str, float]:
    """The unit the windows' offsets are given in, so that they stay a few characters wide."""
    return ("s", 1.0) if span_seconds < 600 else ("min", 60.0) if span_seconds < 36_000 else ("h", 3600.0)


def _offset(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") if value < 100 else f"{value:,.0f}"


def report_table(summary: dict[str, Any], title: str) -> Any:
    """Per window and overall; the latency columns are the answered requests' (2xx, no error), the error
    column counts 4xx, 5xx and failed streams over all requests, and the last row their latency apart."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  caption="ok p50/p90/p99: latency in ms of answered requests (2xx, no error) only; err: 4xx, 5xx "
                          "and failed streams, % of all requests; errors' latency: the last row")
    unit, seconds = _window_unit(summary["seconds"])
    window = f"window, {unit}"
    for name in (window, "reqs", "err", "ok p50", "ok p90", "ok p99", "tok in/out", "refused"):
        table.add_column(name, justify="left" if name == window else "right")
    t0 = summary["over_time"][0]["start_unix"] if summary["over_time"] else 0.0

    def row(label: str, s: dict[str, Any], style: str | None = None) -> None:
        lat = s["latency_ms"]
        tokens = (f"{s['prompt_tokens_mean']:.0f}/{s['completion_tokens_mean']:.0f}"
                  if s["prompt_tokens_mean"] is not None and s["completion_tokens_mean"] is not None else "—")
        table.add_row(label, str(s["requests"]), _pct(s["error_rate"]), _ms(lat["p50"]), _ms(lat["p90"]),
                      _ms(lat["p99"]), tokens, _pct(s["refusal_rate"]), style=style)

    for w in summary["over_time"]:
        row(f"{_offset((w['start_unix'] - t0) / seconds)}-{_offset((w['end_unix'] - t0) / seconds)}", w)
    overall = summary["overall"]
    row("all", overall, "bold")
    errors = overall["requests"] - overall["answered"]
    if errors:
        lat = overall["error_latency_ms"]
        table.add_row("errors", str(errors), "100.0%", _ms(lat["p50"]), _ms(lat["p90"]), _ms(lat["p99"]), "—", "—",
                      style="dim")
    return table


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def plot_summary(summary: dict[str, Any], out_png: Path) -> None:
    """Latency percentiles, error rate and refusal rate per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = summary["over_time"]
    t0 = windows[0]["start_unix"]
    xs = [(w["start_unix"] + w["end_unix"]) / 2 - t0 for w in windows]
    fig, (lat, rates) = plt.subplots(1, 2, figsize=(11, 4))
    for q in ("p50", "p90", "p99"):
        lat.plot(xs, [_nan(w["latency_ms"][q]) for w in windows], "o-", label=q)
    lat.set_xlabel("seconds since the first request")
    lat.set_ylabel("latency of answered requests, ms")
    lat.legend()
    lat.grid(alpha=0.3)
    rates.plot(xs, [100 * (w["error_rate"] or 0) for w in windows], "o-", label="errors")
    rates.plot(xs, [100 * (w["refusal_rate"] or 0) for w in windows], "s-", label="refusals")
    rates.set_xlabel("seconds since the first request")
    rates.set_ylabel("% of requests / of answers")
    rates.set_ylim(0, 100)
    rates.legend()
    rates.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)


def cmd_monitor(args) -> int:
    log = Path(args.log)
    summary = summarize(read_log(log), windows=args.windows)
    out_png = Path(args.plot) if args.plot else log.with_suffix(".png")
    plot_summary(summary, out_png)
    summary["plot"] = str(out_png)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    from rich.console import Console

    console = Console()
    console.print(report_table(summary, f"requests in {log}"))
    s = summary["overall"]
    console.print(f"{s['errors_4xx']} 4xx, {s['errors_5xx']} 5xx, {s['stream_failures']} failed stream(s); plot: "
                  f"{out_png}", markup=False, highlight=False, soft_wrap=True)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("monitor", help="latency, tokens, errors and refusals of a served model's request log",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="the JSONL file of `phi3local serve --monitor-log`")
    p.add_argument("--windows", type=positive_int, default=6, help="time windows from the first request to the last (default 6)")
    p.add_argument("--plot", help="where to write the plot (default: LOG with .png)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(func=cmd_monitor)
    return p
