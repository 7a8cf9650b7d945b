"""End to end DPO: phi3local's preference task against Hugging Face TRL `DPOTrainer` + peft, same everything.

Same 4-bit model as `train_e2e` (a randomly initialised Phi-3-shaped model with Phi-3's 32064-token vocabulary,
`train_e2e.ensure_bench_model`), same LoRA (r16, alpha 32, no dropout, qkv_proj/o_proj/gate_up_proj/down_proj, a
fresh adapter), same pairs, same loss (DPO, sigmoid, beta 0.1; the reference = the 4-bit model with the adapter
disabled, for both), same sequence cap, pairs per micro-batch, step count, learning-rate schedule (cosine to 10%, no
warm-up), optimizer (AdamW), gradient clipping; TRL keeps gradient checkpointing on.

The pairs: Azure's sample chats (azure-phi3-finetune-chat) made into Azure preference JSONL: the prompt is a chat's
system/user turns, the preferred answer its own assistant answer, the rejected one the answer of the next chat (fluent,
but about another dialog). `phi3local.data.prepare` tokenises them once with the real Phi-3 tokenizer; TRL gets the
very same `prompt_ids` / `chosen_ids` / `rejected_ids` (its own tokenisation step is skipped: `_prepare_dataset`
returns them as they are), so both train on the same tokens.

Contenders, each in its own process (so peak RSS is its own), in alternating order over the rounds (A B, then B A),
so that drift of a shared machine hits both alike:
- `phi3local`: the product loop with its defaults (`data.packing: auto`, `training.gradient_checkpointing: auto`):
  `setup()` -> `run_eval()` -> `train()` -> `cleanup()`, as `phi3local train` runs it. With packing several pairs
  share a row, so a step may train more pairs than TRL's: the figure compared is trained pairs per second.
- `phi3local_like`: like for like with `trl`: gradient checkpointing on (as TRL's) and one pair per row
  (`data.packing: false`), so a step trains the same number of pairs as TRL's; what still differs is how each scores
  a pair (phi3local: both sequences in one row, block-diagonal attention; TRL: 2 x pairs rows padded to the longest)
  and the adapter dtype (TRL casts it to bf16: `trl_fp32_lora`).
- `phi3local_other` (`--contenders`, or `--extended`): the defaults with the packing mode auto did not choose.
- `trl`: DPOTrainer with `peft_config` (its reference: the adapter disabled, `use_adapter(model, None)`); its padding-
  free mode is disabled in TRL 1.16, so its 2 x micro-batch sequences are padded to the longest.
- `trl_fp32_lora` (`--extended`): as `trl` with the LoRA weights cast back to fp32 after DPOTrainer casts them to bf16.

Trained pairs/s = pairs per second over the timed steps (all but the first `skip`, which warm up allocators);
trained tokens/s counts the answer tokens scored (chosen and rejected); seconds/step = median over timed steps; peak
memory = the child's peak RSS (CPU; includes imports, evaluation) or torch.cuda.max_memory_allocated (CUDA), and train
RSS = peak RSS sampled during training only. Both must start at the DPO loss ln 2 with margin 0 (a fresh adapter is
the reference): the first step's logged loss is checked. Validation DPO loss = one plain forward per sequence (full
logits, log_softmax), reference with the adapter disabled, the same function for both, after training.

    python -m kernels_bench.run_all --size small --bench dpo_e2e     # or: python -m kernels_bench.dpo_e2e small
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from kernels_bench.common import CHAT_DATA, PHI3_TOKENIZER, WORK_DIR, Ctx, repo_relative
from kernels_bench.isolate import run_isolated
from kernels_bench.memory import RssSampler
from kernels_bench.report import Column, bar_chart, fmt_bytes, fmt_num, fmt_pct, fmt_ratio, fmt_seconds, print_table, save_result
from kernels_bench.train_e2e import (
    TARGET_MODULES,
    _peak_memory,
    _quiet_console,
    data_files,
    ensure_bench_model,
    load_4bit_for_trl,
    recipe_dict,
    step_clock,
)

NAME = "dpo_e2e"
LN2 = math.log(2.0)
# |first step's loss - ln 2| allowed: exact up to float rounding (a fresh adapter adds exactly zero).
START_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def settings(size: str) -> dict:
    """Run length per size; the model is train_e2e's of the same size (`full`: 4 of Phi-3-mini's layers)."""
    common = {"lora_r": 16, "lora_alpha": 32, "lr": 1e-3, "beta": 0.1, "micro_batch_size": 4, "seed": 0,
              "loss_chunk_size": 1024}
    if size == "tiny":
        return {**common, "max_seq_len": 384, "steps": 2, "skip": 1, "rounds": 1, "micro_batch_size": 2,
                "train_pairs": 8, "val_pairs": 2, "contenders": ["phi3local", "trl"]}
    if size == "small":  # Phi-3-shaped (hidden 768, heads of 64, Phi-3's vocabulary): a few minutes on 2 cores
        return {**common, "max_seq_len": 1024, "steps": 5, "skip": 1, "rounds": 2, "train_pairs": None,
                "val_pairs": 12, "contenders": ["phi3local", "phi3local_like", "trl"]}
    return {**common, "max_seq_len": 2048, "steps": 20, "skip": 5, "rounds": 2, "lr": 5e-5, "train_pairs": None,
            "val_pairs": 21, "contenders": ["phi3local", "phi3local_like", "trl"]}


# --------------------------------------------------------------------------------------------- inputs

def pairs_dir(size: str) -> Path:
    return WORK_DIR / "dpo" / f"pairs-{size}"


def prepared_dir(size: str) -> Path:
    return WORK_DIR / "dpo" / f"prepared-{size}"


def write_pairs(size: str) -> tuple[Path, Path]:
    """Azure preference JSONL from the sample chats: each chat's answer preferred over the next chat's answer."""
    s = settings(size)
    train, val, _ = data_files()
    out = pairs_dir(size)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for source, limit in ((train, s["train_pairs"]), (val, s["val_pairs"])):
        chats = [json.loads(line)["messages"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = []
        for i, chat in enumerate(chats):
            answer = chat[-1]
            other = next((c[-1] for c in chats[i + 1:] + chats[:i] if c[-1]["content"] != answer["content"]), None)
            if answer["role"] != "assistant" or other is None:
                continue
            rows.append({"input": {"messages": chat[:-1]},
                         "preferred_output": [{"role": "assistant", "content": answer["content"]}],
                         "non_preferred_output": [{"role": "assistant", "content": other["content"]}]})
        path = out / source.name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[:limit]), encoding="utf-8")
        files.append(path)
    return files[0], files[1]


def make_recipe(size: str, packing: bool | str, run_dir: Path, device: torch.device,
                gradient_checkpointing: bool | str = "auto"):
    """train_e2e's recipe (the same model, LoRA, optimizer and schedule) as task preference on the pairs, DPO."""
    from phi3local.config import recipe_from_dict

    s = settings(size)
    doc = recipe_dict(s, task="preference", model=ensure_bench_model(size), tokenizer=PHI3_TOKENIZER,
                      train=pairs_dir(size) / "train.jsonl", val=pairs_dir(size) / "validation.jsonl",
                      prepared=prepared_dir(size), packing=packing, run_dir=run_dir, device=device,
                      gradient_checkpointing=gradient_checkpointing)
    return recipe_from_dict({**doc, "preference": {"loss": "dpo", "beta": s["beta"]}}, source="kernels_bench.dpo_e2e")


