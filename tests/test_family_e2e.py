"""Each tiny family member through the whole chain: train (QLoRA, loss falls) -> merge (equals base+adapter,
tied embeddings stay tied) -> export fp32 (parity at every position, greedy identical; for LongRoPE members
prompts past the switch and a decode across it) -> chat on the export (greedy = PyTorch's) -> export int4
(error and agreement reported).

The members (phi3local/model/family.py) carry the real members' config features: LongRoPE with a switch at
64 tokens (Phi-3-128k / Phi-3.5), GQA (Phi-3-medium), partial rotary + tied embeddings + Phi-4-mini's tokens
(Phi-4-mini), GQA 4:1 + untied + Phi-4's <|im_start|> tokens and template (Phi-4). Each member is built,
trained and exported once for this module (module-scoped fixtures); on the 2-core CPU the Phi-4 member adds
about 30 s to the module's two minutes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import export_helpers as H
import pytest
import torch
from safetensors import safe_open

from phi3local.config import load_recipe
from phi3local.export.merge import merge_adapter
from phi3local.export.onnx import export_onnx
from phi3local.model.family import MEMBERS
from phi3local.train.recipe import run_training

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=sorted(MEMBERS))
def chain(request, tmp_path_factory):
    """name, base folder, training summary, merged folder + report, fp32 and int4 export reports."""
    name = request.param
    base = H.family_member(tmp_path_factory, name)
    folder = tmp_path_factory.mktemp(f"chain-{name}")
    rows = (REPO / "phi3local" / "assets" / "demo_chat.jsonl").read_text(encoding="utf-8").splitlines()
    (folder / "train.jsonl").write_text("\n".join(rows[:400]) + "\n", encoding="utf-8")  # enough for 12 steps
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [
        f"model.name_or_path={base}", f"output_dir={folder / 'run'}", "lora.modules_to_save=[]",
        f"data.train_file={folder / 'train.jsonl'}",
        "training.max_steps=12", "training.lr=3e-3", "training.checkpoint_every=0", "eval.every=0",
        "eval.generate_samples=0", "training.display=none", "data.max_seq_len=128", "data.val_fraction=0.1",
    ])
    summary = run_training(recipe)
    merge = merge_adapter(folder / "run", folder / "merged", dtype="float32")
    fp32 = export_onnx(folder / "merged", folder / "fp32", precision="fp32", new_tokens=NEW_TOKENS, show=False)
    int4 = export_onnx(folder / "merged", folder / "int4", precision="int4", new_tokens=NEW_TOKENS, show=False)
    return {"name": name, "base": base, "folder": folder, "summary": summary, "merge": merge, "fp32": fp32,
            "int4": int4}


def test_training_lowers_the_validation_loss(chain):
    summary = chain["summary"]
    first, final = summary["first_val_loss"], summary["final"]["val_loss"]
    assert final < first - 0.05, (chain["name"], first, final)


def test_merge_equals_base_plus_adapter_and_keeps_the_config_sound(chain):
    merge, merged = chain["merge"], chain["folder"] / "merged"
    assert merge["passed"] and merge["max_abs_diff"] <= 1e-4 * merge["logit_scale"]
    assert merge["relative_diff"] <= 1e-6  # measured 2.2e-7 to 3.5e-7 (fp32 merge of an fp32 base)
    assert merge["adapter_effect_max_abs"] > 0  # the adapter was trained, so the check compared something
    config = json.loads((merged / "config.json").read_text())
    base_config = json.loads((chain["base"] / "config.json").read_text())
    assert config["use_cache"] is True and "auto_map" not in config
    # The embedding keeps its rows (never resized to len(tokenizer)).
    assert config["vocab_size"] == base_config["vocab_size"]
    assert config["tie_word_embeddings"] == base_config["tie_word_embeddings"] == merge["tie_word_embeddings"]


def test_tied_embeddings_stay_tied_through_merge_and_export(chain):
    from transformers import AutoModelForCausalLM

    merged = chain["folder"] / "merged"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    shared = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if not MEMBERS[chain["name"]].tie_word_embeddings:  # separate, as in its real model, and kept so
        assert "lm_head.weight" in keys and not shared
        return
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys and shared  # saved once
    # The fp32 export shares the matrix too: its weights are one embedding's worth smaller than untied.
    from phi3local.model.shapes import shape_from_config

    shape = shape_from_config(merged)
    untied_bytes = 4 * (shape.parameter_count + shape.vocab_size * shape.hidden_size)
    assert chain["fp32"]["model_bytes"] < untied_bytes - 2 * shape.vocab_size * shape.hidden_size


def test_fp32_export_matches_at_every_position_with_identical_greedy(chain):
    parity = json.loads((chain["folder"] / "fp32" / "parity.json").read_text())
    assert chain["fp32"]["parity"]["passed"]
    for p in parity["prompts"]:
        tol = 1e-4 * p["logit_scale"]
        assert max(p["prompt_max_abs_diff_per_position"]) <= tol
        compared = len(p["decode_max_abs_diff_per_position"])
        if p.get("decoded_through_stops"):
            assert compared == NEW_TOKENS
        else:  # a turn ended by a stop token: every step before it is compared
            assert compared >= len(p["greedy_tokens_onnx"]) - 1
        assert max(p["decode_max_abs_diff_per_position"], default=0.0) <= tol
        assert p["greedy_first_divergence"] is None and p["greedy_identical"] == p["greedy_compared"]
        assert p["tokenizer_match"] and p["logits_alignment_ok"]
    switch = MEMBERS[chain["name"]].original_max_position_embeddings
    if switch is not None:  # the long factors were compared, in the prompt and through the KV cache
        # merge wrote the transformers-5 form, which the builder cannot read: export converted a staging
        # copy and left the merged folder as it was.
        rope = json.loads((chain["folder"] / "merged" / "config.json").read_text())["rope_parameters"]
        assert rope["rope_type"] == "longrope" and "type" not in rope
        assert any(p["prompt_on_long_factors"] and p["prompt_tokens"] > switch for p in parity["prompts"])
        assert any(p["decode_crosses_switch"] for p in parity["prompts"])
    else:
        assert all("longrope_switch" not in p for p in parity["prompts"])


def test_chat_on_the_export_answers_as_pytorch_greedy(chain):
    """`chat`'s model (the one `serve` runs too) renders the member's own template as transformers does and
    answers token for token as greedy fresh forwards of the merged model (Phi-4: the <|im_start|> format)."""
    from transformers import AutoModelForCausalLM

    from phi3local.model.tokenizer import load_tokenizer
    from phi3local.serve.chat import OnnxChatModel

    messages = [{"role": "system", "content": "Answer who and what."},
                {"role": "user", "content": "Tom liked a funny mug at school. Who and what?"}]
    merged = chain["folder"] / "merged"
    tokenizer = load_tokenizer(merged)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    onnx = OnnxChatModel(chain["folder"] / "fp32")
    result = onnx.generate(messages, max_new_tokens=NEW_TOKENS)
    assert result.prompt == prompt
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    stops = set(stops if isinstance(stops, list) else [stops])
    assert stops <= onnx.stop_ids
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected: list[int] = []
    with torch.no_grad():
        while len(expected) < NEW_TOKENS and not (expected and expected[-1] in onnx.stop_ids):
            expected.append(int(model(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax()))
    assert result.tokens == expected


def test_int4_export_reports_error_and_agreement(chain):
    parity = chain["int4"]["parity"]
    assert "passed" not in parity  # reported, not bounded
    assert math.isfinite(parity["relative_error"]) and parity["relative_error"] > 0
    assert 0 <= parity["greedy_identical"] <= parity["greedy_compared"]
    fp32, summary = chain["fp32"]["parity"], chain["summary"]
    print(f"\n{chain['name']}: val loss {summary['first_val_loss']:.3f} -> {summary['final']['val_loss']:.3f}; "
          f"merge {chain['merge']['relative_diff']:.2g}; fp32 {fp32['relative_error']:.2g}, greedy "
          f"{fp32['greedy_identical']}/{fp32['greedy_compared']}; int4 {parity['relative_error']:.3g}, greedy "
          f"{parity['greedy_identical']}/{parity['greedy_compared']}")
