"""The family's known shapes: parameter counts as published, and config.json read the same way."""

import json
from dataclasses import replace

import pytest

from phi3local.model.shapes import KNOWN_SHAPES, known_shape, shape_from_config


@pytest.mark.parametrize("model_id, billions", [
    ("microsoft/Phi-3-mini-4k-instruct", 3.82), ("microsoft/Phi-3.5-mini-instruct", 3.82),
    ("microsoft/Phi-3-medium-4k-instruct", 13.96), ("microsoft/Phi-4-mini-instruct", 3.84),
    # Phi-4 and its reasoning variants: 14.66B (published as 14.7B); Phi-4-mini-reasoning: the Phi-4-mini body.
    ("microsoft/phi-4", 14.66), ("microsoft/Phi-4-reasoning", 14.66), ("microsoft/Phi-4-reasoning-plus", 14.66),
    ("microsoft/Phi-4-mini-reasoning", 3.84),
])
def test_parameter_counts_match_the_published_sizes(model_id, billions):
    assert known_shape(model_id).parameter_count / 1e9 == pytest.approx(billions, abs=0.01)


def test_lookup_ignores_case_and_revision():
    assert known_shape("MICROSOFT/phi-4-mini-instruct@abc123").rotary_dims == 96
    assert known_shape("someone/else") is None


@pytest.mark.parametrize("rope_key, rope_type", [("rope_scaling", "su"), ("rope_parameters", "longrope")])
def test_shape_from_config_reads_hub_and_transformers5_configs(tmp_path, rope_key, rope_type):
    phi4 = KNOWN_SHAPES["microsoft/phi-4-mini-instruct"]
    config = {"hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
              "head_dim": 128, "intermediate_size": 8192, "vocab_size": 200064, "max_position_embeddings": 131072,
              "original_max_position_embeddings": 4096, rope_key: {"type" if rope_key == "rope_scaling" else "rope_type":
                                                                    rope_type, "short_factor": [1.0] * 48},
              "partial_rotary_factor": 0.75, "tie_word_embeddings": True, "pad_token_id": 199999,
              "eos_token_id": 200020, "_name_or_path": "microsoft/Phi-4-mini-instruct"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert replace(shape_from_config(tmp_path), notes=phi4.notes) == phi4


def test_phi4_shape():
    phi4 = known_shape("microsoft/phi-4")
    assert (phi4.num_hidden_layers, phi4.hidden_size, phi4.num_attention_heads, phi4.num_key_value_heads) == (
        40, 5120, 40, 10)
    assert (phi4.vocab_size, phi4.max_position_embeddings, phi4.rope_type, phi4.tie_word_embeddings) == (
        100352, 16384, "default", False)
    assert phi4.eos_token_ids == (100265,) and phi4.pad_token_id == 100349  # <|im_end|>; <|dummy_85|>, not a stop
    assert known_shape("microsoft/Phi-4-reasoning-plus").max_position_embeddings == 32768
    mini = known_shape("microsoft/Phi-4-mini-reasoning")
    assert (mini.rotary_dims, mini.original_max_position_embeddings, mini.tie_word_embeddings) == (96, 4096, True)


def test_longrope_switch_of_each_config_form():
    from phi3local.model.shapes import longrope_switch_of

    base = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128,
            "vocab_size": 100, "max_position_embeddings": 256}
    assert longrope_switch_of(base) is None  # plain RoPE
    hub = {**base, "original_max_position_embeddings": 64, "rope_scaling": {"type": "longrope"}}
    inside = {**base, "rope_parameters": {"rope_type": "longrope", "original_max_position_embeddings": 64}}
    assert longrope_switch_of(hub) == longrope_switch_of(inside) == 64  # transformers 5 may keep it inside
    assert longrope_switch_of({**base, "rope_parameters": {"rope_type": "longrope"}}) is None  # no switch named
