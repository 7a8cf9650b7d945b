"""Peak memory without tracemalloc: CUDA allocator stats, the profiler's allocation events, RSS.

- `cuda_peak_bytes(fn, device)`: torch.cuda.max_memory_allocated over fn(), above what was allocated before.
- `torch_allocated_peak_bytes(fn, device)`: replays torch.profiler's allocation/free events
  (profile_memory=True) and returns the highest running total over fn(), above the start. Counts tensors
  only (not oneDNN scratch or Python objects); works on CPU and CUDA.
- RSS: `current_rss_bytes()`, `peak_rss_bytes()` (the process's high-water mark) and `RssSampler`, a
  thread that samples RSS while a block runs. The high-water mark is per process, so a fair peak per
  contender needs one process per contender (`kernels_bench.isolate.run_isolated`).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable

import torch


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int | None:
    """Peak RSS since the last `reset_peak_rss()` (or process start), from /proc/self/status."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_peak_delta_bytes(fn: Callable[[], object]) -> dict:
    """Peak RSS while fn() runs, above the RSS just before it.

    Run it in a fresh process (`kernels_bench.isolate`): memory freed earlier in the same process stays
    mapped by the allocator and would be reused without raising RSS. With a resettable VmHWM (Linux) the
    peak is exact; otherwise the process high-water mark is used (`exact: False`).
    """
    import gc

    gc.collect()
    exact = reset_peak_rss()
    before = current_rss_bytes()
    fn()
    peak = vm_hwm_bytes() if exact else None
    if peak is None:
        exact, peak = False, peak_rss_bytes()
    return {"rss_before_bytes": before, "rss_peak_bytes": peak, "rss_peak_delta_bytes": max(peak - before, 0),
            "exact": exact}


class _Sampler:
    """A thread calling `sample()` every `interval` seconds while a `with` block runs, and once more at its end."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


class RssSampler(_Sampler):
    """Samples RSS every `interval` seconds in a thread: `with RssSampler() as s: ...; s.peak, s.baseline`."""

    def __init__(self, interval: float = 0.01):
        super().__init__(interval)
        self.baseline = self.peak = current_rss_bytes()

    def sample(self) -> None:
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


class ProcessMemorySampler(_Sampler):
    """Samples another (or this) process's /proc/PID/status in a thread: peak VmRSS, RssAnon and RssFile.

    RssAnon is the memory the process itself allocated; VmRSS (and ru_maxrss) also count pages of files it maps,
    such as safetensors shards being loaded, which the kernel drops under pressure without any swap. Both are
    reported: the anonymous peak is what decides whether a run fits in RAM.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        super().__init__(interval)
        self.pid = pid or os.getpid()
        self.peak_rss = self.peak_anon = self.peak_file = 0

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the process has ended
            return
        kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items() if k in ("VmRSS", "RssAnon", "RssFile")}
        self.peak_rss = max(self.peak_rss, kib.get("VmRSS", 0))
        self.peak_anon = max(self.peak_anon, kib.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, kib.get("RssFile", 0))


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cuda") -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def torch_allocated_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak of live tensor bytes allocated by fn() (above the start), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    want = "CUDA" if device.type == "cuda" else "CPU"
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith(want)]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return int(peak)
