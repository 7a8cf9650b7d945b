"""`phi3local eval`: the training loop's metrics for any run, checkpoint, adapter or merged model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from rich.console import Console

from phi3local.config import Recipe, load_recipe
from phi3local.errors import Phi3LocalError
from phi3local.train.distributed import World


class EvalError(Phi3LocalError, FileNotFoundError):
    """What `eval` was pointed at is not something it can evaluate."""


def _locate(path: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(recipe file, adapter folder, merged model folder) for what the user pointed at."""
    if (path / "adapter" / "adapter_config.json").is_file():  # a run or a checkpoint folder
        recipe = path / "recipe.yaml"
        return (recipe if recipe.is_file() else None), path / "adapter", None
    if (path / "adapter_config.json").is_file():
        recipe = path.parent / "recipe.yaml"
        return (recipe if recipe.is_file() else None), path, None
    if (path / "config.json").is_file():
        return None, None, path
    if not path.exists():
        raise EvalError(f"{path}: no such folder")
    raise EvalError(f"{path}: not a run, checkpoint, adapter or model folder "
                            "(no adapter/adapter_config.json, adapter_config.json or config.json)")


def evaluate_model(path: Path, data_file: Path, overrides: list[str] | None = None,
                   console: Console | None = None) -> dict:
    from phi3local.data.prepare import load_prepared, prepare
    from phi3local.model.load import add_start_reference, load_adapter, load_model, pick_device
    from phi3local.model.tokenizer import load_tokenizer
    from phi3local.train.recipe import evaluate
    from phi3local.train.tasks import task_for

    console = console or Console()
    recipe_file, adapter, merged = _locate(Path(path))
    recipe: Recipe = load_recipe(recipe_file, overrides)
    if recipe_file is None and adapter is not None:
        # A bare adapter folder: its own config names the base it was trained on.
        import json

        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base:
            recipe.model.name_or_path = base
    with tempfile.TemporaryDirectory() as tmp:
        recipe.data.train_file, recipe.data.validation_file = str(data_file), None
        recipe.data.val_fraction, recipe.data.prepared_dir = 0.0, str(Path(tmp) / "prepared")
        recipe.data.dedupe = False  # evaluate every row given
        if merged is not None:
            recipe.model.name_or_path, recipe.lora.enabled = str(merged), False
            recipe.quantization.load_in_4bit = False
        recipe.training.gradient_checkpointing = False
        tokenizer = load_tokenizer(str(adapter or merged))
        prepared = prepare(recipe, tokenizer, console=console)
        docs_ds, _ = load_prepared(prepared.out_dir)
        lora_enabled, start = recipe.lora.enabled, recipe.model.adapter
        # The adapter is loaded from disk, not created (it holds a start adapter's update too: model.adapter).
        recipe.lora.enabled, recipe.model.adapter = False, None
        loaded = load_model(recipe, tokenizer, pick_device())
        model = loaded.model
        if adapter is not None and lora_enabled:
            model = load_adapter(model, adapter, EvalError)
            recipe.lora.enabled, recipe.model.adapter = True, start
            add_start_reference(model, recipe, loaded.base_path)  # dpo/ipo after model.adapter: training's reference
        model.eval()
        with torch.no_grad():
            result = evaluate(recipe, model, task_for(recipe).documents(docs_ds), pad_id=tokenizer.pad_token_id,
                              device=loaded.device, world=World())
    result["rows"] = len(docs_ds)
    return result
