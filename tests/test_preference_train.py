"""task=preference in the training loop: DPO's start, its exact gradient, learning on stories260K, ORPO, resume.

The pairs of the stories260K task (tests/stories_task.py's stories): the preferred answer gives the two fields in
the order "Who: <name>. What: <thing>.", the rejected one the same words as "What: <thing>. Who: <name>.". The
base model has no preference between them (measured: it ranks the preferred answer higher in 35% of the 40
held-out pairs, 45% of 100 others), so whatever ranking the model ends with, it learned.
"""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from resume_helpers import interrupted_then_resumed, read_metrics, two_ranks
from stories_task import ADJ, NAMES, PLACES, THINGS, VERBS
from transformers import Phi3Config, Phi3ForCausalLM

from phi3local.config import load_recipe
from phi3local.train import recipe as loop
from phi3local.train.tasks import task_for
from phi3local.train.tasks.preference import Pairs, answer_logps, collate_pairs

REPO = Path(__file__).resolve().parents[1]
TINY_DPO = REPO / "recipes" / "tiny-dpo.yaml"
LN2 = math.log(2.0)



def tiny_dpo(tmp_path, *overrides):
    return load_recipe(TINY_DPO, [f"output_dir={tmp_path / 'run'}", "training.display=none", "eval.generate_samples=0",
                                  *overrides])


# ------------------------------------------------------------------------------------------- step 0

@pytest.mark.parametrize("extra", [[], ["lora.modules_to_save=[lm_head]", "lora.dropout=0.1"]],
                         ids=["lora", "lora+trained-head+dropout"])
def test_fresh_adapter_starts_at_ln2_with_zero_margins(tmp_path, extra):
    """A fresh LoRA adapter (B = 0; a modules_to_save copy equal to the original) is the reference itself."""
    recipe = tiny_dpo(tmp_path, "training.max_steps=1", "eval.every=0", "training.log_every=1", *extra)
    loop.run_training(recipe)
    records = read_metrics(recipe.output_dir)
    start = records[0]  # the evaluation before the first step
    assert start["step"] == 0 and start["val_loss"] == pytest.approx(LN2, abs=1e-6)
    for key in ("val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins"):
        assert start[key] == 0.0, key
    assert start["val_rewards/accuracies"] == 0.0  # ties: TRL counts chosen > rejected strictly
    first = next(r for r in records if "loss" in r)  # step 1's loss: the forward before the update
    assert first["step"] == 1 and first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


# ------------------------------------------------------------------------------------- the gradient

VOCAB = 97


def random_pairs(n: int, seed: int) -> Pairs:
    g = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prompts = [tokens(3, 12) for _ in range(n)]
    return Pairs(prompt_ids=prompts, chosen_ids=[tokens(1, 9) for _ in range(n)],
                 rejected_ids=[tokens(1, 9) for _ in range(n)], sources=[f"pairs:{i}" for i in range(n)])


def lora_model(trained_head: bool):
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                        attn_implementation="sdpa")
    model = get_peft_model(Phi3ForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], lora_dropout=0.0,
        modules_to_save=["lm_head"] if trained_head else None))
    with torch.no_grad():  # not a fresh adapter: the policy must differ from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "modules_to_save" in name:
                p.add_(0.02 * torch.randn_like(p))
    return model.float()


def plain_logps(model, pairs: Pairs, d: int) -> torch.Tensor:
    """[chosen, rejected] summed answer log-probs of pair d, each sequence alone: full logits, log_softmax, gather."""
    out = []
    for answer in (pairs.chosen_ids[d], pairs.rejected_ids[d]):
        ids = torch.tensor([pairs.prompt_ids[d] + answer])
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
        start = len(pairs.prompt_ids[d])
        positions = torch.arange(start - 1, start - 1 + len(answer))
        out.append(logp[positions, torch.tensor(answer)].sum())
    return torch.stack(out)


