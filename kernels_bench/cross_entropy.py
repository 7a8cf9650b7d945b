"""Cross-entropy over Phi-3's 32064-token vocabulary: time and peak memory of forward+backward.

Contenders (the same hidden states, frozen lm_head and targets; the loss is the mean over trained tokens):
- `full_logits`: lm_head over every position, then transformers' `ForCausalLMLoss` (what a plain
  `model(input_ids, labels=...)` does): the whole [tokens x 32064] logits in fp32, and its gradient.
- `phi3local_chunked`: `phi3local.train.loss.chunked_cross_entropy` (the training loop's loss): only
  trained positions go through lm_head, in chunks of `loss_chunk_size`, each recomputed in backward.
- `trl_fused`: TRL's `ChunkedLogProbFunction` as `SFTTrainer` calls it (log-probs, entropy, top-1),
  which scores every position on CPU and only the trained ones on CUDA.

Two target layouts: `chat` (the trained share of real chat data: the answer at the end of each document,
~15% of tokens) and `all` (every position trained), which separates chunking from skipping prompts.

Peak memory: on CPU each contender runs in its own process and reports the RSS peak above the RSS just
before the call (VmHWM reset) and the peak of live tensor bytes from torch.profiler's memory events; on
CUDA, torch.cuda.max_memory_allocated above the start.
"""

from __future__ import annotations

import time

import torch

from kernels_bench.common import VOCAB, Ctx
from kernels_bench.isolate import run_isolated
from kernels_bench.memory import cuda_peak_bytes, rss_peak_delta_bytes, torch_allocated_peak_bytes
from kernels_bench.report import Column, bar_chart, fmt_bytes, fmt_seconds, print_table, save_result
from kernels_bench.timing import time_fn

NAME = "cross_entropy"
CHAT_TRAINED_SHARE = 0.15  # azure-phi3-finetune-chat with the Phi-3 tokenizer: 2,675 of 17,644 tokens


def shape(size: str) -> dict:
    return {"tiny": {"batch": 2, "seq": 64, "hidden": 64, "chunk": 32},
            "small": {"batch": 2, "seq": 512, "hidden": 256, "chunk": 1024},
            "full": {"batch": 2, "seq": 4096, "hidden": 3072, "chunk": 1024}}[size]


def contenders() -> list[str]:
    names = ["full_logits", "phi3local_chunked"]
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401

        names.append("trl_fused")
    except ImportError:
        pass
    return names


def make_inputs(size: str, layout: str, device: torch.device, dtype: torch.dtype):
    s = shape(size)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(s["batch"], s["seq"], s["hidden"], generator=g).to(device, dtype).requires_grad_(True)
    lm_head = torch.nn.Linear(s["hidden"], VOCAB, bias=False)
    with torch.no_grad():
        lm_head.weight.normal_(0, s["hidden"] ** -0.5, generator=g)
    lm_head = lm_head.to(device, dtype).requires_grad_(False)
    targets = torch.randint(0, VOCAB, (s["batch"], s["seq"]), generator=g)
    if layout == "chat":  # the answer is the tail of each document; prompts are not trained
        start = int(s["seq"] * (1 - CHAT_TRAINED_SHARE))
        targets[:, :start] = -100
    return hidden, lm_head, targets.to(device), s["chunk"]


def loss_fn(name: str, hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int):
    n = (targets != -100).sum()
    if name == "full_logits":
        from transformers.loss.loss_utils import ForCausalLMLoss

        return lambda: ForCausalLMLoss(lm_head(hidden), None, VOCAB, shift_labels=targets)
    if name == "phi3local_chunked":
        from phi3local.train.loss import chunked_cross_entropy

        return lambda: chunked_cross_entropy(hidden, targets, lm_head, chunk)[0] / n
    if name == "trl_fused":
        from trl.kernels import ChunkedLogProbFunction

        def trl_loss():
            mask = targets != -100
            if hidden.device.type == "cuda":  # TRL scores only valid positions on Triton devices
                logp = ChunkedLogProbFunction.apply(hidden[mask], lm_head.weight, None, targets[mask], 1.0, 32768,
                                                    None, 1.0, ("log_probs", "entropy", "is_top1"))[0]
                return -logp.sum() / n
            flat = hidden.reshape(-1, hidden.shape[-1])
            logp = ChunkedLogProbFunction.apply(flat, lm_head.weight, None, targets.clamp(min=0).reshape(-1), 1.0,
                                                32768, None, 1.0, ("log_probs", "entropy", "is_top1"))[0]
            return -(logp.view(mask.shape).masked_fill(~mask, 0)).sum() / n

        return trl_loss
    raise ValueError(name)


def measure_memory(size: str, contender: str, layout: str, device: str = "cpu") -> dict:
    """In a fresh process: peak memory of one forward+backward (RSS delta and profiler tensor peak)."""
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    hidden, lm_head, targets, chunk = make_inputs(size, layout, device, dtype)
    loss = loss_fn(contender, hidden, lm_head, targets, chunk)

    def fwd_bwd():
        hidden.grad = None
        loss().backward()

    result = rss_peak_delta_bytes(fwd_bwd)
    result["tensor_peak_bytes"] = torch_allocated_peak_bytes(fwd_bwd, device)
    return result


