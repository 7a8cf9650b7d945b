"""Find the exported model under AZUREML_MODEL_DIR, locally and on a managed online endpoint.

Locally AZUREML_MODEL_DIR is the export folder itself. On a managed endpoint it is
/var/azureml-app/azureml-models/<name>/<version> and the registered folder keeps its own name inside
(`./phi3-onnx` -> `$AZUREML_MODEL_DIR/phi3-onnx/`), so the model is the one folder below that holds
genai_config.json.
"""

from __future__ import annotations

from pathlib import Path

from phi3local.serve.errors import ModelDirError

MARKER = "genai_config.json"  # every onnxruntime-genai model folder has one
MAX_DEPTH = 3  # <folder>/ and a little nesting; deeper trees are not an Azure model layout


def find_model_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist (set AZUREML_MODEL_DIR, or --model_dir, to the "
                            "folder `phi3local export` wrote or to the registered model's folder)")
    if (root / MARKER).is_file():
        return root
    found = sorted(p.parent for p in _markers(root, MAX_DEPTH))
    if not found:
        raise ModelDirError(f"no exported model under {root}: no folder holds {MARKER} (serve the folder "
                            "`phi3local export` wrote, or register that folder as the model)")
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(root)) for p in found)
        raise ModelDirError(f"{len(found)} exported models under {root} ({listed}); it must hold exactly one "
                            "(register one export folder per model)")
    return found[0]


def _markers(folder: Path, depth: int):
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            if (child / MARKER).is_file():
                yield child / MARKER  # a model folder: its own subfolders are not other models
            elif depth > 1:
                yield from _markers(child, depth - 1)