def plain_loss(model, pairs: Pairs, loss: str, beta: float) -> torch.Tensor:
    total = 0.0
    for d in range(len(pairs)):
        pc, pr = plain_logps(model, pairs, d)
        nc, nr = len(pairs.chosen_ids[d]), len(pairs.rejected_ids[d])
        if loss == "dpo":
            with model.disable_adapter(), torch.no_grad():
                rc, rr = plain_logps(model, pairs, d)
            total = total - torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
        else:  # orpo: token-mean NLL of the chosen answer + beta x the odds-ratio term
            ac, ar = pc / nc, pr / nr
            log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
            total = total - ac - beta * torch.nn.functional.logsigmoid(log_odds)
    return total


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
@pytest.mark.parametrize("trained_head", [False, True], ids=["frozen-head", "trained-head"])
def test_packed_chunked_step_gradient_equals_the_plain_computation(loss, trained_head):
    """Two pairs per row (four sequences, block-diagonal attention), padding, log-probs through the chunked head:
    the loss and every trainable gradient equal an unpacked full-logits computation (1e-5 relative)."""
    pairs = random_pairs(5, seed=3)
    recipe = load_recipe(TINY_DPO, [f"preference.loss={loss}", "preference.beta=0.5"])
    task = task_for(recipe)
    model = lora_model(trained_head)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate_pairs([[0, 1], [2, 3], [4]], pairs, pad_id=0, pad_to_multiple_of=8)
    assert batch.tokens.input_ids.shape[0] == 3 and len(batch.doc_ids) == 5
    loss_sum, stats = task.loss(model, batch, chunk_size=5)
    loss_sum.backward()
    mine = [p.grad.clone() for p in params]
    model.zero_grad()
    expected = plain_loss(model, pairs, loss, beta=0.5)
    expected.backward()
    assert float(loss_sum.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    scale = max(float(p.grad.abs().max()) for p in params)
    assert scale > 0
    worst = max(float((a - p.grad).abs().max()) for a, p in zip(mine, params))
    assert worst <= 1e-5 * scale, (worst, scale)
    assert 0 <= float(stats["rewards/accuracies"]) <= 5  # a sum over the 5 pairs


def test_a_pair_scores_the_same_packed_padded_or_alone():
    pairs = random_pairs(4, seed=4)
    model = lora_model(False).eval()
    with torch.no_grad():
        packed = answer_logps(model, collate_pairs([[0, 1, 2, 3]], pairs, 0), 1024)
        alone = torch.cat([answer_logps(model, collate_pairs([[d]], pairs, 0, pad_to_multiple_of=64), 3)
                           for d in range(4)])
        plain = torch.cat([plain_logps(model, pairs, d) for d in range(4)])
    assert torch.allclose(packed, plain, rtol=1e-5, atol=1e-5) and torch.allclose(alone, plain, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ resume

def test_resumed_preference_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    overrides = ["training.max_steps=6", "training.checkpoint_every=3", "lora.dropout=0.1", "eval.every=0",
                 "training.log_every=1", "training.micro_batch_size=2"]
    full = tiny_dpo(tmp_path / "a", *overrides)
    loop.run_training(full)
    keys = ("loss", "rewards/margins", "logps/chosen")
    expected = [[r[k] for k in keys] for r in read_metrics(full.output_dir) if "loss" in r]

    part = tiny_dpo(tmp_path / "b", *overrides)
    resumed = interrupted_then_resumed(monkeypatch, part, 3, keys)
    assert len(resumed) == 6
    for a, b in zip(resumed, expected):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------------------- memory plan

def test_memory_plan_counts_both_sequences_and_the_reference_pass():
    from phi3local.train.memory_plan import make_plan

    sft = load_recipe(REPO / "recipes" / "phi3-mini-4k-qlora.yaml", ["data.max_seq_len=1024"])
    dpo = load_recipe(REPO / "recipes" / "phi3-mini-dpo.yaml", ["data.max_seq_len=1024", "training.micro_batch_size=2"])
    orpo = load_recipe(REPO / "recipes" / "phi3-mini-dpo.yaml", ["data.max_seq_len=1024", "training.micro_batch_size=2",
                                                                  "preference.loss=orpo"])
    plan = {name: make_plan(r, device="cuda", available=80 * 1024**3, gradient_checkpointing=True).plan
            for name, r in (("sft", sft), ("dpo", dpo), ("orpo", orpo))}
    assert plan["dpo"].sequences == 2 and plan["dpo"].activations == 2 * plan["sft"].activations
    assert plan["dpo"].reference > 0 and plan["orpo"].reference == 0
    assert plan["dpo"].total >= plan["orpo"].total > plan["sft"].total
    # The shipped DPO recipe starts from the SFT adapter: its frozen copy, the reference, is the trained adapter's
    # size in fp32; from the base model (no model.adapter) the reference is the base with the adapter off.
    assert dpo.model.adapter and plan["dpo"].reference_adapter == plan["dpo"].lora_weights > 0
    assert plan["orpo"].reference_adapter == 0
    base = make_plan(load_recipe(REPO / "recipes" / "phi3-mini-dpo.yaml", [
        "data.max_seq_len=1024", "training.micro_batch_size=2", "model.adapter=null"]), device="cuda",
        available=80 * 1024**3, gradient_checkpointing=True).plan
    assert base.reference_adapter == 0 and plan["dpo"].total - base.total == plan["dpo"].lora_weights


# ------------------------------------------------------------------------------- stories260K tasks

def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        story = f"{name} {rng.choice(VERBS)} a {rng.choice(ADJ)} {thing} {rng.choice(PLACES)}."
        rows.append({"input": {"messages": [{"role": "user", "content": story}]},
                     "preferred_output": [{"role": "assistant", "content": f"Who: {name}. What: {thing}."}],
                     "non_preferred_output": [{"role": "assistant", "content": f"What: {thing}. Who: {name}."}]})
    return rows


def stories_recipe(folder: Path, loss: str, steps: int, lr: float, *overrides):
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 200, 1), ("validation", 40, 2)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(n, seed)))
    return load_recipe(TINY_DPO, [
        "model.name_or_path=stories260k", f"data.train_file={folder / 'train.jsonl'}",
        f"data.validation_file={folder / 'validation.jsonl'}", f"output_dir={folder / 'run'}",
        f"preference.loss={loss}", f"training.max_steps={steps}", f"training.lr={lr}", "training.micro_batch_size=8",
        "training.checkpoint_every=0", "eval.every=0", "training.display=none", "training.log_every=1",
        "data.packing=true", *overrides])


