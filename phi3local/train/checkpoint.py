"""Atomic, self-contained checkpoints and exact resume.

A checkpoint folder is written under a temporary name and renamed only when every file is on disk,
so a crash or kill during a save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from phi3local import versions

CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch comes from
    batch_in_epoch: int = 0  # index of the next micro-batch within that epoch's plan
    trained_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    finished: bool = False
    elapsed_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # validation results so far


def package_versions() -> dict[str, str]:
    return versions.package_versions(
        ("phi3local", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, state: TrainerState, recipe_yaml: str, tokenizer=None
) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f"{TMP_PREFIX}step-{state.step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "adapter")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "versions.json").write_text(json.dumps(package_versions(), indent=2))
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. the final step after a signal)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
            and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def clean_stale_temporaries(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    ckpts = list_checkpoints(run_dir)
    keep = {p for p in ckpts[-keep_last:]} if keep_last > 0 else set(ckpts)
    for p in ckpts:
        if p not in keep and (best_step is None or p.name != f"step-{best_step}"):
            shutil.rmtree(p)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainerState:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(path / "adapter" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"{path}: adapter weights do not fit this model (unexpected: {unexpected[:5]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


