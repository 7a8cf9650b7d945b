"""What the exact-resume and rank-equality tests share: interrupt a training run after some steps (as SIGTERM does)
and resume it; run a recipe as 2 torchrun ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from phi3local.train import recipe as loop

REPO = Path(__file__).resolve().parents[1]


def two_ranks(recipe: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m phi3local train recipe` (2 gloo ranks on CPU); asserts it ended 0."""
    launcher = Path(sys.executable).with_name("torchrun")
    head = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    done = subprocess.run([*head, "--standalone", "--nproc_per_node", "2", "-m", "phi3local", "train", str(recipe),
                           f"output_dir={run_dir}", "training.display=plain", *overrides],
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def interrupted_then_resumed(monkeypatch, recipe, stop_after: int, keys: tuple[str, ...]) -> list[list[float]]:
    """Run `recipe`, signal SIGTERM after `stop_after` steps, resume it; the logged `keys` of every step."""
    real_step, calls = loop.train_step, []

    def step_then_signal(run, batches):
        out = real_step(run, batches)
        calls.append(1)
        if len(calls) == stop_after:
            run.stop_signal.append(signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    with pytest.raises(loop.TrainingInterrupted):
        loop.run_training(recipe)
    monkeypatch.setattr(loop, "train_step", real_step)
    loop.run_training(recipe, resume=True)
    return [[r[k] for k in keys] for r in read_metrics(recipe.output_dir) if "loss" in r]