def prepare_data(size: str, device: torch.device) -> dict:
    """Write the pairs and tokenise them once with the package's prepare stage; every contender reads the result."""
    from phi3local.data.prepare import prepare
    from phi3local.model.tokenizer import load_tokenizer

    write_pairs(size)
    recipe = make_recipe(size, True, WORK_DIR / "dpo" / "prepare-run", device)
    result = prepare(recipe, load_tokenizer(recipe.model.tokenizer), console=_quiet_console())
    prompts, chosen, rejected = (list(result.train[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    sequences = [len(p) + len(a) for p, c, r in zip(prompts, chosen, rejected) for a in (c, r)]
    return {"prepared_dir": repo_relative(result.out_dir), "train_pairs": len(prompts),
            "val_pairs": len(result.validation), "answer_tokens": sum(len(c) + len(r) for c, r in zip(chosen, rejected)),
            "sequence_tokens": sum(sequences), "prompt_median": statistics.median(len(p) for p in prompts),
            "sequence_median": statistics.median(sequences), "sequence_max": max(sequences)}


def val_pairs(size: str) -> list[tuple[list[int], list[int], list[int]]]:
    from phi3local.data.prepare import load_prepared

    _, val = load_prepared(prepared_dir(size))
    return list(zip(val["prompt_ids"], val["chosen_ids"], val["rejected_ids"]))


# --------------------------------------------------------------------------------------------- common yardstick

@torch.no_grad()
def plain_dpo_val(model, pairs, beta: float, device: torch.device) -> dict:
    """Mean DPO loss and reward accuracy over `pairs`: one plain HF forward per sequence (full logits, log_softmax),
    the reference with the peft adapter disabled; the same computation for every contender."""
    was_training = model.training
    model.eval()

    def logps(prompt, answer):
        ids = torch.tensor([prompt + answer], device=device)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer), device=device)
        return float(logp[positions, torch.tensor(answer, device=device)].sum())

    losses, right = [], 0
    for prompt, chosen, rejected in pairs:
        pc, pr = logps(prompt, chosen), logps(prompt, rejected)
        with model.disable_adapter():
            rc, rr = logps(prompt, chosen), logps(prompt, rejected)
        margin = beta * ((pc - rc) - (pr - rr))
        losses.append(-float(torch.nn.functional.logsigmoid(torch.tensor(margin))))
        right += int(margin > 0)
    model.train(was_training)
    return {"val_loss": sum(losses) / max(len(losses), 1), "val_reward_accuracy": right / max(len(pairs), 1)}


# --------------------------------------------------------------------------------------------- children

def child_phi3local(size: str, packing: bool | str, run_dir: str, name: str = "phi3local",
                    gradient_checkpointing: bool | str = "auto") -> dict:
    """The product loop on the bench model and pairs: setup -> run_eval -> train -> cleanup (= run_training)."""
    from phi3local.model.load import pick_device
    from phi3local.train import recipe as loop

    s = settings(size)
    device = pick_device()
    recipe = make_recipe(size, packing, Path(run_dir), device, gradient_checkpointing)
    steps: list[list[tuple[int, int, int, int]]] = []
    original = loop.next_micro_batches

    def counting_next_micro_batches(*args, **kwargs):
        batches = original(*args, **kwargs)
        steps.append([(len(b.doc_ids), b.trained_tokens, b.real_tokens, b.padded_tokens) for b in batches])
        return batches

    loop.next_micro_batches = counting_next_micro_batches  # counts pairs and tokens; the loop itself is unchanged
    run = loop.setup(recipe, overwrite=True, console=_quiet_console())
    try:
        own_first = loop.run_eval(run)  # as run_training does before training: a fresh adapter's val loss is ln 2
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        with RssSampler() as rss:
            summary = loop.train(run)
        final = plain_dpo_val(run.model, val_pairs(size), s["beta"], run.device)
    finally:
        loop.cleanup(run)
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "loss" in r and "step_seconds" in r]
    return {
        "contender": name, "packing": run.recipe.data.packing,
        "gradient_checkpointing": run.recipe.training.gradient_checkpointing,
        "step_seconds": [r["step_seconds"] for r in step_records], "train_loss": [r["loss"] for r in step_records],
        "first_margin": step_records[0]["rewards/margins"], "first_loss": step_records[0]["loss"],
        "step_counts": [[sum(b[i] for b in st) for i in range(4)] for st in steps],  # pairs, trained, real, padded
        "own_first_val_loss": own_first.get("val_loss"), "own_final_val_loss": (summary.get("final") or {}).get("val_loss"),
        "final_val": final, "peak_memory_bytes": _peak_memory(run.device), "train_rss_peak_bytes": rss.peak,
        "rss_before_train_bytes": rss.baseline, "attn_implementation": run.loaded.attn_implementation,
        "device": str(run.device), "train_pairs": len(run.train_docs),
    }


