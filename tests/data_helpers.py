"""Shared by the data tests: paths of the shared artifacts, Phi-3's real tokenizer, quiet consoles."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from phi3local.config import recipe_from_dict
from phi3local.model.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_DIR = SHARED / "phi3-mini-tokenizer"
CHAT = SHARED / "azure-phi3-finetune-chat"
DISTILL = SHARED / "azure-distillation-conversation" / "train_conversation.jsonl"
ALPACA = SHARED / "llamafactory-alpaca-demo" / "alpaca_en_demo.json"


def phi3_tokenizer(chat_template: str | None = None):
    """Phi-3-mini's real tokenizer, read in place; optionally with another chat template."""
    assert TOKENIZER_DIR.is_dir(), f"the data tests need the shared artifacts at {TOKENIZER_DIR}"
    tok = load_tokenizer(TOKENIZER_DIR)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def make_recipe(out, task="causal_lm", labels=None, **data):
    return recipe_from_dict({"task": task, "output_dir": str(out), "model": {"labels": labels or []}, "data": data})