def base_ranking_accuracy(run) -> float:
    """Share of validation pairs whose preferred answer the model without its adapter finds more likely."""
    right = total = 0
    with run.model.disable_adapter(), torch.no_grad():
        for rows in loop.epoch_plan(run.recipe, run.val_docs.lengths, 0):
            logps = answer_logps(run.model, run.task.collate(rows, run.val_docs, run.tokenizer.pad_token_id), 1024)
            right += int((logps[0::2] > logps[1::2]).sum())
            total += sum(len(r) for r in rows)
    return right / total


def test_dpo_on_stories260k_ranks_held_out_pairs(tmp_path, shared_data):
    recipe = stories_recipe(tmp_path, "dpo", 12, 1e-3, "eval.generate_samples=0")
    run = loop.setup(recipe)
    try:
        base = base_ranking_accuracy(run)
        loop.run_eval(run)
        summary = loop.train(run)
    finally:
        loop.cleanup(run)
    records = read_metrics(recipe.output_dir)
    start, final = records[0], summary["final"]
    steps = [r for r in records if "loss" in r]
    print(f"dpo stories260K: base ranking {base:.3f}; val reward accuracy {start['val_rewards/accuracies']:.3f} -> "
          f"{final['val_rewards/accuracies']:.3f}, val loss {start['val_loss']:.4f} -> {final['val_loss']:.4f}, margin "
          f"{start['val_rewards/margins']:.3f} -> {final['val_rewards/margins']:.3f}; train reward accuracy by step "
          f"{[round(r['rewards/accuracies'], 3) for r in steps]}; step seconds {steps[-1]['step_seconds']:.3f}")
    # Measured: base ranking 0.35; held-out reward accuracy 0.0 (all ties) at step 0 -> 1.0 after 12 steps (the
    # training pairs' from step 2), val loss 0.693 -> 0.0006, margin 0 -> 7.5 (beta 0.1).
    assert 0.2 <= base <= 0.7, base
    assert start["val_rewards/accuracies"] == 0.0 and start["val_loss"] == pytest.approx(LN2, abs=1e-6)
    assert final["val_rewards/accuracies"] >= 0.9, final
    assert final["val_rewards/margins"] > 1.0 and final["val_loss"] < 0.2, final


