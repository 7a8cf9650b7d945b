"""Attention kernels as the model calls them: eager vs SDPA vs flash-attn 2, forward and forward+backward,
on fixed-length rows and on packed rows (several documents per row, position_ids restarting at 0).

The attention function and the mask are the ones transformers' Phi-3 uses for each `attn_implementation`
(`eager_attention_forward`, `ALL_ATTENTION_FUNCTIONS[...]`, `create_causal_mask` from position_ids, as
`phi3local.train.batching.collate` builds them), called with a real `Phi3Attention` module. The mask is
built once per forward in the model and shared by all layers, so it is timed on its own row.

FLOP/s count only useful work: causal attention within each document (fwd 2·B·H·D·Σl², fwd+bwd 3x that).
"""

from __future__ import annotations

import importlib.util
import time

import torch

from kernels_bench.common import Ctx, packed_position_ids, packed_rows
from kernels_bench.memory import cuda_peak_bytes, torch_allocated_peak_bytes
from kernels_bench.report import Column, bar_chart, fmt_bytes, fmt_flops, fmt_seconds, print_table, save_result
from kernels_bench.timing import time_fn

NAME = "attention"


def implementations(ctx: Ctx) -> list[str]:
    impls = ["eager", "sdpa"]
    if (ctx.is_cuda and importlib.util.find_spec("flash_attn") is not None and ctx.dtype != torch.float32
            and torch.cuda.get_device_capability(ctx.device)[0] >= 8):
        impls.append("flash_attention_2")
    return impls


def shapes(ctx: Ctx) -> list[dict]:
    """(batch, heads, head_dim, seq) per case; full size: Phi-3-mini's 32 heads of 96 at 2048 and 4096."""
    if ctx.size == "tiny":
        return [{"batch": 1, "heads": 2, "head_dim": 32, "seq": 128}]
    if ctx.size == "small":
        return [{"batch": 2, "heads": 8, "head_dim": 96, "seq": 1024}]
    return [{"batch": 2, "heads": 32, "head_dim": 96, "seq": 2048}, {"batch": 1, "heads": 32, "head_dim": 96, "seq": 4096}]


