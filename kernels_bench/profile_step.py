"""Where one phi3local training step spends its time: torch.profiler over `train_step`, top ops, MFU.

The step is the product's own (`phi3local.train.recipe.setup` on the end-to-end benchmark's model and
recipe, packing and gradient checkpointing on: the like-for-like path of train_e2e, then `next_micro_batches`
+ `train_step`), after two warm-up steps. Ops are ranked
by self time (CPU; CUDA kernel time on GPU) and grouped into categories (matmul, NF4 dequant, attention,
loss, elementwise, optimizer, ...). MFU of unprofiled steps uses `phi3local.model.flops` as the
end-to-end benchmark does. Each speed lever gets its own before/after on the same micro-batch
(`summary.fused_lora_lever`: peft's LoRA forward -> the fused node; `summary.document_attention_lever`:
the whole-row mask -> packed documents one by one; `summary.selective_lever`: every op recomputed -> selective
checkpointing).
"""

from __future__ import annotations

import io
import re
import statistics
import time
from pathlib import Path

import torch

from kernels_bench.common import WORK_DIR, Ctx
from kernels_bench.isolate import run_isolated
from kernels_bench.report import Column, bar_chart, fmt_pct, fmt_seconds, print_table, save_result

NAME = "profile_step"
TOP = 20

