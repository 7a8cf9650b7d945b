"""The 4-bit NF4 linear layer with its LoRA adapter, as the model trains it, against plain 16/32-bit ones.

Each contender is one of Phi-3's linear layers (qkv_proj, o_proj, gate_up_proj, down_proj) wrapped by peft
LoRA (r16, alpha 32) the way `phi3local.model.load.load_model` gets it: a bitsandbytes `Linear4bit` (NF4,
double quant, compute dtype and quant storage = the recipe's compute dtype) under peft's bnb LoRA layer,
or a frozen `nn.Linear` in fp32 / bf16 under peft's LoRA layer. Forward+backward computes the input
gradient (earlier layers need it) and the LoRA gradients, as in training.

Rows also show the NF4 dequantisation alone (bitsandbytes.functional.dequantize_4bit), which NF4 adds to
every forward and backward, and NF4 with bf16 adapters (what TRL's SFTTrainer casts LoRA weights to for
quantized models, also on CPU).
"""

from __future__ import annotations

import time

import torch

from kernels_bench.common import PHI3_MINI, Ctx
from kernels_bench.report import Column, bar_chart, fmt_flops, fmt_seconds, print_table, save_result
from kernels_bench.timing import time_fn
from phi3local.model.flops import measured_matmul_peak

NAME = "nf4_linear"
LORA_R = 16


def layer_shapes(ctx: Ctx) -> tuple[int, dict[str, tuple[int, int]]]:
    """(tokens, {layer: (in, out)}) with Phi-3's layer proportions."""
    tokens, d, inter = ctx.pick((64, 64, 192), (1024, 768, 2048), (4096, PHI3_MINI["hidden"], PHI3_MINI["intermediate"]))
    return tokens, {"qkv_proj": (d, 3 * d), "o_proj": (d, d), "gate_up_proj": (d, 2 * inter), "down_proj": (inter, d)}


class _Holder(torch.nn.Module):
    is_loaded_in_4bit = False  # peft picks its bnb LoRA layer only for models loaded in 4-bit

    def __init__(self, layer: torch.nn.Module, four_bit: bool):
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = four_bit

    def forward(self, x):
        return self.proj(x)


def build(kind: str, weight: torch.Tensor, ctx: Ctx) -> torch.nn.Module:
    """kind: nf4 | nf4_bf16_lora | fp32 | bf16 | fp16 (frozen base + trainable LoRA)."""
    from peft import LoraConfig, get_peft_model

    out_f, in_f = weight.shape
    if kind.startswith("nf4"):
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=ctx.dtype, quant_type="nf4",
                                  compress_statistics=True, quant_storage=ctx.dtype)
        layer.weight = bnb.nn.Params4bit(weight.to(ctx.dtype).cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=ctx.dtype)
        layer = layer.to(ctx.device)  # quantises
    else:
        dtype = KIND_DTYPE[kind]
        layer = torch.nn.Linear(in_f, out_f, bias=False).to(ctx.device, dtype)
        layer.weight.data.copy_(weight.to(ctx.device, dtype))
        layer.weight.requires_grad_(False)
    model = get_peft_model(_Holder(layer, kind.startswith("nf4")),
                           LoraConfig(r=LORA_R, lora_alpha=32, lora_dropout=0.0, target_modules=["proj"]))
    if kind == "nf4_bf16_lora":
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    # A non-zero B so the adapter's backward does real work.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model