def run(ctx: Ctx) -> dict:
    began = time.perf_counter()
    timing = ctx.timing_args()
    s = shape(ctx.size)
    rows = []
    for layout in ("chat", "all"):
        hidden, lm_head, targets, chunk = make_inputs(ctx.size, layout, ctx.device, ctx.dtype)
        trained = int((targets != -100).sum())
        reference = None
        for name in contenders():
            loss = loss_fn(name, hidden, lm_head, targets, chunk)

            def fwd_bwd(loss=loss, hidden=hidden):
                hidden.grad = None
                loss().backward()

            with torch.no_grad():
                value = float(loss())
            reference = value if reference is None else reference
            with torch.no_grad():
                t_fwd = time_fn(loss, ctx.device, max_seconds=20, **timing)
            t_fb = time_fn(fwd_bwd, ctx.device, max_seconds=30, **timing)
            if ctx.is_cuda:
                mem = {"cuda_peak_bytes": cuda_peak_bytes(fwd_bwd, ctx.device)}
                mem["tensor_peak_bytes"] = mem["cuda_peak_bytes"]
            else:
                mem = run_isolated("kernels_bench.cross_entropy:measure_memory",
                                   {"size": ctx.size, "contender": name, "layout": layout})
            rows.append({
                "layout": layout, "contender": name, "tokens": s["batch"] * s["seq"], "trained_tokens": trained,
                "hidden": s["hidden"], "vocab": VOCAB, "chunk": chunk, "loss": value,
                "loss_diff_vs_full": value - reference,
                "fwd": t_fwd.as_dict(), "fwd_bwd": t_fb.as_dict(), "fwd_s": t_fwd.median,
                "fwd_bwd_s": t_fb.median, "fwd_bwd_spread": t_fb.spread,
                "peak_bytes": mem.get("cuda_peak_bytes", mem.get("rss_peak_delta_bytes")),
                "tensor_peak_bytes": mem.get("tensor_peak_bytes"), "memory": mem,
            })
    for row in rows:
        full = next(r for r in rows if r["layout"] == row["layout"] and r["contender"] == "full_logits")
        row["speedup_vs_full"] = full["fwd_bwd_s"] / row["fwd_bwd_s"]
        row["memory_vs_full"] = (row["tensor_peak_bytes"] / full["tensor_peak_bytes"]
                                 if full["tensor_peak_bytes"] else None)
    logits_bytes = s["batch"] * s["seq"] * VOCAB * 4
    config = {**s, "vocab": VOCAB, "dtype": str(ctx.dtype), "contenders": contenders(), "timing": timing,
              "chat_trained_share": CHAT_TRAINED_SHARE, "fp32_logits_bytes": logits_bytes}
    notes = [f"one fp32 [tokens x vocab] logits tensor here is {fmt_bytes(logits_bytes)}",
             "peak mem: " + ("CUDA max_memory_allocated above the start" if ctx.is_cuda else
                             "RSS peak above the RSS before the call, one process per contender (VmHWM reset)"),
             "tensor peak: live tensor bytes from torch.profiler memory events (allocator view)",
             "layout chat: the trained share of the real chat data (answers); all: every position trained"]
    path = save_result(ctx.out_dir, ctx.result_name(NAME), ctx.size, ctx.device, config, rows, notes=notes,
                       wall_s=time.perf_counter() - began)
    print_table(f"Cross-entropy over {VOCAB} tokens, fwd+bwd ({ctx.device.type}, {ctx.dtype}, "
                f"{s['batch']}x{s['seq']} tokens, hidden {s['hidden']})", rows, [
        Column("layout", "targets", justify="left"), Column("contender", "contender", justify="left"),
        Column("trained_tokens", "trained", str), Column("fwd_s", "fwd", fmt_seconds),
        Column("fwd_bwd_s", "fwd+bwd", fmt_seconds), Column("fwd_bwd_spread", "spread", lambda x: f"{100*x:.0f}%"),
        Column("speedup_vs_full", "vs full", lambda x: f"{x:.2f}x"),
        Column("peak_bytes", "peak mem", fmt_bytes), Column("tensor_peak_bytes", "tensor peak", fmt_bytes),
        Column("loss_diff_vs_full", "Δloss", lambda x: f"{x:+.1e}"),
    ], ctx.console)
    bar_chart(ctx.out_dir / f"{ctx.result_name(NAME)}.png", "cross-entropy fwd+bwd time",
              [f"{r['layout']} {r['contender']}" for r in rows], [1e3 * r["fwd_bwd_s"] for r in rows], "ms (median)",
              [(1e3 * r["fwd_bwd"]["min_s"], 1e3 * r["fwd_bwd"]["max_s"]) for r in rows])
    return {"path": str(path), "rows": rows}
