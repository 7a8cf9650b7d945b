"""model.adapter: preference tuning (or any task) continuing a trained adapter, here a tiny SFT run's.

The SFT adapter is loaded twice on the same 4-bit base: as the adapter that trains (so the written adapter holds the
SFT and the DPO update together) and, for dpo/ipo, as a frozen reference. At step 0 the policy is the reference: the
DPO loss is ln 2 and every margin 0, although neither is the bare base model.
"""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from resume_helpers import interrupted_then_resumed, read_metrics, two_ranks
from safetensors.torch import load_file

from phi3local.config import load_recipe
from phi3local.model.load import ModelSetupError, check_start_adapter, resolve_model_path
from phi3local.train import recipe as loop
from phi3local.train.tasks.preference import answer_logps

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = REPO / "recipes" / "tiny-cpu.yaml"
TINY_DPO = REPO / "recipes" / "tiny-dpo.yaml"
LN2 = math.log(2.0)
# tiny-cpu.yaml trains the tiny model's embeddings and head too: a recipe continuing its adapter says so.
SFT_SHAPE = "lora.modules_to_save=[embed_tokens,lm_head]"
QUIET = ["training.display=none", "eval.generate_samples=0"]



def digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A finished tiny SFT run (20 steps: its LoRA B matrices are far from zero)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    loop.run_training(load_recipe(TINY_SFT, [f"output_dir={out}", "training.max_steps=20", "eval.every=0",
                                             "training.checkpoint_every=0", *QUIET]))
    return out


def dpo_recipe(out: Path, sft: Path | str, *overrides):
    return load_recipe(TINY_DPO, [f"output_dir={out}", f"model.adapter={sft}", SFT_SHAPE, *QUIET, *overrides])


