"""What every benchmark shares: sizes, device and dtype, the shared data folder, the results folder, packed rows.

Sizes:
- `tiny`:  seconds, for the smoke test.
- `small`: `make bench` on 2 CPU cores (all benchmarks together well under 15 minutes).
- `full`:  Phi-3-mini's real shapes (hidden 3072, 32 heads of 96, intermediate 8192, vocab 32064,
           sequences of 2048 and 4096) in bf16 on CUDA (`make bench-gpu`).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

# Phi-3-mini-4k-instruct
PHI3_MINI = {"hidden": 3072, "heads": 32, "head_dim": 96, "intermediate": 8192, "vocab": 32064, "layers": 32}
VOCAB = PHI3_MINI["vocab"]
SIZES = ("tiny", "small", "full")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Shared, read-only data beside the checkout; read in place, never copied into the repo. The variable
# PHI3LOCAL_BENCH_SHARED_DATA points elsewhere on machines where it lives in another place.
SHARED_DATA = Path(os.environ.get("PHI3LOCAL_BENCH_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CHAT_DATA = SHARED_DATA / "azure-phi3-finetune-chat"
PHI3_TOKENIZER = SHARED_DATA / "phi3-mini-tokenizer"
# Scratch space for built models, prepared data and training runs (git-ignored).
WORK_DIR = REPO_ROOT / "runs" / "bench"


def make_console() -> Console:
    """A console wide enough for the result tables also when output goes to a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=180)


class BenchUnavailable(RuntimeError):
    """This benchmark cannot run here (e.g. full size without CUDA); the message says why."""


@dataclass
class Ctx:
    size: str = "small"
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir: Path = RESULTS_DIR
    console: Console = field(default_factory=lambda: make_console())
    repeats: int | None = None  # override the size's repeat count
    extended: bool = False  # also run the optional contenders (train_e2e: CUDA experiments; dpo_e2e: two more)
    contenders: list[str] | None = None  # train_e2e: run exactly these contenders

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype phi3local picks: bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU."""
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, tiny, small, full):
        return {"tiny": tiny, "small": small, "full": full}[self.size]

    def timing_args(self) -> dict:
        warmup, iters, repeats = self.pick((1, 1, 2), (1, 2, 5), (3, 10, 5))
        return {"warmup": warmup, "iters": iters, "repeats": self.repeats or repeats}

    def result_name(self, name: str) -> str:
        """results/<name>.json for `small` (what `make bench` writes), <name>_<size>.json otherwise."""
        return name if self.size == "small" else f"{name}_{self.size}"

    def require_cuda_for_full(self) -> None:
        if self.size == "full" and not self.is_cuda:
            raise BenchUnavailable("--size full runs Phi-3-mini's real shapes and needs a CUDA GPU "
                                   "(on CPU use --size small, i.e. `make bench`)")


def repo_relative(path: str | Path) -> str:
    """A path inside the repository as written from its root, one beside it (../shared) as from there (results
    stay machine-independent)."""
    path = Path(path).resolve()
    for root, prefix in ((REPO_ROOT, ""), (REPO_ROOT.parent, "../")):
        try:
            return prefix + str(path.relative_to(root))
        except ValueError:
            continue
    return str(path)


def machine_independent(text: str) -> str:
    """A results file's text with this checkout's absolute paths written from its root: `.` and `..`."""
    return text.replace(str(REPO_ROOT), ".").replace(str(REPO_ROOT.parent), "..")


def write_results(path: Path, doc: dict) -> Path:
    """A results file, whole or not at all (written beside, then renamed), with machine-independent paths."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(machine_independent(json.dumps(doc, indent=2, default=str)) + "\n")
    tmp.replace(path)
    return path


def long_tailed_lengths(n: int, seed: int = 0, median: float = 200.0, sigma: float = 0.6, low: int = 32,
                        high: int = 4096) -> list[int]:
    """Document lengths like real chat data: log-normal around `median` tokens, clipped."""
    rng = random.Random(seed)
    return [int(min(high, max(low, rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def packed_rows(batch: int, seq: int, seed: int = 0, median: float = 200.0) -> list[list[int]]:
    """`batch` rows of exactly `seq` tokens, each the concatenation of long-tailed documents (last one cut)."""
    lengths = iter(long_tailed_lengths(100_000, seed, median, high=seq))
    rows = []
    for _ in range(batch):
        row, left = [], seq
        while left:
            n = min(next(lengths), left)
            row.append(n)
            left -= n
        rows.append(row)
    return rows


def packed_position_ids(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """position_ids restarting at 0 for each document, as `phi3local.train.batching.collate` makes them."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows]).to(device)


def stopwatch() -> float:
    return time.perf_counter()
