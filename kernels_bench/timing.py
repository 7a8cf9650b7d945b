"""Timing that holds up: warm-up, timed iterations, repeats, median and spread, CUDA-synchronised.

    t = time_fn(lambda: step(), device=device, warmup=2, iters=5, repeats=3)
    t.median, t.spread, t.as_dict()

Each repeat times `iters` back-to-back calls and records seconds per call, so one sample averages out
timer resolution and launch jitter; the repeats show how much the machine drifts. On CUDA the device is
synchronised before the clock starts and before it stops (kernels are asynchronous otherwise).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for queued device work; a no-op on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call, one sample per repeat (or per step for training loops)."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 means the slowest sample was 5% of the median above the fastest."""
        if not self.samples or self.median == 0:
            return float("nan")
        return (self.max - self.min) / self.median

    @property
    def iqr(self) -> float:
        """Interquartile range, quartiles interpolated linearly between samples (numpy's default method)."""
        if not self.samples:
            return float("nan")
        if len(self.samples) == 1:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q3 - q1

    def as_dict(self) -> dict:
        return {
            "median_s": self.median, "min_s": self.min, "max_s": self.max, "iqr_s": self.iqr,
            "spread": self.spread, "n": len(self.samples), "samples_s": list(self.samples),
        }


def time_fn(fn: Callable[[], object], device: torch.device | str | None = None, warmup: int = 2, iters: int = 5,
            repeats: int = 3, max_seconds: float | None = None) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then `repeats` samples of `iters` calls each.

    max_seconds caps a slow benchmark: once the timed part has used that long, no further repeat starts
    (at least one sample is always taken), so a size that is too big still finishes.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    timing = Timing()
    started = time.perf_counter()
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(max(iters, 1)):
            fn()
        sync(device)
        timing.samples.append((time.perf_counter() - t0) / max(iters, 1))
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    return timing


def auto_iters(fn: Callable[[], object], device: torch.device | str | None = None, target_seconds: float = 0.2,
               max_iters: int = 50) -> int:
    """How many calls fill about `target_seconds` (one call measured after one warm-up call)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    return int(min(max_iters, max(1, target_seconds / one)))
