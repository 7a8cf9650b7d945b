"""merge: base (unquantised) + LoRA adapter -> a plain HF folder, verified against base+adapter."""

from __future__ import annotations

import json

import export_helpers as H
import pytest
import torch

from phi3local.export import merge as merge_mod
from phi3local.export.merge import MergeError, MergeVerificationError, merge_adapter
from phi3local.folders import OutputExistsError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return H.tiny_base(tmp_path_factory)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return H.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return H.tiny_merged(tmp_path_factory)


def test_merged_equals_base_plus_adapter_and_loads_with_plain_transformers(merged, run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = json.loads((merged / "merge_report.json").read_text())
    assert report["passed"] and report["dtype"] == "float32" and report["task_type"] == "CAUSAL_LM"
    assert report["tolerance_relative"] == 1e-4
    assert report["max_abs_diff"] <= 1e-4 * report["logit_scale"]
    assert report["adapter_effect_max_abs"] > 0.1 * report["logit_scale"]  # the adapter really changes outputs

    # Independently of the report: plain transformers on the merged folder == peft base+adapter.
    tok = H.load_test_tokenizer(merged)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert type(plain).__name__ == "Phi3ForCausalLM"
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                    str(run / "adapter")).eval()
    base_only = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for prompt in H.PROMPTS:
        a, b = H.logits_of(plain, tok, prompt), H.logits_of(ref, tok, prompt)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        assert (a - H.logits_of(base_only, tok, prompt)).abs().max() > 0.1  # not just the base

    from safetensors import safe_open

    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert json.loads((merged / "config.json").read_text()).get("quantization_config") is None


def test_tokenizer_files_and_chat_template_are_saved(merged, base):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (merged / name).read_bytes() == (base / name).read_bytes()
    assert "<|assistant|>" in json.loads((merged / "tokenizer_config.json").read_text())["chat_template"]


def test_generation_config_has_every_stop_id(merged):
    gen = json.loads((merged / "generation_config.json").read_text())
    vocab = {t["content"]: t["id"] for t in json.loads((merged / "tokenizer.json").read_text())["added_tokens"]}
    assert isinstance(gen["eos_token_id"], list)
    assert {vocab["<|end|>"], vocab["<|endoftext|>"]} <= set(gen["eos_token_id"])
    from transformers import GenerationConfig

    assert vocab["<|end|>"] in GenerationConfig.from_pretrained(merged).eos_token_id


def test_replaces_only_its_own_output_and_only_with_overwrite(run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # a folder merge did not write is never replaced
        with pytest.raises(OutputExistsError, match="did not write"):
            merge_adapter(run, out, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "precious"
    mine = tmp_path / "mine"
    merge_adapter(run, mine)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge_adapter(run, mine)
    # The adapter folder itself is accepted too.
    report = merge_adapter(run / "adapter", mine, overwrite=True)
    assert report["passed"] and (mine / "model.safetensors").exists() and (mine / ".phi3local.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_bf16_merge_reports_its_tolerance(run, tmp_path):
    report = merge_adapter(run, tmp_path / "bf16", dtype="bf16")
    assert report["dtype"] == "bfloat16" and report["tolerance_relative"] == 5e-2 and report["passed"]
    assert report["relative_diff"] > 0  # bf16 rounding shows up, and is measured
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_a_faulty_merge_fails_loudly_and_writes_nothing(run, tmp_path, monkeypatch):
    def bad_merge(peft_model):
        model = peft_model.merge_and_unload()
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(merge_mod, "_merge", bad_merge)
    with pytest.raises(MergeVerificationError, match="tolerance"):
        merge_adapter(run, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []


def test_quantized_base_is_refused(base, run, tmp_path):
    import shutil

    qbase = tmp_path / "qbase"
    shutil.copytree(base, qbase)
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(cfg))
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(qbase)
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(MergeError, match="unquantised"):
        merge_adapter(adapter, tmp_path / "out")


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(MergeError, match="adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "out")


def test_sequence_classification_adapter(base, tmp_path_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = H.cached(tmp_path_factory, "cls-run", lambda d: H.build_adapter(base, d, task="classification"))
    out = tmp_path / "merged-cls"
    report = merge_adapter(run, out)
    assert report["task_type"] == "SEQ_CLS" and report["passed"]
    assert "stop_token_ids" not in report
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ref_base = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref_base, str(run / "adapter")).eval()
    tok = H.load_test_tokenizer(out)
    for prompt in H.PROMPTS:
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            a, b = merged(input_ids=ids).logits, ref(input_ids=ids).logits
        assert a.shape == (1, 3)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
