"""Benchmark results: the machine and versions, one JSON file per benchmark, a rich table, a PNG chart.

Every benchmark writes `<out_dir>/<name>.json`:
    {"name", "created", "size", "environment": {machine, device, device_name, versions, ...},
     "config": {...}, "rows": [{...}, ...], "summary": {...}, "notes": [...], "wall_s"}
and, when it has something to draw, `<out_dir>/<name>.png` (PNGs are not committed).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kernels_bench.common import write_results
from phi3local.units import format_bytes as fmt_bytes  # noqa: F401 (the benchmarks' name for it)
from phi3local.versions import package_versions

VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "flash-attn",
             "phi3local")


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide the speed of what the benchmarks run (fp32, bf16 and int8 matmuls): hosts named alike
# ("AMD EPYC") differ in them, and two runs compare only where these are equal.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


def cpu_isa() -> dict:
    """torch's dispatch level and which of ISA_FLAGS the CPU reports (/proc/cpuinfo; empty where unreadable)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"torch_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in ISA_FLAGS if f in flags]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def op_latency_us(repeats: int = 200) -> float:
    """Median wall time of a tiny parallel CPU op, in µs: a few µs on an idle machine; milliseconds when other
    processes compete for the cores (each op then waits for a descheduled worker thread)."""
    import time

    x = torch.ones(256, 256)  # above torch's grain size: runs on all intra-op threads
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.sqrt(x)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return 1e6 * samples[len(samples) // 2]


def environment(device: torch.device | str) -> dict:
    device = torch.device(device)
    env = {
        "machine": {
            "hostname": platform.node(), "platform": platform.platform(), "arch": platform.machine(),
            "cpu": cpu_model_name(), "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_op_latency_us": op_latency_us(),
        "device": device.type,
        "device_name": device_name(device),
        "versions": package_versions(VERSIONED),
    }
    env["versions"]["torch_build"] = torch.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["cuda"] = {"runtime": torch.version.cuda, "capability": f"{props.major}.{props.minor}",
                       "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
    return env


def _clean(value):
    """JSON-safe: NaN/inf become None, tuples lists, tensors numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


def save_result(out_dir: Path, name: str, size: str, device: torch.device | str, config: dict, rows: list[dict],
                summary: dict | None = None, notes: Sequence[str] = (), wall_s: float | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "size": size,
        "environment": environment(device),
        "config": config,
        "rows": rows,
        "summary": summary or {},
        "notes": list(notes),
        "wall_s": wall_s,
    }
    return write_results(out_dir / f"{name}.json", _clean(doc))


# --------------------------------------------------------------------------------------------- formatting

def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def fmt_num(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def fmt_flops(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP/s"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}x"


@dataclass
class Column:
    key: str
    header: str
    fmt: Callable[[object], str] = str
    justify: str = "right"


def print_table(title: str, rows: list[dict], columns: list[Column], console: Console | None = None,
                caption: str | None = None) -> Table:
    console = console or Console()
    table = Table(title=title, caption=caption, title_justify="left")
    for c in columns:
        table.add_column(c.header, justify=c.justify, style="cyan" if c.justify == "left" else None)
    for row in rows:
        table.add_row(*(c.fmt(row.get(c.key)) if row.get(c.key) is not None else "-" for c in columns))
    console.print(table)
    return table


# --------------------------------------------------------------------------------------------- charts

def bar_chart(path: Path, title: str, labels: list[str], values: list[float], xlabel: str,
              errors: list[tuple[float, float]] | None = None) -> Path | None:
    """Horizontal bars (one per row), optional [low, high] error ranges; returns None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.4))
    y = list(range(len(labels)))
    xerr = None
    if errors:
        xerr = [[max(v - lo, 0) for v, (lo, _) in zip(values, errors)],
                [max(hi - v, 0) for v, (_, hi) in zip(values, errors)]]
    ax.barh(y, values, xerr=xerr, color="#4c72b0", capsize=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_chart(path: Path, title: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str,
               ylabel: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
