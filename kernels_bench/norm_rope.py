"""RMSNorm and rotary embedding as the model runs them (transformers' Phi-3 modules), forward and
forward+backward, with torch's fused `F.rms_norm` as a reference point.

- RMSNorm: `Phi3RMSNorm` (upcast to fp32, variance, rsqrt, scale) on [batch, seq, hidden]; in LoRA
  training its weight is frozen and only the input gradient flows.
- Rotary: `Phi3RotaryEmbedding` (cos/sin from packed position_ids) + `apply_rotary_pos_emb` on q and k
  [batch, heads, seq, head_dim], input gradients for q and k.
Memory-bound ops: the table shows GB/s (bytes read + written by an ideal fused kernel, forward only).
"""

from __future__ import annotations

import time

import torch

from kernels_bench.common import PHI3_MINI, Ctx, packed_position_ids, packed_rows
from kernels_bench.report import Column, bar_chart, fmt_seconds, print_table, save_result
from kernels_bench.timing import time_fn

NAME = "norm_rope"


def shape(ctx: Ctx) -> dict:
    b, seq = ctx.pick((1, 128), (2, 1024), (4, 4096))
    if ctx.size == "tiny":
        return {"batch": b, "seq": seq, "hidden": 64, "heads": 2, "head_dim": 32}
    return {"batch": b, "seq": seq, "hidden": PHI3_MINI["hidden"], "heads": PHI3_MINI["heads"],
            "head_dim": PHI3_MINI["head_dim"]}


def run(ctx: Ctx) -> dict:
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm, Phi3RotaryEmbedding, apply_rotary_pos_emb

    began = time.perf_counter()
    timing = ctx.timing_args()
    s = shape(ctx)
    b, seq, d, h, hd = s["batch"], s["seq"], s["hidden"], s["heads"], s["head_dim"]
    elt = torch.finfo(ctx.dtype).bits // 8
    g = torch.Generator().manual_seed(0)
    rows = []

    # RMSNorm
    x = torch.randn(b, seq, d, generator=g).to(ctx.device, ctx.dtype).requires_grad_(True)
    gx = torch.randn(b, seq, d, generator=g).to(ctx.device, ctx.dtype)
    norm = Phi3RMSNorm(d, eps=1e-5).to(ctx.device, ctx.dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    impls = {
        "Phi3RMSNorm (model)": lambda: norm(x),
        "F.rms_norm (torch fused)": lambda: torch.nn.functional.rms_norm(x, (d,), norm.weight, 1e-5),
    }
    ref = None
    for label, fn in impls.items():
        with torch.no_grad():
            out = fn().float()
            ref = out if ref is None else ref
            t_f = time_fn(fn, ctx.device, **timing)

        def fb(fn=fn):
            x.grad = None
            fn().backward(gx)

        t_fb = time_fn(fb, ctx.device, **timing)
        rows.append({"op": "rmsnorm", "impl": label, "shape": f"{b}x{seq}x{d}", "fwd_s": t_f.median,
                     "fwd_bwd_s": t_fb.median, "fwd": t_f.as_dict(), "fwd_bwd": t_fb.as_dict(),
                     "fwd_gb_per_s": 2 * x.numel() * elt / t_f.median / 1e9,
                     "max_abs_diff": float((out - ref).abs().max())})

    # Rotary embedding
    config = Phi3Config(hidden_size=h * hd, num_attention_heads=h, num_key_value_heads=h, vocab_size=32064,
                        intermediate_size=4 * h * hd, num_hidden_layers=1, max_position_embeddings=8192,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = Phi3RotaryEmbedding(config).to(ctx.device)
    pos = packed_position_ids(packed_rows(b, seq, seed=1, median=max(seq / 6, 16)), ctx.device)
    q = torch.randn(b, h, seq, hd, generator=g).to(ctx.device, ctx.dtype).requires_grad_(True)
    k = torch.randn(b, h, seq, hd, generator=g).to(ctx.device, ctx.dtype).requires_grad_(True)
    gq = torch.randn(b, h, seq, hd, generator=g).to(ctx.device, ctx.dtype)

    def cos_sin():
        return rope(q, pos)

    cos, sin = cos_sin()

    def apply():
        return apply_rotary_pos_emb(q, k, cos, sin)

    def apply_fb():
        q.grad = k.grad = None
        qe, ke = apply()
        torch.autograd.backward([qe, ke], [gq, gq])

    with torch.no_grad():
        t_cs = time_fn(cos_sin, ctx.device, **timing)
        t_ap = time_fn(apply, ctx.device, **timing)
    t_apfb = time_fn(apply_fb, ctx.device, **timing)
    rows.append({"op": "rotary", "impl": "Phi3RotaryEmbedding cos/sin (once per forward)",
                 "shape": f"pos {b}x{seq}, dim {hd}", "fwd_s": t_cs.median, "fwd": t_cs.as_dict(),
                 "fwd_gb_per_s": 2 * b * seq * hd * elt / t_cs.median / 1e9})
    rows.append({"op": "rotary", "impl": "apply_rotary_pos_emb q,k (every layer)", "shape": f"{b}x{h}x{seq}x{hd} x2",
                 "fwd_s": t_ap.median, "fwd_bwd_s": t_apfb.median, "fwd": t_ap.as_dict(), "fwd_bwd": t_apfb.as_dict(),
                 "fwd_gb_per_s": 4 * q.numel() * elt / t_ap.median / 1e9})
    for r in rows:
        r["fwd_bwd_spread"] = r["fwd_bwd"]["spread"] if "fwd_bwd" in r else None
    config_out = {**s, "dtype": str(ctx.dtype), "timing": timing}
    path = save_result(ctx.out_dir, ctx.result_name(NAME), ctx.size, ctx.device, config_out, rows,
                       wall_s=time.perf_counter() - began,
                       notes=["GB/s: bytes an ideal fused forward reads and writes (input + output) per second",
                              "F.rms_norm is a reference point, not what transformers' Phi-3 calls"])
    print_table(f"RMSNorm and rotary embedding ({ctx.device.type}, {ctx.dtype})", rows, [
        Column("op", "op", justify="left"), Column("impl", "implementation", justify="left"),
        Column("shape", "shape", justify="left"), Column("fwd_s", "fwd", fmt_seconds),
        Column("fwd_bwd_s", "fwd+bwd", fmt_seconds), Column("fwd_bwd_spread", "spread", lambda x: f"{100*x:.0f}%"),
        Column("fwd_gb_per_s", "fwd GB/s", lambda x: f"{x:.1f}"),
        Column("max_abs_diff", "max |Δ|", lambda x: f"{x:.1e}")], ctx.console)
    bar_chart(ctx.out_dir / f"{ctx.result_name(NAME)}.png", "RMSNorm / rotary forward (+backward)",
              [f"{r['op']} {r['impl']}" for r in rows], [1e3 * r.get("fwd_bwd_s", r["fwd_s"]) for r in rows],
              "ms (fwd+bwd where measured, else fwd)")
    return {"path": str(path), "rows": rows}
