"""Each shipped family recipe against its model's real numbers (phi3local/model/shapes.py, from FACTS)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from phi3local.config import load_recipe
from phi3local.model.shapes import known_shape
from phi3local.train.recipe import long_from

REPO = Path(__file__).resolve().parents[1]
# Phi3ForCausalLM's linear layers (fused q/k/v and gate/up), the names LoRA can target.
PHI3_LINEAR = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
FAMILY_RECIPES = {
    "phi3-mini-128k-qlora.yaml": "microsoft/Phi-3-mini-128k-instruct",
    "phi3.5-mini-qlora.yaml": "microsoft/Phi-3.5-mini-instruct",
    "phi3-medium-qlora.yaml": "microsoft/Phi-3-medium-4k-instruct",
    "phi4-mini-qlora.yaml": "microsoft/Phi-4-mini-instruct",
    "phi4-qlora.yaml": "microsoft/phi-4",
    "phi4-reasoning-qlora.yaml": "microsoft/Phi-4-reasoning",
    "phi4-mini-reasoning-qlora.yaml": "microsoft/Phi-4-mini-reasoning",
}
# No public source reachable here names a commit of these: the recipe says so instead of inventing one.
UNPINNED = {"phi4-reasoning-qlora.yaml", "phi4-mini-reasoning-qlora.yaml"}


@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES))
def test_recipe_fits_its_model(name):
    path = REPO / "recipes" / name
    recipe = load_recipe(path, [])
    model = recipe.model
    assert model.name_or_path == FAMILY_RECIPES[name]
    shape = known_shape(model.name_or_path)
    assert shape is not None
    text = path.read_text()

    if name in UNPINNED:  # said so in the header, with where to pick a commit and how to pass it
        header = " ".join(text.split("task:")[0].split())
        assert model.revision is None and "Revision: not pinned" in header
        assert f"huggingface.co/{model.name_or_path}/commits/main" in header and "model.revision=" in header
    else:  # a pinned revision, cited in a comment with the public source it came from
        assert re.fullmatch(r"[0-9a-f]{40}", model.revision or ""), model.revision
        assert f"huggingface.co/{model.name_or_path}/commit/{model.revision}" in text
    assert "24 GB" in text.split("task:")[0]  # the card it targets, said in the header

    assert recipe.data.max_seq_len <= shape.max_position_embeddings
    assert set(recipe.lora.target_modules) <= PHI3_LINEAR
    assert recipe.quantization.load_in_4bit and recipe.task == "causal_lm"
    if shape.tie_word_embeddings:  # training a copy of a tied matrix would untie it (load refuses it)
        assert not {m.rsplit(".", 1)[-1] for m in recipe.lora.modules_to_save} & {"embed_tokens", "lm_head"}
    if shape.vocab_size > 100_000:  # the loss never holds the full logits of a row
        assert recipe.training.loss_chunk_size * shape.vocab_size * 4 < 1 << 30
    # LongRoPE: batching keeps documents past the switch apart (the switch comes from the real shape).
    if shape.rope_type == "longrope":
        assert long_from(recipe) == shape.original_max_position_embeddings == 4096
        if recipe.data.max_seq_len > 4096:
            assert "long factors" in text  # the recipe says what happens past the switch
    else:
        assert long_from(recipe) is None


def test_reasoning_recipes_train_the_trace_unless_told_not_to():
    for name in UNPINNED:
        recipe = load_recipe(REPO / "recipes" / name, [])
        assert recipe.data.train_on_reasoning is True
        assert load_recipe(REPO / "recipes" / name, ["data.train_on_reasoning=false"]).data.train_on_reasoning is False
    assert load_recipe(REPO / "recipes" / "phi4-qlora.yaml", []).data.train_on_reasoning is True  # the default


def test_plan_of_phi4_on_a_24gb_card_fits_with_room(capsys):
    """`phi3local plan recipes/phi4-qlora.yaml --device-memory 24GB`: the real Phi-4 shapes (no download), one
    4096-token row per micro-batch with checkpointing, about half the card; the README quotes these figures."""
    import json

    from phi3local.cli import main

    assert main(["plan", str(REPO / "recipes" / "phi4-qlora.yaml"), "--device-memory", "24GB", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    gib = 1 << 30
    plan = report["plan"]
    assert plan["fits"] and (plan["micro_batch_size"], plan["max_seq_len"], plan["gradient_checkpointing"]) == (
        1, 4096, True)
    assert 11 * gib < plan["total"] < 13 * gib < plan["available"] <= 24 * gib
    assert report["model_positions"] == report["longest_seq_len"] == 16384
