from pathlib import Path

import pytest

from phi3local.cli import build_parser
from phi3local.config import Recipe, RecipeError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_the_shipped_recipes_are_all_there():
    names = {p.name for p in RECIPES}
    assert {"phi3-mini-4k-qlora.yaml", "phi3-mini-128k-qlora.yaml", "phi3.5-mini-qlora.yaml",
            "phi3-mini-classification.yaml", "tiny-cpu.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.source == str(path)
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again).to_dict() == recipe.to_dict()


def test_overrides_are_typed_by_the_dataclass():
    r = load_recipe(RECIPES[0], ["training.lr=1e-4", "data.max_seq_len=2048", "lora.target_modules=[qkv_proj]",
                                 "data.packing=false", "model.tokenizer=null"])
    assert r.training.lr == 1e-4 and isinstance(r.training.lr, float)
    assert r.data.max_seq_len == 2048 and r.lora.target_modules == ["qkv_proj"]
    assert r.data.packing is False and r.model.tokenizer is None


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: 1e-4\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*training\.learning_rate"):
        load_recipe(bad)


def test_wrong_type_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  max_seq_len: long\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: data\.max_seq_len: expected an integer"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"data\.on_error: 'ignore' is not one of"):
        load_recipe(None, ["data.on_error=ignore"])
    with pytest.raises(RecipeError, match="not of the form key=value"):
        load_recipe(None, ["training.lr"])


def test_every_subcommand_has_help():
    parser = build_parser()
    for command in ("prepare", "train", "eval", "merge", "export", "chat", "serve", "azure", "bench"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([command, "--help"])
        assert e.value.code == 0


def test_unimplemented_stages_exit_non_zero():
    from phi3local.cli import main

    assert main(["serve"]) != 0
    assert main(["azure"]) != 0
