"""The tiny family members: each carries its real model's config features, deterministically; their
tokenizers train the end of a turn even where the pad token is a stop id; export reads both rope forms."""

from __future__ import annotations

import json
import shutil

import export_helpers as H
import pytest

from phi3local.data.demo import demo_texts
from phi3local.data.template import IGNORE, encode_conversation
from phi3local.export.onnx import export_onnx, hub_rope_config
from phi3local.model.family import MEMBERS, ensure_tiny_member
from phi3local.model.shapes import known_shape, shape_from_config
from phi3local.model.tokenizer import load_tokenizer, phi4_im_special_tokens
from phi3local.train.batching import collate

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
                {"role": "assistant", "content": "Hi, how can I help?"}]


def end_of_turn(name: str) -> str:
    return "<|im_end|>" if MEMBERS[name].tokenizer == "phi4-im" else "<|end|>"


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_member_carries_the_real_models_features(name, tmp_path_factory):
    folder = H.family_member(tmp_path_factory, name)
    tiny, real = shape_from_config(folder), known_shape(MEMBERS[name].imitates)
    assert (tiny.rope_type, tiny.partial_rotary_factor, tiny.tie_word_embeddings) == (
        real.rope_type, real.partial_rotary_factor, real.tie_word_embeddings)
    assert tiny.num_attention_heads // tiny.num_key_value_heads == real.num_attention_heads // real.num_key_value_heads
    if real.rope_type == "longrope":
        assert tiny.original_max_position_embeddings == 64 < tiny.max_position_embeddings
        rope = json.loads((folder / "config.json").read_text())["rope_parameters"]  # as transformers 5 saves it
        assert rope["rope_type"] == "longrope" and "type" not in rope
        assert len(rope["short_factor"]) == len(rope["long_factor"]) == tiny.rotary_dims // 2
        assert rope["short_factor"] != rope["long_factor"]
    tokenizer = load_tokenizer(folder)
    assert tiny.vocab_size >= len(tokenizer)  # rows padded to a multiple of 64, as Phi-3's 32064
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids(end_of_turn(name)) in stops
    if name == "phi4mini":
        # Phi-4-mini: <|end|> ends a turn (eos), <|endoftext|> pads and is not the end of a turn.
        assert tiny.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|end|>"),)
        assert tiny.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert tiny.rotary_dims == 48 and (tiny.rotary_dims // 2) % 8 == 0  # onnxruntime-genai's CPU rule
        assert tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True) == (
            "<|user|>Hello there!<|end|><|assistant|>")
    if name == "phi4":
        # Phi-4: <|im_end|> ends a turn (eos), the pad <|dummy_85|> ends nothing; untied, full rotary, GQA 4:1.
        end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|dummy_85|>")
        assert tiny.eos_token_ids == (end,) and tiny.pad_token_id == tokenizer.pad_token_id == pad
        assert pad not in stops and tiny.rotary_dims == tiny.dims_per_head
        # Its 96 added tokens close the vocabulary in Phi-4's order, and every embedding row is a token (as
        # Phi-4's 100352 rows are); each strips the whitespace on both sides, as there.
        added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        assert [t["content"] for t in added[-96:]] == phi4_im_special_tokens()
        assert added[-1]["id"] == tiny.vocab_size - 1 == len(tokenizer) - 1
        assert all(t["lstrip"] and t["rstrip"] for t in added[-96:])
        assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False) == (
            "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hello there!<|im_end|>"
            "<|im_start|>assistant<|im_sep|>Hi, how can I help?<|im_end|>")
        assert tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True) == (
            "<|im_start|>user<|im_sep|>Hello there!<|im_end|><|im_start|>assistant<|im_sep|>")


def test_member_build_is_deterministic_and_cached(tmp_path, tmp_path_factory):
    first = H.family_member(tmp_path_factory, "phi4mini")
    again = ensure_tiny_member("phi4mini", tmp_path / "again", demo_texts())
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_member("phi4mini", again, demo_texts()) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("name", ["longrope", "phi4mini", "phi4"])
def test_end_of_turn_is_trained_and_padding_is_not(name, tmp_path_factory):
    """Phi-3's pad (<|endoftext|>) is also a stop id, Phi-4-mini's and Phi-4's are not: either way the end of
    turn (<|end|>, Phi-4's <|im_end|>) that closes the assistant turn is a target, and only the pads are masked
    (by position, never by id)."""
    tokenizer = load_tokenizer(H.family_member(tmp_path_factory, name))
    end = tokenizer.convert_tokens_to_ids(end_of_turn(name))
    encoded = encode_conversation(tokenizer, CONVERSATION, 128)
    assert end in [t for t in encoded.labels if t != IGNORE]
    short = encode_conversation(tokenizer, CONVERSATION[1:], 128)
    batch = collate([[0], [1]], [encoded.input_ids, short.input_ids], [encoded.labels, short.labels],
                    pad_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert (batch.input_ids[1, n:] == tokenizer.pad_token_id).all() and (batch.targets[1, n - 1:] == IGNORE).all()
    assert end in batch.targets[1, :n].tolist() and end in batch.targets[0].tolist()


def test_export_reads_the_hub_rope_form(tmp_path, tmp_path_factory):
    """(The transformers-5 form is what merge writes: tests/test_family_e2e.py exports it.)"""
    base = H.family_member(tmp_path_factory, "longrope")
    hub = json.loads((base / "config.json").read_text())
    rewritten = hub_rope_config(hub)
    assert rewritten["rope_scaling"]["type"] == "longrope" and "rope_parameters" not in rewritten
    assert hub_rope_config(rewritten) is None  # already the Hub form: used as it is
    folder = tmp_path / "hub-form"
    shutil.copytree(base, folder)
    (folder / "config.json").write_text(json.dumps(rewritten, indent=2))
    report = export_onnx(folder, tmp_path / "onnx", precision="fp32", new_tokens=8, show=False)
    assert report["parity"]["passed"] and report["parity"]["greedy_all_agree"]


def test_training_a_copy_of_tied_embeddings_is_refused(tmp_path, tmp_path_factory):
    from pathlib import Path

    from phi3local.config import load_recipe
    from phi3local.model.load import ModelSetupError, load_model

    folder = H.family_member(tmp_path_factory, "phi4mini")
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
    recipe = load_recipe(recipe_path, [f"model.name_or_path={folder}", f"output_dir={tmp_path}"])
    assert recipe.lora.modules_to_save == ["embed_tokens", "lm_head"]  # the tiny default's setting
    with pytest.raises(ModelSetupError, match=r"lora.modules_to_save .* ties its input and output embeddings"):
        load_model(recipe, load_tokenizer(folder))
    untied = H.family_member(tmp_path_factory, "medium")  # the same setting on an untied model is fine
    recipe = load_recipe(recipe_path, [f"model.name_or_path={untied}", f"output_dir={tmp_path}"])
    assert load_model(recipe, load_tokenizer(untied)).model is not None


def test_a_partial_rotary_the_cpu_kernel_cannot_run_is_refused_before_the_builder(tmp_path, tmp_path_factory):
    from phi3local.export.onnx import ExportError

    folder = tmp_path / "head32"
    shutil.copytree(H.family_member(tmp_path_factory, "phi4mini"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=96, head_dim=32)  # 0.75 x 32 = 24 rotary dims: 12 is not a multiple of 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"rotary_dims / 2 \(12\) <= head_dim / 2 and a multiple of 8"):
        export_onnx(folder, tmp_path / "onnx", precision="fp32", show=False)
    assert not (tmp_path / "onnx").exists()