def child_trl(size: str, run_dir: str, name: str = "trl", fp32_lora: bool = False) -> dict:
    """TRL DPOTrainer + peft on the same 4-bit model, fed the same prepared token ids. fp32_lora: the LoRA weights
    cast back to fp32 after DPOTrainer casts them to bf16 (as an expert would on a CPU without bf16 units)."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from phi3local.data.prepare import load_prepared
    from phi3local.model.tokenizer import load_tokenizer

    s = settings(size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(s["seed"])
    model = load_4bit_for_trl(ensure_bench_model(size), device)
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                             target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    train_ds, _ = load_prepared(prepared_dir(size))
    train_ds = train_ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])

    step_counts: list[list[int]] = []

    class CountingDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenised by phi3local's prepare: the same ids for both contenders

        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                ids, completion = inputs["input_ids"], inputs["completion_mask"]
                step_counts.append([ids.shape[0] // 2, int(completion.sum()), int(inputs["attention_mask"].sum()),
                                    ids.numel()])
            return super().compute_loss(model, inputs, *a, **kw)

    args = DPOConfig(
        output_dir=run_dir, max_steps=s["steps"], per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=1, learning_rate=s["lr"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch" if device.type == "cpu" else "paged_adamw_8bit",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=s["max_seq_len"], beta=s["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=False,
        seed=s["seed"], data_seed=s["seed"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", fp16=False,  # no bf16 units on this CPU: bf16 matmuls are 10-150x slower
    )
    clock = step_clock(device)
    trainer = CountingDPOTrainer(model=model, args=args, train_dataset=train_ds,
                                 processing_class=load_tokenizer(PHI3_TOKENIZER), peft_config=peft_config,
                                 callbacks=[clock])
    lora_dtype = str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad))
    if fp32_lora:
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler() as rss:
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "contender": name, "step_seconds": clock.step_seconds, "train_loss": [h["loss"] for h in logs],
        "first_loss": logs[0]["loss"], "first_margin": logs[0].get("rewards/margins"),
        "step_counts": step_counts, "final_val": plain_dpo_val(trainer.model, val_pairs(size), s["beta"], device),
        "peak_memory_bytes": _peak_memory(device), "train_rss_peak_bytes": rss.peak,
        "rss_before_train_bytes": rss.baseline, "lora_dtype_after_dpo_init": lora_dtype,
        "lora_dtype_trained": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)),
        "device": str(device), "train_pairs": len(train_ds),
    }


CHILDREN = {
    "phi3local": ("kernels_bench.dpo_e2e:child_phi3local", {"packing": "auto"}),
    "phi3local_packed": ("kernels_bench.dpo_e2e:child_phi3local", {"packing": True, "name": "phi3local_packed"}),
    "phi3local_unpacked": ("kernels_bench.dpo_e2e:child_phi3local", {"packing": False, "name": "phi3local_unpacked"}),
    "phi3local_like": ("kernels_bench.dpo_e2e:child_phi3local",
                       {"packing": False, "gradient_checkpointing": True, "name": "phi3local_like"}),
    "trl": ("kernels_bench.dpo_e2e:child_trl", {}),
    "trl_fp32_lora": ("kernels_bench.dpo_e2e:child_trl", {"fp32_lora": True, "name": "trl_fp32_lora"}),
}


# --------------------------------------------------------------------------------------------- parent

def summarise_run(raw: dict, skip: int) -> dict:
    """Figures of one child run over its timed steps (all but the first `skip`)."""
    secs, counts = raw["step_seconds"], raw["step_counts"]
    n = min(len(secs), len(counts))
    timed = range(min(skip, max(n - 1, 0)), n)
    t = sum(secs[i] for i in timed)
    step_times = [secs[i] for i in timed]
    return {
        "pairs_per_s": sum(counts[i][0] for i in timed) / t, "trained_tokens_per_s": sum(counts[i][1] for i in timed) / t,
        "seconds_per_step": statistics.median(step_times), "pairs_per_step": sum(c[0] for c in counts[:n]) / max(n, 1),
        "padding_share": 1 - sum(c[2] for c in counts[:n]) / max(sum(c[3] for c in counts[:n]), 1),
        "timed_steps": len(step_times),
    }


def run(ctx: Ctx) -> dict:
    began = time.perf_counter()
    load_at_start = list(os.getloadavg())  # the machine may be shared: the figures are only as quiet as it was
    s = settings(ctx.size)
    if ctx.size == "full":
        ctx.require_cuda_for_full()
    data_files()
    model_dir = ensure_bench_model(ctx.size)
    data = prepare_data(ctx.size, ctx.device)
    contenders = list(ctx.contenders or s["contenders"])
    if ctx.extended:
        contenders += [c for c in ("phi3local_other", "trl_fp32_lora") if c not in contenders]
    unknown = sorted(set(contenders) - set(CHILDREN) - {"phi3local_other"})
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; known: {sorted(CHILDREN)} and phi3local_other")
    rounds = ctx.repeats or s["rounds"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false", "KINETO_LOG_LEVEL": "99"}
    raw_runs: dict[str, list[dict]] = {}

    def resolve(name: str) -> str:
        """phi3local_other: the packing mode phi3local's auto did not choose (known once phi3local has run)."""
        if name != "phi3local_other":
            return name
        chosen = raw_runs["phi3local"][0]["packing"] if raw_runs.get("phi3local") else True
        return "phi3local_unpacked" if chosen else "phi3local_packed"

    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        if "phi3local_other" in order and not raw_runs.get("phi3local"):  # auto's choice first
            order = ["phi3local"] + [c for c in order if c != "phi3local"]
        for name in order:
            name = resolve(name)
            target, kwargs = CHILDREN[name]
            run_dir = WORK_DIR / "dpo" / f"{ctx.size}-{name}-r{r}"
            ctx.console.print(f"[dim]dpo_e2e round {r + 1}/{rounds}: {name} ...[/]", highlight=False)
            result = run_isolated(target, {"size": ctx.size, "run_dir": str(run_dir), **kwargs}, timeout=3600, env=env)
            result["round"] = r
            result["summary"] = summarise_run(result, s["skip"])
            raw_runs.setdefault(name, []).append(result)
            sm = result["summary"]
            ctx.console.print(f"[dim]  {sm['pairs_per_s']:.2f} pairs/s, {sm['seconds_per_step']:.2f} s/step, "
                              f"{sm['pairs_per_step']:.1f} pairs/step, peak {fmt_bytes(result['peak_memory_bytes'])}, "
                              f"first loss {result['first_loss']:.6f}, val loss after "
                              f"{result['final_val']['val_loss']:.4f} ({result['process_wall_s']:.0f} s)[/]",
                              highlight=False)

    rows = []
    for name in [resolve(c) for c in contenders]:
        runs = raw_runs[name]
        sums = [x["summary"] for x in runs]
        pps = [x["pairs_per_s"] for x in sums]
        rows.append({
            "contender": name, "rounds": len(runs), "pairs_per_s": statistics.median(pps), "pps_min": min(pps),
            "pps_max": max(pps), "trained_tokens_per_s": statistics.median(x["trained_tokens_per_s"] for x in sums),
            "seconds_per_step": statistics.median(x["seconds_per_step"] for x in sums),
            "pairs_per_step": statistics.median(x["pairs_per_step"] for x in sums),
            "padding_share": statistics.median(x["padding_share"] for x in sums),
            "peak_memory_bytes": statistics.median(x["peak_memory_bytes"] for x in runs),
            "train_rss_peak_bytes": statistics.median(x["train_rss_peak_bytes"] for x in runs),
            "first_loss": runs[0]["first_loss"], "first_margin": runs[0]["first_margin"],
            "final_val_loss": statistics.median(x["final_val"]["val_loss"] for x in runs),
            "final_val_reward_accuracy": statistics.median(x["final_val"]["val_reward_accuracy"] for x in runs),
            "packing": runs[0].get("packing", False), "lora_dtype": runs[0].get("lora_dtype_trained", "torch.float32"),
            "train_loss_curve": runs[0]["train_loss"], "runs": runs,
        })
    by = {r["contender"]: r for r in rows}
    ratios, checks, targets = {}, {}, {}
    for ours, peer in itertools.product(("phi3local", "phi3local_like", "phi3local_packed", "phi3local_unpacked"),
                                        ("trl", "trl_fp32_lora")):
        if ours in by and peer in by:
            a, b = by[ours], by[peer]
            ratios[f"{ours} / {peer}"] = {
                "pairs_per_s": a["pairs_per_s"] / b["pairs_per_s"],
                "trained_tokens_per_s": a["trained_tokens_per_s"] / b["trained_tokens_per_s"],
                "peak_memory": a["peak_memory_bytes"] / b["peak_memory_bytes"],
                "train_rss_peak": a["train_rss_peak_bytes"] / b["train_rss_peak_bytes"],
            }
    tolerance = START_TOLERANCE.get(ctx.dtype, 1e-2)
    for row in rows:
        first = [x["first_loss"] for x in row["runs"]]
        checks[f"{row['contender']} starts at ln 2"] = {
            "first_losses": first, "first_margin": row["first_margin"], "tolerance": tolerance,
            "ok": all(abs(x - LN2) <= tolerance for x in first) and abs(row["first_margin"] or 0.0) <= tolerance}
    for ours, kind in (("phi3local", "defaults"), ("phi3local_like", "like for like")):
        if f"{ours} / trl" in ratios:
            targets[f"{kind}: pairs/s >= 2x TRL DPOTrainer"] = ratios[f"{ours} / trl"]["pairs_per_s"] >= 2.0
            targets[f"{kind}: peak memory < TRL DPOTrainer"] = ratios[f"{ours} / trl"]["peak_memory"] < 1.0

    cfg = {**s, "contenders": [r["contender"] for r in rows], "rounds": rounds, "model_dir": repo_relative(model_dir),
           "data": data, "pairs_source": repo_relative(CHAT_DATA), "dtype": str(ctx.dtype),
           "target_modules": TARGET_MODULES, "load_average_at_start": load_at_start,
           "load_average_at_end": list(os.getloadavg()),
           "trl_settings": "DPOConfig(loss_type=sigmoid, beta, max_length=max_seq_len, precompute_ref_log_probs=False, "
                           "bf16=cuda only, optim adamw_torch, cosine_with_min_lr 0.1, gradient_checkpointing "
                           "non-reentrant, logging_steps=1) + peft_config; _prepare_dataset skipped (phi3local's ids)"}
    notes = [
        "trained pairs/s: preference pairs per second over the timed steps; the first "
        f"{s['skip']} step(s) of each run are warm-up and not timed; packed phi3local steps hold more pairs than "
        "TRL's (micro_batch_size rows of several pairs each)",
        "peak mem: the contender process's peak RSS (CPU; includes imports and evaluation) or CUDA max allocated "
        "during training; train RSS: peak RSS sampled during training only",
        "both references are the 4-bit model with the adapter disabled, computed every step (no precomputation)",
        "val loss after: the same plain forward per sequence (full logits) for every contender, on the validation "
        "pairs after training: a consistency figure (a random model barely moves in so few steps; a contender that "
        "diverged would show), not a comparison of what each learned (packed steps train more pairs)",
        "rows: phi3local = each tool's defaults (phi3local's auto may turn checkpointing off and pack); "
        "phi3local_like = the same checkpointing and pairs per step as TRL (like for like)",
        "TRL casts LoRA weights to bf16 for 4-bit models (also on CPU; trl_fp32_lora casts them back); its "
        "padding_free is disabled in TRL 1.16",
        "TRL 1.16 scores log-probs through its chunked LM-head kernel (trl/kernels/chunked_logprob.py), Triton on "
        "CUDA/XPU, torch ops elsewhere, with per-token entropy, mean logit and top-1 for its logged metrics; on CPU "
        "that head took ~75% of its step at the tiny size (cProfile)",
        "on CPU both keep bitsandbytes' trainable NF4 layout (phi3local.model.load.keep_cpu_4bit_layout)",
    ]
    summary = {"ratios": ratios, "checks": checks, "targets": targets}
    path = save_result(ctx.out_dir, ctx.result_name(NAME), ctx.size, ctx.device, cfg, rows, summary=summary,
                       notes=notes, wall_s=time.perf_counter() - began)
    print_table(f"DPO end to end: {s['steps']} steps, {s['micro_batch_size']} pairs (rows) per micro-batch, sequences "
                f"<= {s['max_seq_len']} tokens, NF4 + LoRA r{s['lora_r']}, {ctx.device.type}, {rounds} round(s)", rows, [
        Column("contender", "contender", justify="left"),
        Column("pairs_per_s", "pairs/s", fmt_num), Column("pps_min", "min", fmt_num), Column("pps_max", "max", fmt_num),
        Column("trained_tokens_per_s", "answer tok/s", fmt_num), Column("seconds_per_step", "s/step", fmt_seconds),
        Column("pairs_per_step", "pairs/step", lambda x: f"{x:.1f}"), Column("padding_share", "padding", fmt_pct),
        Column("peak_memory_bytes", "peak mem", fmt_bytes), Column("train_rss_peak_bytes", "train RSS", fmt_bytes),
        Column("first_loss", "first loss", lambda x: f"{x:.6f}"),
        Column("final_val_loss", "val loss after", lambda x: f"{x:.4f}"),
        Column("final_val_reward_accuracy", "val reward acc", lambda x: f"{x:.2f}"),
    ], ctx.console)
    print_table("Ratios", [{"pair": k, **v} for k, v in ratios.items()], [
        Column("pair", "pair", justify="left"), Column("pairs_per_s", "pairs/s", fmt_ratio),
        Column("trained_tokens_per_s", "answer tok/s", fmt_ratio), Column("peak_memory", "peak mem", fmt_ratio),
        Column("train_rss_peak", "train RSS", fmt_ratio),
    ], ctx.console)
    check_rows = [{"check": k, "result": "ok" if v["ok"] else "FAIL",
                   "detail": json.dumps({kk: vv for kk, vv in v.items() if kk != "ok"})} for k, v in checks.items()]
    check_rows += [{"check": f"target: {k}", "result": "met" if v else "NOT met", "detail": ""} for k, v in targets.items()]
    print_table("Checks and targets", check_rows, [Column("check", "check", justify="left"),
                                                  Column("result", "result", justify="left"),
                                                  Column("detail", "detail", justify="left")], ctx.console)
    bar_chart(ctx.out_dir / f"{ctx.result_name(NAME)}.png", "trained pairs/s (median over rounds, min-max bars)",
              [r["contender"] for r in rows], [r["pairs_per_s"] for r in rows], "trained pairs/s",
              [(r["pps_min"], r["pps_max"]) for r in rows])
    return {"path": str(path), "rows": rows, "summary": summary}


if __name__ == "__main__":  # python -m kernels_bench.dpo_e2e [size]
    from kernels_bench.common import make_console

    run(Ctx(size=sys.argv[1] if len(sys.argv) > 1 else "small", console=make_console()))
