"""What a run shows while it trains: the rich live panel (progress, loss trend) or plain log lines."""

from __future__ import annotations

import resource
import sys

import torch
from rich.columns import Columns
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from phi3local.units import format_bytes, format_seconds


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


TREND_BLOCKS = "▁▂▃▄▅▆▇█"


def loss_trend(losses: list[float], width: int = 30) -> str:
    """The last `width` losses as a sparkline (lowest ▁, highest █), and the change over them."""
    recent = losses[-width:]
    if len(recent) < 2:
        return ""
    low, high = min(recent), max(recent)
    span = (high - low) or 1.0
    line = "".join(TREND_BLOCKS[min(int((v - low) / span * len(TREND_BLOCKS)), len(TREND_BLOCKS) - 1)] for v in recent)
    return f"{line}  {recent[-1] - recent[0]:+.3f}"


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
        self._losses: list[float] = []  # the logged training losses, for the trend

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
        done = step / max(self.total_steps, 1)
        rows = [
            ("step", f"{step}/{self.total_steps}  epoch {m.get('epoch', 0)}"),
            ("progress", Columns([ProgressBar(total=self.total_steps, completed=step, width=30), f"{100 * done:.0f}%"])),
            ("loss", f"{m['loss']:.4f}" if "loss" in m else "-"),
            ("loss trend", loss_trend(self._losses) or "-"),
            ("val loss", self._val_text()),
            *self._preference_rows(m),
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

    def _val_text(self) -> str:
        v = self._last_val
        if not v:
            return "-"
        if "val_perplexity" in v:
            return f"{v['val_loss']:.4f}  ppl {v['val_perplexity']:.2f}"
        if "val_rewards/accuracies" in v:  # preference: the held-out pairs ranked right
            return f"{v['val_loss']:.4f}  reward acc {v['val_rewards/accuracies']:.3f}"
        return f"{v['val_loss']:.4f}"

    @staticmethod
    def _preference_rows(m: dict) -> list[tuple[str, str]]:
        """task=preference: the step's rewards (TRL's names) under the loss."""
        if "rewards/accuracies" not in m:
            return []
        return [("reward acc / margin", f"{m['rewards/accuracies']:.3f} / {m['rewards/margins']:+.4f}"),
                ("rewards chosen / rejected", f"{m['rewards/chosen']:+.4f} / {m['rewards/rejected']:+.4f}"),
                ("logps chosen / rejected", f"{m['logps/chosen']:.2f} / {m['logps/rejected']:.2f}")]

    def update(self, metrics: dict) -> None:
        if "val_loss" in metrics:
            self._last_val = metrics
        if "loss" in metrics:
            self._losses.append(float(metrics["loss"]))
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
