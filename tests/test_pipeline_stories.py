"""The real pretrained stories260K, end to end: QLoRA fine-tune on a format it has never seen ->
merge -> ONNX export (fp32 parity, int4 report) -> chat through onnxruntime-genai.

stories260K (../shared/data/stories260k) is converted exactly into Phi3ForCausalLM; a random model
would hide bugs that a trained one shows (learning that must happen, generation that must match).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stories_task import write_task

from phi3local.config import load_recipe
from phi3local.train.recipe import run_training

REPO = Path(__file__).resolve().parents[1]
FORMAT = re.compile(r"^Who: \w+\. What: \w+\.$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("stories")
    train_file, val_file = write_task(folder)
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [
        "model.name_or_path=stories260k", f"data.train_file={train_file}", f"data.validation_file={val_file}",
        f"output_dir={folder / 'run'}", "lora.modules_to_save=[]", "training.lr=1e-3", "training.max_steps=60",
        "training.checkpoint_every=0", "eval.every=0", "eval.generate_samples=4", "eval.max_new_tokens=24",
        "training.display=none", "quantization.load_in_4bit=true",
    ])
    summary = run_training(recipe)
    return folder, recipe, summary


def test_qlora_learns_the_new_format(trained):
    _, _, summary = trained
    first, final = summary["first_val_loss"], summary["final"]["val_loss"]
    # Measured: 3.79 -> 0.006 in 60 steps (a format the base model has never seen).
    assert first > 3.0 and final < 0.1, (first, final)
    answers = [s["generated"] for s in summary["samples"]]
    # The converted tokenizer ends a turn with <s> (see phi3local/model/llama2c.py).
    assert all(a.endswith("<s>") for a in answers), "the model must learn to stop"
    assert all(FORMAT.match(a.removesuffix("<s>").strip()) for a in answers), answers
    exact = sum(s["generated"].strip() == s["expected"].strip() for s in summary["samples"])
    assert exact >= 3, summary["samples"]


@pytest.fixture(scope="module")
def merged(trained):
    from phi3local.export.merge import merge_adapter

    folder, _, _ = trained
    report = merge_adapter(folder / "run", folder / "merged", dtype="float32")
    return folder / "merged", report


def test_merge_reproduces_base_plus_adapter(merged):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phi3local.model.load import resolve_model_path

    out, report = merged
    assert report["max_abs_diff"] <= 1e-4 * report["logit_scale"], json.dumps(report)
    # Independently of the merge's own check: plain transformers load vs the base with the adapter.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["Phi3ForCausalLM"]
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("stories260k"), dtype=torch.float32)
    ids = torch.tensor([[1, 410, 448, 415, 414, 467, 317, 426, 410, 448]])
    with torch.no_grad():
        base_logits = base(ids).logits  # before peft injects the adapter into `base` in place
    reference = PeftModel.from_pretrained(base, out.parent / "run" / "adapter").eval()
    with torch.no_grad():
        merged_logits, ref_logits = model(ids).logits, reference(ids).logits
    scale = ref_logits.abs().max()
    assert (merged_logits - ref_logits).abs().max() <= 1e-4 * scale
    # The adapter matters: the merged model is not the base model.
    assert (base_logits - ref_logits).abs().max() > 1e-2
    gen = json.loads((out / "generation_config.json").read_text())
    assert {1, 2} <= set(gen["eos_token_id"])  # the turn end <s> and </s>


PROMPTS = ["Once upon a time", "Lily and Ben went to the park. They", "One day, a little bird",
           [{"role": "user", "content": "Tom found a red ball in the park."}],
           [{"role": "user", "content": "Mia saw a little frog near the river."}]]


def test_fp32_export_matches_pytorch(merged):
    from phi3local.export.onnx import export_onnx

    out, _ = merged
    report = export_onnx(out, out.parent / "onnx-fp32", precision="fp32", target="cpu", prompts=PROMPTS,
                         new_tokens=64, show=False)
    parity = json.loads((out.parent / "onnx-fp32" / "parity.json").read_text())
    for p in parity["prompts"]:
        assert p["max_abs_diff"] <= 1e-4 * p["logit_scale"], p["max_abs_diff"]
        assert p["greedy_identical"] == p["greedy_compared"]
    # Generation ends at a stop token (a story ends with <s>), so count over all prompts.
    assert sum(p["greedy_compared"] for p in parity["prompts"]) >= 64
    assert report["parity"]["passed"]


def test_int4_export_reports_error_and_agreement(merged):
    from phi3local.export.onnx import export_onnx

    out, _ = merged
    report = export_onnx(out, out.parent / "onnx-int4", precision="int4", target="cpu", prompts=PROMPTS,
                         new_tokens=32, show=False)
    parity = report["parity"]
    assert parity["relative_error"] >= 0 and parity["greedy_compared"] > 0
    assert (out.parent / "onnx-int4" / "parity.json").is_file()


def test_chat_prompt_answers_in_the_fine_tuned_format(merged):
    out, _ = merged
    onnx_dir = out.parent / "onnx-fp32"
    assert onnx_dir.is_dir(), "runs after the fp32 export test"
    result = subprocess.run([sys.executable, "-m", "phi3local.cli", "chat", str(onnx_dir), "--prompt",
                             "Ben had a big cake at home.", "--max-new-tokens", "20"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Who: Ben. What: cake." in result.stdout, result.stdout
