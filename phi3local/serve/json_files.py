"""The JSON files of model folders (config.json, genai_config.json, tokenizer files, reports): read, written.

read_json names the file (and the line of a syntax error) in a BadFileError, which the CLI prints as one line.
Part of the serving runtime (phi3local.serve: no torch, no transformers); the export stage uses the same
functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi3local.errors import Phi3LocalError


class BadFileError(Phi3LocalError, ValueError):
    """A file a stage reads (config.json, genai_config.json, a report) is not what it should be."""


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a BadFileError naming the file (and the line of a syntax error)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the file is damaged or cut short") from None
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise BadFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def as_id_list(value) -> list[int]:
    """An id field such as eos_token_id, which the files hold as one id, a list or null, as a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]