KIND_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dense_kind(ctx: Ctx) -> str:
    """The dense layer in the compute dtype: the yardstick NF4 is compared with."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[ctx.dtype]


def contenders(ctx: Ctx, layer: str) -> list[str]:
    if ctx.is_cuda:
        return ["nf4", "nf4_bf16_lora", dense_kind(ctx), "fp32"]
    # bf16 matmuls on CPUs without AMX/avx512-bf16 run 10-150x slower than fp32 (their backward most of all):
    # one layer shows it, four would take minutes.
    return ["nf4", "nf4_bf16_lora", "fp32"] + (["bf16"] if layer == "o_proj" else [])


def run(ctx: Ctx) -> dict:
    import bitsandbytes.functional as bnbf

    began = time.perf_counter()
    timing = ctx.timing_args()
    tokens, layers = layer_shapes(ctx)
    peak = measured_matmul_peak(ctx.device, ctx.dtype)
    rows = []
    for layer_name, (in_f, out_f) in layers.items():
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
        x0 = torch.randn(tokens, in_f, generator=g)
        base_flops = 2.0 * tokens * in_f * out_f
        for kind in contenders(ctx, layer_name):
            model = build(kind, weight, ctx)
            dtype = ctx.dtype if kind.startswith("nf4") else KIND_DTYPE[kind]
            x = x0.to(ctx.device, dtype).requires_grad_(True)
            gout = torch.ones(tokens, out_f, device=ctx.device, dtype=dtype) / out_f

            def forward(model=model, x=x):
                return model(x)

            def forward_backward(model=model, x=x, gout=gout):
                x.grad = None
                model.zero_grad(set_to_none=True)
                forward(model, x).backward(gout)

            with torch.no_grad():
                with model.disable_adapter():
                    out = forward().float()
                ref = x0.to(ctx.device) @ weight.to(ctx.device).t()
                rel_err = float((out - ref).norm() / ref.norm())
                t_fwd = time_fn(forward, ctx.device, max_seconds=15, **timing)
            slow = kind == "bf16" and not ctx.is_cuda
            t_fb = time_fn(forward_backward, ctx.device, max_seconds=20,
                           **({"warmup": 1, "iters": 1, "repeats": 2} if slow else timing))
            rows.append({
                "layer": layer_name, "shape": f"{tokens}x{in_f} -> {out_f}", "kind": kind, "tokens": tokens,
                "in": in_f, "out": out_f, "fwd": t_fwd.as_dict(), "fwd_bwd": t_fb.as_dict(),
                "fwd_s": t_fwd.median, "fwd_bwd_s": t_fb.median, "fwd_bwd_spread": t_fb.spread,
                "fwd_flops_per_s": base_flops / t_fwd.median,
                "fwd_bwd_flops_per_s": 2 * base_flops / t_fb.median,
                "fwd_bwd_of_peak": 2 * base_flops / t_fb.median / peak,
                "rel_err_vs_fp32": rel_err,
            })
            if kind == "nf4":
                w4 = model.base_model.model.proj.base_layer.weight
                t_dq = time_fn(lambda w4=w4: bnbf.dequantize_4bit(w4.data, w4.quant_state), ctx.device, **timing)
                rows.append({"layer": layer_name, "shape": f"{out_f}x{in_f} weight", "kind": "nf4 dequant only",
                             "fwd": t_dq.as_dict(), "fwd_s": t_dq.median, "tokens": tokens, "in": in_f, "out": out_f})
            del model
    for row in rows:
        ref = next(r for r in rows if r["layer"] == row["layer"] and r["kind"] == dense_kind(ctx))
        if "fwd_bwd_s" in row:
            row["fwd_bwd_vs_dense"] = row["fwd_bwd_s"] / ref["fwd_bwd_s"]
        row["fwd_vs_dense"] = row["fwd_s"] / ref["fwd_s"]
    config = {"tokens": tokens, "layers": {k: list(v) for k, v in layers.items()}, "lora_r": LORA_R,
              "compute_dtype": str(ctx.dtype), "contenders": {k: contenders(ctx, k) for k in layers}, "timing": timing,
              "matmul_peak_flops": peak}
    notes = ["kinds: nf4 = bitsandbytes Linear4bit (NF4, double quant) + peft LoRA (fp32 adapters); "
             "nf4_bf16_lora = the same with adapters cast to bf16 (TRL SFTTrainer's default for 4-bit models); "
             "fp32/bf16/fp16 = frozen nn.Linear + LoRA",
             "FLOP/s count the base matmuls only: fwd 2·T·in·out, fwd+bwd 4·T·in·out (no weight gradient: frozen)",
             "x vs dense: time / time of the dense layer in the compute dtype (fp32 on CPU, bf16/fp16 on CUDA)",
             "rel_err_vs_fp32: ||y - x W^T|| / ||x W^T|| of the base layer (adapter off): the rounding of the weight format"]
    path = save_result(ctx.out_dir, ctx.result_name(NAME), ctx.size, ctx.device, config, rows, notes=notes,
                       wall_s=time.perf_counter() - began)
    print_table(f"NF4 linear + LoRA ({ctx.device.type}, compute {ctx.dtype}, {tokens} tokens)", rows, [
        Column("layer", "layer", justify="left"), Column("shape", "shape", justify="left"),
        Column("kind", "kind", justify="left"), Column("fwd_s", "fwd", fmt_seconds),
        Column("fwd_bwd_s", "fwd+bwd", fmt_seconds), Column("fwd_bwd_spread", "spread", lambda x: f"{100*x:.0f}%"),
        Column("fwd_bwd_flops_per_s", "FLOP/s", fmt_flops),
        Column("fwd_bwd_of_peak", "of peak", lambda x: f"{100*x:.0f}%"),
        Column("fwd_bwd_vs_dense", "x vs dense", lambda x: f"{x:.2f}x"),
        Column("rel_err_vs_fp32", "rel err", lambda x: f"{x:.1e}"),
    ], ctx.console)
    timed = [r for r in rows if "fwd_bwd_s" in r]
    bar_chart(ctx.out_dir / f"{ctx.result_name(NAME)}.png", f"linear + LoRA fwd+bwd, {ctx.device.type}",
              [f"{r['layer']} {r['kind']}" for r in timed], [1e3 * r["fwd_bwd_s"] for r in timed], "ms (median)",
              [(1e3 * r["fwd_bwd"]["min_s"], 1e3 * r["fwd_bwd"]["max_s"]) for r in timed])
    return {"path": str(path), "rows": rows}