CATEGORIES = [  # first match wins
    ("nf4 dequant (bitsandbytes)", r"bitsandbytes|dequantize|quantize_4bit|gemv_4bit"),
    ("attention", r"scaled_dot_product|flash|_efficient_attention|_attention"),
    ("matmul", r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm|_mm|addmv|mv)$|gemm|cublas|cutlass|sm90_xmma|ampere"),
    ("loss (softmax/CE)", r"log_softmax|nll_loss|cross_entropy|softmax"),
    ("optimizer", r"adam|_foreach|Optimizer|lerp|addcdiv|addcmul"),
    ("copies/casts", r"^aten::(copy_|to|_to_copy|contiguous|clone|cat|stack|index|index_select|embedding|"
                     r"masked_select|nonzero|gather|scatter|_reshape_alias|view|reshape|empty|zeros|fill_|zero_)"),
    ("elementwise/norm", r"^aten::(mul|add|sub|div|silu|pow|rsqrt|mean|sum|neg|exp|sigmoid|tanh|where|sqrt|"
                         r"maximum|clamp|abs|_foreach_norm|norm|linalg_vector_norm|isfinite|bitwise|eq|ne|lt)"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.I):
            return label
    return "other"


def child_profile(size: str, run_dir: str, packing: bool = True, gradient_checkpointing: bool = True,
                  selective_checkpointing: bool = False, fused_lora: bool = True, document_attention: bool = True,
                  variant: str | None = None) -> dict:
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile

    from kernels_bench.train_e2e import apply_variant, make_recipe, settings
    from phi3local.model.load import pick_device
    from phi3local.train import recipe as loop

    device = pick_device()
    recipe = make_recipe(size, packing, Path(run_dir), device, gradient_checkpointing=gradient_checkpointing,
                         selective_checkpointing=selective_checkpointing)
    recipe.training.fused_lora = fused_lora
    run = loop.setup(recipe, overwrite=True, console=Console(file=io.StringIO()))
    apply_variant(loop, run, variant)
    if not document_attention:  # transformers' own SDPA: packed rows through the block-diagonal mask
        from phi3local.model.load import base_causal_lm

        base_causal_lm(run.model).set_attn_implementation("sdpa")
    run.model.train()
    # The fullest micro-batch of the first epoch, so the profile shows a full step (not the short last one).
    plan = loop.epoch_plan(run.recipe, run.train_docs.lengths, 0)
    docs = run.train_docs
    rows = max(plan, key=lambda rs: len(rs) * max(sum(len(docs.input_ids[d]) for d in r) for r in rs))
    batch = loop.collate(rows, docs.input_ids, docs.labels, run.tokenizer.pad_token_id)

    def step():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loop.train_step(run, [batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, [batch]

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = [step() for _ in range(3)]
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    step_s = statistics.median(t for t, _ in timed)
    real, trained = batch.real_tokens, batch.trained_tokens
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled_s, _ = step()
    with profile(activities=activities, with_flops=True) as counted:  # FLOP counting only (it slows ops)
        step()
    use_cuda = device.type == "cuda"
    events, kernels = [], []
    for e in prof.key_averages():
        self_t = (e.self_device_time_total if use_cuda else e.self_cpu_time_total) / 1e6
        is_kernel = use_cuda and not str(e.device_type).endswith("CPU")
        if is_kernel:  # on CUDA an op's device time is its kernels': rank ops, list kernels apart
            kernels.append({"kernel": e.key[:160], "self_s": self_t, "calls": e.count})
            continue
        if self_t > 0:
            events.append({"op": e.key, "self_s": self_t, "calls": e.count,
                           "total_s": (e.device_time_total if use_cuda else e.cpu_time_total) / 1e6})
    events.sort(key=lambda x: -x["self_s"])
    total_self = sum(x["self_s"] for x in events)
    by_cat: dict[str, float] = {}
    for x in events:
        x["share"] = x["self_s"] / total_self
        x["category"] = category(x["op"])
        by_cat[x["category"]] = by_cat.get(x["category"], 0.0) + x["self_s"]
    s = settings(size)
    kernels.sort(key=lambda x: -x["self_s"])
    # FLOPs the profiler counts (matmuls, convolutions) in the profiled step: what the hardware executed,
    # recomputation included, against the model FLOPs a LoRA step needs (phi3local.model.flops.lora_step_flops).
    executed = float(sum(e.flops for e in counted.key_averages() if getattr(e, "flops", 0)))
    return {
        "variant": variant, "gradient_checkpointing": gradient_checkpointing,
        "selective_checkpointing": selective_checkpointing, "fused_lora": fused_lora,
        "document_attention": document_attention, "top_kernels": kernels[:TOP],
        "cuda_peak_bytes": peak_mem,
        "top_ops": events[:TOP], "categories": sorted(({"category": k, "self_s": v, "share": v / total_self}
                                                       for k, v in by_cat.items()), key=lambda x: -x["self_s"]),
        "total_self_s": total_self, "profiled_step_s": profiled_s, "step_s": step_s, "step_samples_s":
        [t for t, _ in timed], "real_tokens": real, "trained_tokens": trained,
        "padded_tokens": batch.padded_tokens, "model_flops": run.step_flops.total(real, trained),
        "peak_flops": run.peak_flops, "mfu": run.step_flops.total(real, trained) / step_s / run.peak_flops,
        "executed_matmul_flops": executed, "hfu": executed / step_s / run.peak_flops,
        "timing_basis": "CUDA kernel self time" if use_cuda else "CPU self time", "device": str(device),
        "settings": {k: s[k] for k in ("hidden", "layers", "heads", "intermediate", "vocab", "max_seq_len",
                                       "micro_batch_size")},
    }


def run(ctx: Ctx) -> dict:
    began = time.perf_counter()
    if ctx.size == "full":
        ctx.require_cuda_for_full()
    from kernels_bench.train_e2e import ensure_bench_model, prepare_data

    ensure_bench_model(ctx.size)
    prepare_data(ctx.size, ctx.device)
    # Each speed lever's before/after on the same micro-batch, one process each, one lever added at a time: the
    # like-for-like checkpointed step (every op recomputed) with peft's LoRA forward and transformers' masked SDPA,
    # then the fused LoRA node, then document attention (the step profiled below), then selective checkpointing.
    plain, fused, result, selective = (
        run_isolated("kernels_bench.profile_step:child_profile",
                     {"size": ctx.size, "run_dir": str(WORK_DIR / "e2e" / f"{ctx.size}-profile"),
                      "selective_checkpointing": keep, "fused_lora": fuse, "document_attention": documents},
                     env={"TRANSFORMERS_VERBOSITY": "error", "KINETO_LOG_LEVEL": "99", "HF_HUB_OFFLINE": "1"})
        for fuse, documents, keep in ((False, False, False), (True, False, False), (True, True, False),
                                      (True, True, True)))
    rows = result["top_ops"]
    summary = {k: result[k] for k in ("gradient_checkpointing", "step_s", "profiled_step_s", "mfu", "hfu",
                                      "executed_matmul_flops", "real_tokens", "trained_tokens",
                                      "padded_tokens", "model_flops", "peak_flops", "total_self_s",
                                      "timing_basis")}
    summary["categories"] = result["categories"]
    summary["fused_lora_lever"] = {  # before/after of training.fused_lora, every op recomputed in both
        "step_s_peft_forward": plain["step_s"], "step_s_fused": fused["step_s"],
        "speedup": plain["step_s"] / fused["step_s"], "categories_peft_forward": plain["categories"],
        "step_samples_s_peft_forward": plain["step_samples_s"], "step_samples_s_fused": fused["step_samples_s"]}
    summary["document_attention_lever"] = {  # before/after of phi3local.model.document_attention, fused in both
        "step_s_masked_sdpa": fused["step_s"], "step_s_documents": result["step_s"],
        "speedup": fused["step_s"] / result["step_s"], "categories_masked_sdpa": fused["categories"]}
    summary["selective_lever"] = {  # before/after of training.selective_checkpointing on the same micro-batch
        "step_s_full_recompute": result["step_s"], "step_s_selective": selective["step_s"],
        "speedup": result["step_s"] / selective["step_s"], "categories_selective": selective["categories"],
        "step_samples_s_selective": selective["step_samples_s"]}
    path = save_result(ctx.out_dir, ctx.result_name(NAME), ctx.size, ctx.device, {**result["settings"], "top": TOP}, rows,
                       summary=summary, notes=[
                           "one phi3local train_step (packed micro-batch, gradient checkpointing recomputing "
                           "every op, NF4 + LoRA through the fused node) after 2 warm-up steps; self time per op "
                           "from torch.profiler",
                           "levers, each in a process of its own, added one at a time: fused_lora_lever: peft's "
                           "LoRA forward and transformers' masked SDPA -> the fused node; document_attention_lever: "
                           "-> packed documents attended one by one (the profiled step); selective_lever: -> "
                           "training.selective_checkpointing=true",
                           "MFU: median of 3 unprofiled steps, real tokens x flops/token (6N + attention, "
                           "phi3local.model.flops) / step time / measured matmul peak",
                           "HFU: matmul FLOPs the profiler counted in the step (what was executed: no lm_head "
                           "for untrained tokens, no weight gradients for frozen layers, recomputation "
                           "included) / unprofiled step time / measured matmul peak"], wall_s=time.perf_counter() - began)
    print_table(f"Profile of one phi3local step ({result['device']}, {result['real_tokens']:.0f} tokens, "
                f"{result['trained_tokens']:.0f} trained): step {result['step_s']:.2f} s, "
                f"MFU {100 * result['mfu']:.1f}% (model FLOPs), matmul FLOPs executed {100 * result['hfu']:.1f}% "
                f"of the {result['peak_flops'] / 1e9:.0f} GFLOP/s measured peak",
                rows, [Column("op", "op", justify="left"), Column("category", "category", justify="left"),
                       Column("self_s", result["timing_basis"], fmt_seconds), Column("share", "share", fmt_pct),
                       Column("calls", "calls", str)], ctx.console)
    ctx.console.print(f"fused LoRA node: step {fused['step_s']:.2f} s against {plain['step_s']:.2f} s with peft's "
                      f"forward ({plain['step_s'] / fused['step_s']:.2f}x)", highlight=False)
    ctx.console.print(f"document attention: step {result['step_s']:.2f} s against {fused['step_s']:.2f} s through "
                      f"the whole-row mask ({fused['step_s'] / result['step_s']:.2f}x)", highlight=False)
    ctx.console.print(f"selective checkpointing: step {selective['step_s']:.2f} s against {result['step_s']:.2f} s "
                      f"with every op recomputed ({result['step_s'] / selective['step_s']:.2f}x)", highlight=False)
    print_table("Time by category (every op recomputed)", result["categories"], [
        Column("category", "category", justify="left"), Column("self_s", "self time", fmt_seconds),
        Column("share", "share", fmt_pct)], ctx.console)
    bar_chart(ctx.out_dir / f"{ctx.result_name(NAME)}.png", "phi3local train_step: self time by op", [r["op"][:60] for r in rows],
              [1e3 * r["self_s"] for r in rows], "ms")
    return {"path": str(path), "rows": rows, "summary": summary}
