"""What a run shows and keeps: a rich live panel, metrics.jsonl, TensorBoard, a loss plot."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsLog:
    """One JSON object per line, appended and flushed, so a crashed run keeps what it logged."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run, closed in close())
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class TrainDisplay:
    """The live panel (rich) or one plain line per log step when not on a terminal."""

    def __init__(self, total_steps: int, mode: str = "auto", console: Console | None = None):
        self.console = console or Console()
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self.total_steps = total_steps
        self._live: Live | None = None
        self._last_val: dict = {}

    def __enter__(self):
        if self.mode == "rich":
            self._live = Live(self._panel({}), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)

    def _panel(self, m: dict) -> Table:
        table = Table(title="phi3local train", show_header=False, expand=False)
        table.add_column(style="bold cyan")
        table.add_column()
        step = m.get("step", 0)
        rows = [
            ("step", f"{step}/{self.total_steps}  epoch {m.get('epoch', 0)}"),
            ("loss", f"{m['loss']:.4f}" if "loss" in m else "-"),
            ("val loss", f"{self._last_val['val_loss']:.4f}  ppl {self._last_val['val_perplexity']:.2f}"
             if self._last_val else "-"),
            ("lr", f"{m['lr']:.2e}" if "lr" in m else "-"),
            ("grad norm", f"{m['grad_norm']:.3f}" if "grad_norm" in m else "-"),
            ("trained tokens/s", f"{m.get('tokens_per_second', 0):.1f}"),
            ("MFU", f"{100 * m.get('mfu', 0):.2f}%"),
            ("padding share", f"{100 * m.get('padding_share', 0):.1f}%"),
            ("memory (peak)", format_bytes(m.get("peak_memory_bytes", 0))),
            ("ETA", format_seconds(m.get("eta_seconds", 0))),
        ]
        for k, v in rows:
            table.add_row(k, v)
        return table

    def update(self, metrics: dict) -> None:
        if "val_loss" in metrics:
            self._last_val = metrics
        if self.mode == "rich" and self._live is not None:
            if "loss" in metrics:
                self._live.update(self._panel(metrics))
        elif self.mode == "plain":
            shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()
                     if k not in ("time",)}
            self.console.print(" ".join(f"{k}={v}" for k, v in shown.items()), highlight=False)

    def print(self, *args, **kwargs) -> None:
        if self.mode != "none":
            self.console.print(*args, **kwargs)


def plot_losses(metrics_path: Path, out_png: Path) -> bool:
    """Train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
