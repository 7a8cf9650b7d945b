"""Interrupt a training run after some steps (as SIGTERM does) and resume it: what the exact-resume tests share."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from phi3local.train import recipe as loop


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