def _attention_fn(impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import eager_attention_forward

    return eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def _module(impl: str, heads: int, head_dim: int, ctx: Ctx):
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3Attention

    config = Phi3Config(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads,
                        intermediate_size=4 * heads * head_dim, num_hidden_layers=1, vocab_size=32064,
                        max_position_embeddings=8192)
    config._attn_implementation = impl
    return config, Phi3Attention(config, layer_idx=0).to(ctx.device, ctx.dtype).train()


def _mask(config, batch: int, seq: int, position_ids: torch.Tensor, ctx: Ctx):
    from transformers.masking_utils import create_causal_mask

    embeds = torch.empty(batch, seq, config.hidden_size, device=ctx.device, dtype=ctx.dtype)
    return create_causal_mask(config, embeds, None, None, position_ids=position_ids)


def run(ctx: Ctx) -> dict:
    began = time.perf_counter()
    timing = ctx.timing_args()
    rows: list[dict] = []
    impls = implementations(ctx)
    for shape in shapes(ctx):
        b, h, d, seq = shape["batch"], shape["heads"], shape["head_dim"], shape["seq"]
        layouts = {
            "fixed": [[seq] for _ in range(b)],
            "packed": packed_rows(b, seq, seed=0, median=max(seq / 6, 16)),
        }
        g = torch.Generator(device="cpu").manual_seed(0)
        q0, k0, v0, go = (torch.randn(b, h, seq, d, generator=g).to(ctx.device, ctx.dtype) for _ in range(4))
        for layout, docs in layouts.items():
            position_ids = packed_position_ids(docs, ctx.device)
            useful = sum(n * n for row in docs for n in row)  # Σ l² over documents
            fwd_flops = 2.0 * h * d * useful  # causal: QK^T and PV over half of each l×l block, 2 FLOPs per MAC
            reference = None
            for impl in impls:
                config, module = _module(impl, h, d, ctx)
                fn = _attention_fn(impl)
                mask = _mask(config, b, seq, position_ids, ctx)
                q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))

                def forward(fn=fn, module=module, mask=mask, q=q, k=k, v=v, pos=position_ids):
                    return fn(module, q, k, v, mask, dropout=0.0, scaling=module.scaling,
                              sliding_window=None, position_ids=pos)[0]

                def forward_backward(forward=forward, q=q, k=k, v=v, go=go):
                    q.grad = k.grad = v.grad = None
                    forward().backward(go.transpose(1, 2))

                with torch.no_grad():
                    out = forward().float()
                if reference is None:
                    reference = out
                max_diff = float((out - reference).abs().max()) if out.shape == reference.shape else None
                t_mask = time_fn(lambda config=config, pos=position_ids, b=b, seq=seq: _mask(config, b, seq, pos, ctx),
                                 ctx.device, **timing)
                with torch.no_grad():
                    t_fwd = time_fn(forward, ctx.device, max_seconds=20, **timing)
                t_fb = time_fn(forward_backward, ctx.device, max_seconds=30, **timing)
                peak = (cuda_peak_bytes(forward_backward, ctx.device) if ctx.is_cuda
                        else torch_allocated_peak_bytes(forward_backward, ctx.device))
                rows.append({
                    "case": f"{layout} b{b} h{h}x{d} L{seq}", "layout": layout, "impl": impl, **shape,
                    "documents": sum(len(r) for r in docs),
                    "mask": "none: is_causal" if mask is None else f"{mask.dim()}D {str(mask.dtype)[6:]}",
                    "mask_s": t_mask.median, "fwd": t_fwd.as_dict(), "fwd_bwd": t_fb.as_dict(),
                    "fwd_s": t_fwd.median, "fwd_bwd_s": t_fb.median, "fwd_bwd_spread": t_fb.spread,
                    "fwd_flops_per_s": fwd_flops / t_fwd.median, "fwd_bwd_flops_per_s": 3 * fwd_flops / t_fb.median,
                    "peak_bytes": peak, "max_abs_diff_vs_first": max_diff,
                })
                del module, mask, q, k, v
    for row in rows:  # speed-up of each implementation over eager in the same case
        eager = next(r for r in rows if r["case"] == row["case"] and r["impl"] == "eager")
        row["fwd_bwd_speedup_vs_eager"] = eager["fwd_bwd_s"] / row["fwd_bwd_s"]
    config = {"implementations": impls, "shapes": shapes(ctx), "dtype": str(ctx.dtype), "timing": timing,
              "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None}
    notes = ["mask_s: create_causal_mask from position_ids (once per forward, shared by all layers)",
             "peak_bytes: tensor bytes allocated during one fwd+bwd above the start "
             + ("(CUDA max_memory_allocated)" if ctx.is_cuda else "(torch.profiler memory events)"),
             "FLOP/s count causal work inside documents only; packed rows with a block-diagonal mask do the "
             "whole L×L in eager and in SDPA's masked kernels, so their useful FLOP/s drop"]
    if "flash_attention_2" not in impls:
        notes.append("flash-attn 2: not run (needs CUDA, a 16-bit dtype and the flash_attn package)")
    path = save_result(ctx.out_dir, ctx.result_name(NAME), ctx.size, ctx.device, config, rows, notes=notes,
                       wall_s=time.perf_counter() - began)
    print_table(f"Attention fwd+bwd ({ctx.device.type}, {ctx.dtype})", rows, [
        Column("case", "case", justify="left"), Column("impl", "impl", justify="left"),
        Column("mask", "mask", justify="left"),
        Column("mask_s", "mask build", fmt_seconds), Column("fwd_s", "fwd", fmt_seconds),
        Column("fwd_bwd_s", "fwd+bwd", fmt_seconds), Column("fwd_bwd_spread", "spread", lambda x: f"{100*x:.0f}%"),
        Column("fwd_bwd_flops_per_s", "useful FLOP/s", fmt_flops),
        Column("fwd_bwd_speedup_vs_eager", "vs eager", lambda x: f"{x:.2f}x"),
        Column("peak_bytes", "peak mem", fmt_bytes),
        Column("max_abs_diff_vs_first", "max |Δ|", lambda x: f"{x:.1e}"),
    ], ctx.console)
    bar_chart(ctx.out_dir / f"{ctx.result_name(NAME)}.png", f"attention fwd+bwd, {ctx.device.type} {ctx.dtype}",
              [f"{r['case']} {r['impl']}" for r in rows], [1e3 * r["fwd_bwd_s"] for r in rows], "ms (median)",
              [(1e3 * r["fwd_bwd"]["min_s"], 1e3 * r["fwd_bwd"]["max_s"]) for r in rows])
    return {"path": str(path), "rows": rows}
