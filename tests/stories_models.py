"""stories260K QLoRA-tuned on tests/stories_task.py's format, merged and exported once per test session.

Shared by tests/test_serve.py (the served model) and tests/test_safety.py (a fine-tuned model to score).
"""

from __future__ import annotations

from pathlib import Path

from export_helpers import cached
from stories_task import write_task

REPO = Path(__file__).resolve().parents[1]


def _build(folder: Path) -> None:
    from phi3local.config import load_recipe
    from phi3local.export.merge import merge_adapter
    from phi3local.export.onnx import export_onnx
    from phi3local.train.recipe import run_training

    folder.mkdir(parents=True)
    train_file, val_file = write_task(folder, n_val=8)
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [
        "model.name_or_path=stories260k", f"data.train_file={train_file}", f"data.validation_file={val_file}",
        f"output_dir={folder / 'run'}", "lora.modules_to_save=[]", "training.lr=3e-3", "training.max_steps=20",
        "training.checkpoint_every=0", "eval.every=0", "eval.generate_samples=0", "training.display=none",
        "quantization.load_in_4bit=true",
    ])
    run_training(recipe)
    merge_adapter(folder / "run", folder / "merged", dtype="float32")
    export_onnx(folder / "merged", folder / "stories-onnx", precision="fp32", target="cpu", parity="none", show=False)


def tuned_stories(tmp_path_factory) -> Path:
    """The folder holding run/ (the training run), merged/ and stories-onnx/ (the fp32 CPU export)."""
    return cached(tmp_path_factory, "stories-tuned", _build)
