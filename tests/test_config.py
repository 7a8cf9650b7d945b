import dataclasses
import math
import re
import typing
from pathlib import Path

import pytest
import yaml

from phi3local.cli import build_parser
from phi3local.config import Range, Recipe, RecipeError, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _numeric_fields() -> list[tuple[str, dataclasses.Field, type]]:
    """(dotted key, field, int or float) for every int/float field (Optional ones too) of Recipe and its sections."""
    out = []
    sections = [("", Recipe)]
    recipe_hints = typing.get_type_hints(Recipe)
    sections += [(f"{f.name}.", recipe_hints[f.name]) for f in dataclasses.fields(Recipe)
                 if dataclasses.is_dataclass(recipe_hints[f.name])]
    for prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            kinds = [a for a in (typing.get_args(hint) or (hint,)) if a in (int, float)]
            if kinds:
                out.append((prefix + f.name, f, kinds[0]))
    return out


NUMERIC = _numeric_fields()


def _nested(key: str, value) -> dict:
    *sections, name = key.split(".")
    out = {name: value}
    for section in reversed(sections):
        out = {section: out}
    return out


def _load_one(tmp_path: Path, key: str, value, name: str) -> Recipe:
    """Load a recipe file that sets `key` to `value` (and max_steps=1, so epochs=0 alone is not a zero-step run)."""
    values = {} if key == "training.max_steps" else {"training": {"max_steps": 1}}
    for k, v in _nested(key, value).items():
        values[k] = {**values.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return load_recipe(path)


def _outside_and_boundary(rule: Range, kind: type) -> tuple[list, list]:
    """Values just outside each bound of `rule`, and the nearest values inside it."""
    down = (lambda x: x - 1) if kind is int else (lambda x: math.nextafter(x, -math.inf))
    up = (lambda x: x + 1) if kind is int else (lambda x: math.nextafter(x, math.inf))
    outside, inside = [], []
    if rule.ge is not None:
        outside.append(down(rule.ge)), inside.append(rule.ge)
    if rule.gt is not None:
        outside.append(rule.gt), inside.append(up(rule.gt))
    if rule.le is not None:
        outside.append(up(rule.le)), inside.append(rule.le)
    if rule.lt is not None:
        outside.append(rule.lt), inside.append(down(rule.lt))
    return [kind(v) for v in outside], [kind(v) for v in inside]


def test_the_walk_sees_every_section_and_the_optional_fields():
    keys = {key for key, _, _ in NUMERIC}
    assert {"seed", "data.max_tokens", "data.val_fraction", "lora.r", "training.lr", "training.peak_flops",
            "eval.max_new_tokens"} <= keys
    assert "data.packing" not in keys  # bool is not a number here


@pytest.mark.parametrize(("key", "f", "kind"), NUMERIC, ids=[key for key, _, _ in NUMERIC])
def test_every_numeric_field_has_a_rule_that_is_enforced(key, f, kind, tmp_path):
    rule = f.metadata.get("range")
    assert isinstance(rule, Range) and rule != Range(), f"{key} declares no range rule"
    # A string default is a Literal choice ("auto"), which the range does not apply to.
    assert f.default is None or isinstance(f.default, str) or rule.contains(f.default), (
        f"{key}: the default {f.default!r} breaks {rule}")
    assert recipe_from_dict(_nested(key, f.default) if f.default is not None else {}) is not None

    outside, inside = _outside_and_boundary(rule, kind)
    for i, value in enumerate(outside):
        path_name = f"{key}-outside-{i}.yaml"
        with pytest.raises(RecipeError) as e:
            _load_one(tmp_path, key, value, path_name)
        message = str(e.value)
        assert message.startswith(f"{tmp_path / path_name}: {key}: {value!r} is out of range (must be {rule}"), message
    for i, value in enumerate(inside):
        recipe = _load_one(tmp_path, key, value, f"{key}-inside-{i}.yaml")
        section = recipe
        for part in key.split(".")[:-1]:
            section = getattr(section, part)
        assert getattr(section, key.split(".")[-1]) == value


def test_the_rules_read_as_the_messages_say_them():
    assert [str(r) for r in (Range(ge=1), Range(gt=0), Range(ge=0, lt=1), Range(ge=0, le=1),
                             Range(ge=0, le=2**32 - 1), Range(le=5))] == [
        ">= 1", "> 0", "in [0, 1)", "in [0, 1]", "in [0, 4294967295]", "<= 5"]


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


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_val_fraction_must_be_in_0_1(value, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data:\n  val_fraction: {value}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert str(e.value) == f"{bad}: data.val_fraction: {value!r} is out of range (must be in [0, 1))"
    assert load_recipe(None, ["data.val_fraction=0"]).data.val_fraction == 0.0
    assert load_recipe(None, ["data.val_fraction=0.99"]).data.val_fraction == 0.99


@pytest.mark.parametrize(("override", "expected"), [
    ("training.max_steps=-5", "training.max_steps: -5 is out of range (must be >= 0)"),
    ("training.epochs=-1", "training.epochs: -1 is out of range (must be >= 0)"),
    ("training.micro_batch_size=0", "training.micro_batch_size: 0 is out of range (must be >= 1)"),
    ("training.grad_accum=0", "training.grad_accum: 0 is out of range (must be >= 1)"),
    ("training.log_every=0", "training.log_every: 0 is out of range (must be >= 1)"),
    ("training.lr=0", "training.lr: 0.0 is out of range (must be > 0)"),
    ("training.lr=-1e-4", "training.lr: -0.0001 is out of range (must be > 0)"),
    ("training.min_lr_ratio=1.5", "training.min_lr_ratio: 1.5 is out of range (must be in [0, 1])"),
    ("training.max_grad_norm=-1", "training.max_grad_norm: -1.0 is out of range (must be >= 0)"),
    ("lora.r=0", "lora.r: 0 is out of range (must be >= 1)"),
    ("lora.alpha=0", "lora.alpha: 0 is out of range (must be > 0)"),
    ("lora.dropout=1", "lora.dropout: 1.0 is out of range (must be in [0, 1))"),
    ("data.max_seq_len=8", "data.max_seq_len: 8 is out of range (must be >= 16)"),
    ("data.max_tokens=0", "data.max_tokens: 0 is out of range (must be >= 1, or null)"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens: 0 is out of range (must be >= 1)"),
    ("seed=-1", "seed: -1 is out of range (must be in [0, 4294967295])"),
])
def test_out_of_range_overrides_name_the_key_value_rule_and_file(override, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPES[0], [override])
    assert str(e.value) == f"{RECIPES[0]} (with overrides): {expected}"


def test_nan_and_infinity_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: .nan\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(bad))}: training\.lr: nan is not a finite number"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"training\.max_grad_norm: inf is not a finite number"):
        load_recipe(None, ["training.max_grad_norm=.inf"])


def test_zero_epochs_and_zero_max_steps_would_train_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 0\n")  # max_steps defaults to 0
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    message = str(e.value)
    assert message.startswith(f"{bad}: ") and "would train zero steps" in message
    assert "training.epochs=0" in message and "training.max_steps=0" in message
    with pytest.raises(RecipeError, match=r"^<dict>: training\.epochs=0 with training\.max_steps=0 would train zero"):
        recipe_from_dict({"training": {"epochs": 0, "max_steps": 0}})
    # max_steps > 0 overrides epochs, so epochs=0 is fine then.
    assert load_recipe(bad, ["training.max_steps=10"]).training.max_steps == 10


def test_min_tokens_above_max_tokens_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  min_tokens: 500\n  max_tokens: 100\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    message = str(e.value)
    assert message.startswith(f"{bad}: data.min_tokens=500 is greater than data.max_tokens=100")
    assert load_recipe(bad, ["data.max_tokens=500"]).data.max_tokens == 500
    assert load_recipe(bad, ["data.max_tokens=null"]).data.max_tokens is None


def test_recipe_from_dict_checks_ranges_too():
    with pytest.raises(RecipeError, match=r"^my-source: training\.keep_checkpoints: -1 is out of range \(must be >= 0\)"):
        recipe_from_dict({"training": {"keep_checkpoints": -1}}, source="my-source")


def test_on_damaged_checkpoint():
    assert Recipe().training.on_damaged_checkpoint == "previous"
    assert load_recipe(None, ["training.on_damaged_checkpoint=stop"]).training.on_damaged_checkpoint == "stop"
    with pytest.raises(RecipeError, match=r"training\.on_damaged_checkpoint: 'skip' is not one of 'previous', 'stop'"):
        load_recipe(None, ["training.on_damaged_checkpoint=skip"])
    names = [f.name for f in dataclasses.fields(Recipe().training)]
    assert names.index("on_damaged_checkpoint") == names.index("keep_checkpoints") + 1


def test_every_subcommand_has_help():
    parser = build_parser()
    for command in ("prepare", "train", "eval", "merge", "export", "chat", "serve", "azure", "doctor", "bench"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([command, "--help"])
        assert e.value.code == 0


def test_serve_and_azure_without_their_arguments_are_usage_errors():
    from phi3local.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve"])  # no model folder
    assert e.value.code == 2
    assert main(["azure"]) == 2  # no action: its help, and the usage status