def test_dpo_from_an_sft_run_starts_at_ln2_continues_the_adapter_and_merges(tmp_path, sft_run):
    from phi3local.export.merge import merge_adapter

    before = digests(sft_run)
    recipe = dpo_recipe(tmp_path / "dpo", sft_run, "training.max_steps=4", "training.log_every=1", "eval.every=2",
                        "training.checkpoint_every=2")
    run = loop.setup(recipe)
    try:
        assert sorted(run.model.peft_config) == ["default", "reference"]
        trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
        assert trainable and all(".default." in n for n in trainable)
        rows = next(iter(loop.epoch_plan(run.recipe, run.val_docs.lengths, 0)))
        batch = run.task.collate(rows, run.val_docs, run.tokenizer.pad_token_id)
        with torch.no_grad():
            reference = run.task.reference_logps(run.model, batch, 1024)
            policy = answer_logps(run.model, batch, 1024)
            with run.model.disable_adapter():
                bare = answer_logps(run.model, batch, 1024)
        # The reference is the SFT model (= the policy at step 0), not the base; the switch leaves training as it was.
        assert torch.equal(reference, policy) and (reference - bare).abs().max() > 0.1
        assert {n for n, p in run.model.named_parameters() if p.requires_grad} == trainable
        assert run.model.active_adapter == "default"
        loop.run_eval(run)
        loop.train(run)
    finally:
        loop.cleanup(run)
    records = read_metrics(recipe.output_dir)
    start, first = records[0], next(r for r in records if "loss" in r)
    assert start["step"] == 0 and start["val_loss"] == pytest.approx(LN2, abs=1e-6)
    assert start["val_rewards/margins"] == 0.0 and start["val_rewards/chosen"] == 0.0
    assert first["step"] == 1 and first["loss"] == pytest.approx(LN2, abs=1e-6) and first["rewards/margins"] == 0.0
    assert records[-1]["val_rewards/margins"] > 0  # it learned something

    assert digests(sft_run) == before  # the SFT run's files are only read
    dpo_adapter = Path(recipe.output_dir) / "adapter"
    for folder in (dpo_adapter, Path(recipe.output_dir) / "checkpoints" / "step-2" / "adapter"):
        assert not (folder / "reference").exists()  # peft would save the reference adapter in a subfolder
        assert not any("reference" in k for k in load_file(str(folder / "adapter_model.safetensors")))
    sft, dpo = (load_file(str(f / "adapter_model.safetensors")) for f in (sft_run / "adapter", dpo_adapter))
    assert sorted(sft) == sorted(dpo)  # the same adapter, continued: SFT + DPO in one
    lora_b = [k for k in sft if "lora_B" in k]
    moved = sum(float((dpo[k] - sft[k]).norm()) for k in lora_b) / sum(float(sft[k].norm()) for k in lora_b)
    assert 0 < moved < 0.5, moved  # a fresh adapter would be a whole SFT update away (B = 0)
    config = json.loads((dpo_adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == resolve_model_path("tiny") and config["lora_dropout"] == 0.0

    report = merge_adapter(Path(recipe.output_dir), tmp_path / "merged", dtype="float32")  # verifies its logits
    assert (tmp_path / "merged" / "config.json").is_file() and report

    # A checkpoint folder names an adapter too (its adapter/).
    step = Path(recipe.output_dir) / "checkpoints" / "step-2"
    assert check_start_adapter(dpo_recipe(tmp_path / "next", step), resolve_model_path("tiny")).folder == step / "adapter"


def test_resumed_run_from_an_adapter_equals_uninterrupted_run(tmp_path, sft_run, monkeypatch):
    overrides = ["training.max_steps=6", "training.checkpoint_every=3", "lora.dropout=0.1", "eval.every=0",
                 "training.log_every=1", "training.micro_batch_size=2"]
    full = dpo_recipe(tmp_path / "a", sft_run, *overrides)
    loop.run_training(full)
    keys = ("loss", "rewards/margins", "logps/chosen")
    expected = [[r[k] for k in keys] for r in read_metrics(full.output_dir) if "loss" in r]
    # lora.dropout acts on the trained adapter only: the first step is near ln 2, not at it
    assert expected[0][0] == pytest.approx(LN2, abs=0.05)

    part = dpo_recipe(tmp_path / "b", sft_run, *overrides)
    resumed = interrupted_then_resumed(monkeypatch, part, 4, keys)
    assert len(resumed) == 6
    for a, b in zip(resumed, expected):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_eval_of_the_run_uses_the_same_reference(tmp_path, sft_run):
    """`phi3local eval` of a DPO run that started from model.adapter computes its rewards against the SFT adapter,
    as training did: the same figures as the run's final evaluation on the same pairs."""
    from phi3local.train.evaluate import evaluate_model

    pairs = REPO / "phi3local" / "assets" / "demo_preference.jsonl"
    recipe = dpo_recipe(tmp_path / "dpo", sft_run, "training.max_steps=3", "eval.every=0",
                        "training.checkpoint_every=0", f"data.train_file={pairs}", f"data.validation_file={pairs}",
                        "data.dedupe=false")
    summary = loop.run_training(recipe)
    result = evaluate_model(Path(recipe.output_dir), pairs)
    assert result["rows"] == 12
    for key in ("val_loss", "val_rewards/margins", "val_rewards/chosen", "val_rewards/accuracies"):
        assert result[key] == pytest.approx(summary["final"][key], rel=1e-5, abs=1e-6), key


def test_any_task_continues_an_adapter(tmp_path, sft_run):
    """SFT continued from its own adapter starts where it ended (its validation loss); classification takes the SFT
    adapter's LoRA weights with a fresh head; ORPO, which has no reference, loads no second adapter."""
    sft_final = json.loads((sft_run / "summary.json").read_text())["final"]["val_loss"]
    more = load_recipe(TINY_SFT, [f"output_dir={tmp_path / 'more'}", f"model.adapter={sft_run}", "training.max_steps=1",
                                  "eval.every=0", "training.checkpoint_every=0", *QUIET])
    loop.run_training(more)
    assert read_metrics(more.output_dir)[0]["val_loss"] == pytest.approx(sft_final, rel=1e-6)

    plain = ["lora.modules_to_save=[]", "eval.every=0", "training.checkpoint_every=0", *QUIET]  # a LoRA-only adapter
    lora_only = load_recipe(TINY_SFT, [f"output_dir={tmp_path / 'lora-only'}", "training.max_steps=3", *plain])
    loop.run_training(lora_only)
    classify = load_recipe(TINY_SFT, [f"output_dir={tmp_path / 'classify'}", "task=classification",
                                      "model.labels=[negative,neutral,positive]", f"model.adapter={lora_only.output_dir}",
                                      "training.max_steps=2", *plain])
    loop.run_training(classify)
    sft = load_file(str(Path(lora_only.output_dir) / "adapter" / "adapter_model.safetensors"))
    head = load_file(str(Path(classify.output_dir) / "adapter" / "adapter_model.safetensors"))
    assert any("score" in k for k in head) and set(sft) <= set(head)
    b_sft, b_head = (torch.cat([w[k].flatten() for k in sorted(sft) if "lora_B" in k]) for w in (sft, head))
    cosine = float(torch.nn.functional.cosine_similarity(b_sft, b_head, dim=0))
    assert cosine > 0.5, cosine  # the SFT LoRA weights, trained on (a fresh adapter's B starts at 0, unrelated)

    orpo = dpo_recipe(tmp_path / "orpo", sft_run, "preference.loss=orpo", "training.max_steps=1")
    run = loop.setup(orpo)
    try:
        assert sorted(run.model.peft_config) == ["default"]
    finally:
        loop.cleanup(run)


# ------------------------------------------------------------------------------------------------ refusals

def refusal(recipe) -> str:
    with pytest.raises(ModelSetupError) as e:
        check_start_adapter(recipe, resolve_model_path(recipe.model.name_or_path))
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.adapter: "), message
    return message


def test_a_different_lora_shape_is_refused_naming_the_values_to_set(tmp_path, sft_run):
    message = refusal(load_recipe(TINY_DPO, [f"model.adapter={sft_run}", "lora.r=8"]))
    assert message.endswith("set lora.r=16 lora.modules_to_save=[embed_tokens,lm_head] (an adapter continues in its "
                            "own shape)"), message
    assert "this recipe has lora.r=8, lora.modules_to_save=[]" in message
    assert "target_modules" not in message  # the same set in another order is the same shape


def test_refusals_name_the_key_and_the_path(tmp_path, sft_run):
    assert "no such folder" in refusal(load_recipe(TINY_DPO, [f"model.adapter={tmp_path / 'nope'}"]))
    assert f"model.adapter: {tmp_path}" in refusal(load_recipe(TINY_DPO, [f"model.adapter={tmp_path}", SFT_SHAPE]))
    assert "lora.enabled=true" in refusal(load_recipe(TINY_DPO, [f"model.adapter={sft_run}", "lora.enabled=false"]))
    # another base model
    message = refusal(load_recipe(TINY_DPO, [f"model.adapter={sft_run}", "model.name_or_path=stories260k", SFT_SHAPE]))
    assert f"was trained on {resolve_model_path('tiny')}" in message
    assert f"set model.name_or_path={resolve_model_path('tiny')}" in message

    # a peft folder whose weights are a pickle: never loaded
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((sft_run / "adapter" / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    message = refusal(load_recipe(TINY_DPO, [f"model.adapter={pickled}", SFT_SHAPE]))
    assert "adapter_model.bin is a pickle" in message and str(pickled) in message

    # an unfinished run: no adapter/ yet, checkpoints only
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "step-3").mkdir(parents=True)
    assert "has not finished" in refusal(load_recipe(TINY_DPO, [f"model.adapter={unfinished}"]))


def test_a_relative_path_is_read_beside_the_recipe(tmp_path, sft_run):
    recipe_file = sft_run.parent / "dpo.yaml"
    recipe_file.write_text(TINY_DPO.read_text())
    recipe = load_recipe(recipe_file, [f"model.adapter={sft_run.name}", SFT_SHAPE])
    start = check_start_adapter(recipe, resolve_model_path("tiny"))
    assert start.folder == sft_run / "adapter"


def test_train_refuses_a_bad_adapter_before_preparing_data(tmp_path, sft_run):
    recipe = dpo_recipe(tmp_path / "dpo", sft_run, "lora.r=4")
    with pytest.raises(ModelSetupError, match="set lora.r=16"):
        loop.run_training(recipe)
    assert not (tmp_path / "dpo" / "prepared").exists()


def test_the_shipped_dpo_recipe_continues_the_shipped_sft_recipe():
    """recipes/phi3-mini-dpo.yaml names the SFT recipe's run in model.adapter and repeats its model and LoRA shape."""
    from phi3local.model.load import LORA_SHAPE_KEYS

    sft = load_recipe(REPO / "recipes" / "phi3-mini-4k-qlora.yaml")
    dpo = load_recipe(REPO / "recipes" / "phi3-mini-dpo.yaml")
    assert dpo.model.adapter == sft.output_dir
    assert (dpo.model.name_or_path, dpo.model.revision) == (sft.model.name_or_path, sft.model.revision)
    for key, _ in LORA_SHAPE_KEYS:
        assert getattr(dpo.lora, key) == getattr(sft.lora, key), key


def test_two_ranks_equal_one_process_from_an_adapter(tmp_path, sft_run):
    """torchrun with 2 CPU ranks (gloo) against one process with grad_accum=2, both continuing the SFT adapter: the
    reference switch inside DDP's forward leaves the same losses and rewards."""
    common = ["training.max_steps=3", "training.log_every=1", "eval.every=3", "training.checkpoint_every=0",
              "training.micro_batch_size=2", "eval.generate_samples=0", "data.packing=false",
              f"model.adapter={sft_run}", SFT_SHAPE]
    two = tmp_path / "two"
    two_ranks(TINY_DPO, two, *common)
    one = load_recipe(TINY_DPO, [f"output_dir={tmp_path / 'one'}", "training.display=none", *common,
                                 "training.grad_accum=2"])
    loop.run_training(one)
    got, expected = read_metrics(two), read_metrics(one.output_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert expected[0]["val_loss"] == pytest.approx(LN2, abs=1e-6)
    for a, b in zip(got, expected):
        for key in ("loss", "rewards/margins", "val_loss", "val_rewards/margins"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (b["step"], key)
