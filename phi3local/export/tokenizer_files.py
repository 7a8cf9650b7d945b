"""A model folder's tokenizer: its files copied as they are, loaded, and the ids that end generation."""

from __future__ import annotations

import shutil
from pathlib import Path

from phi3local.serve.json_files import read_json, write_json

# Files that make up a tokenizer folder. onnxruntime-genai (onnxruntime-extensions) needs tokenizer.json
# AND tokenizer_config.json: without the config it fails with "Failed to open a json file".
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files byte for byte and make sure tokenizer_config.json carries the chat template.

    The files are copied rather than re-saved through transformers: transformers 5 re-saves a
    `LlamaTokenizer` as `TokenizersBackend`, moves the chat template out into chat_template.jinja and
    rewrites tokenizer.json, and its `AutoTokenizer` encodes Phi-3 text differently from the tokenizer.json.
    """
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    cfg_path = dst / "tokenizer_config.json"
    jinja = dst / "chat_template.jinja"
    if cfg_path.is_file() and jinja.is_file():
        cfg = read_json(cfg_path)
        if not cfg.get("chat_template"):
            cfg["chat_template"] = jinja.read_text(encoding="utf-8")
            write_json(cfg_path, cfg)
    return copied


def find_tokenizer_dir(*candidates: Path | None) -> Path | None:
    for c in candidates:
        if c is not None and (Path(c) / "tokenizer.json").is_file():
            return Path(c)
    return None


def load_hf_tokenizer(folder: Path):
    """The project's tokenizer loader when present, else a PreTrainedTokenizerFast from tokenizer.json."""
    folder = Path(folder)
    try:
        from phi3local.model.tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(folder)
    from transformers import PreTrainedTokenizerFast

    cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    kwargs = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            kwargs[key] = value
    template = cfg.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **kwargs)