def test_orpo_from_the_base_model_makes_greedy_answers_the_preferred_ones(tmp_path, shared_data):
    recipe = stories_recipe(tmp_path, "orpo", 30, 3e-3, "eval.generate_samples=8", "eval.max_new_tokens=24")
    run = loop.setup(recipe)
    try:
        before = loop.sample_generations(run.recipe, run.model, run.tokenizer, run.val_docs, 8, 24)
        loop.run_eval(run)
        summary = loop.train(run)
    finally:
        loop.cleanup(run)
    after = summary["samples"]
    records = read_metrics(recipe.output_dir)
    print(f"orpo stories260K: greedy == preferred {sum(s['generated'].strip() == s['expected'].strip() for s in before)}"
          f"/8 before, {sum(s['generated'].strip() == s['expected'].strip() for s in after)}/8 after; val reward "
          f"accuracy {records[0]['val_rewards/accuracies']:.3f} -> {summary['final']['val_rewards/accuracies']:.3f}, "
          f"val loss {records[0]['val_loss']:.3f} -> {summary['final']['val_loss']:.4f}; before {before[:2]}; "
          f"after {after[:2]}")
    # Measured: 0 of 8 greedy answers were the preferred one before, 8 of 8 after 30 steps, none the rejected one;
    # held-out reward accuracy (ORPO's: mean token log-probs) 0.35 -> 1.0, val loss 3.89 -> 0.004.
    assert sum(s["generated"].strip() == s["expected"].strip() for s in before) == 0, before
    assert sum(s["generated"].strip() == s["expected"].strip() for s in after) >= 7, after
    assert not any(s["generated"].strip().startswith("What:") for s in after), after  # the rejected order
    assert summary["final"]["val_rewards/accuracies"] >= 0.9, summary["final"]


# ---------------------------------------------------------------------------------- metric sinks

def test_preference_metrics_reach_mlflow_and_the_panel(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from phi3local.train.display import TrainDisplay

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recipe = tiny_dpo(tmp_path, "training.max_steps=4", "training.log_every=2", "eval.every=2",
                      "training.trackers=[mlflow]")
    loop.run_training(recipe)
    client = MlflowClient(store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = [r for r in read_metrics(recipe.output_dir) if "loss" in r]
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in logged]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_rewards/accuracies")] == [0, 2, 4]

    console = Console(width=100, record=True)
    display = TrainDisplay(4, "rich", console)
    display.update({"val_loss": 0.6, "val_rewards/accuracies": 0.75})
    console.print(display._panel(logged[-1]))
    text = console.export_text()
    assert "reward acc / margin" in text and "reward acc 0.750" in text and "logps chosen / rejected" in text


def test_precomputed_reference_trains_as_the_per_step_reference(tmp_path):
    losses = {}
    for precompute in (False, True):
        recipe = tiny_dpo(tmp_path / str(precompute), "training.max_steps=4", "training.log_every=1", "eval.every=2",
                          f"preference.precompute_reference={str(precompute).lower()}")
        loop.run_training(recipe)
        losses[precompute] = [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(recipe.output_dir)]
    assert len(losses[True]) == 4 + 3  # every step and the evaluations at steps 0, 2, 4
    for (step, loss), (step2, loss2) in zip(losses[False], losses[True], strict=True):
        assert step == step2 and loss == pytest.approx(loss2, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------- two processes

def test_two_ranks_equal_one_process_for_pairs(tmp_path):
    """torchrun with 2 CPU ranks (gloo) against one process with grad_accum=2: the same pairs per step, so the same
    losses and the same rewards (summed over the ranks before they are averaged)."""
    from phi3local.model.load import resolve_model_path

    resolve_model_path("tiny")  # built once here, not by both ranks at the same time
    common = ["training.max_steps=4", "training.log_every=1", "eval.every=2", "training.checkpoint_every=0",
              "training.micro_batch_size=2", "eval.generate_samples=0", "data.packing=false"]
    two = tmp_path / "two"
    two_ranks(TINY_DPO, two, *common)
    one = tiny_dpo(tmp_path / "one", *common, "training.grad_accum=2")
    loop.run_training(one)
    keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "val_loss", "val_rewards/margins")
    got, expected = read_metrics(two), read_metrics(one.output_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (b["step"], key)
