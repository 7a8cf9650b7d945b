"""A frozen 4-bit linear layer and its LoRA path as one autograd node.

peft computes a LoRA'd 4-bit layer as separate ops: the frozen NF4 matmul, a defensive clone of its output,
the low-rank product, a scale and an add, each writing a tensor as wide as the layer's output, and in backward
the scale's and the add's gradients plus the sum of the two input gradients. `FrozenLinearWithLora` does the
same arithmetic with fewer full-width passes: the frozen output and the scaled low-rank update in one `addmm`,
and in backward the input's gradient through the frozen weight and through the adapter in one `addmm` (the
scale lands on r-wide tensors). Under checkpointing the recomputation repeats the forward, so it saves twice.

What autograd keeps is what peft's ops keep: the layer's input (for the A gradient; the frozen weight needs none)
and the r-wide middle. With a 16-bit compute dtype and fp32 adapters (CUDA), the input is kept in the compute
dtype and cast in backward, instead of peft's fp32 copy (`phi3local.train.memory_plan` counts it so).

`use_fused_lora` swaps peft's `Linear4bit` LoRA layers to `FusedLinear4bit`, whose forward takes this path when the
layer runs one plain LoRA adapter and otherwise calls peft's own forward (adapters disabled or merged, several
active adapters, per-row adapter names, DoRA and other variants, a LoRA bias, autocast). Gradients equal peft's
within float rounding (tests/test_fused_lora.py).
"""

from __future__ import annotations

import functools

import torch


class FrozenLinearWithLora(torch.autograd.Function):
    """out = base_layer(x) + scaling * (x_lora @ A.T) @ B.T, with base_layer frozen (no weight gradient).

    x_lora is x, or the adapter's dropout of x (cast to the adapter's dtype first, as peft does).
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, scaling: float, base_layer):
        base = base_layer(x)  # gradients are off in here: bitsandbytes' gemm_4bit, as its own forward runs it
        width = base.shape[-1]
        inputs = x_lora.reshape(-1, x_lora.shape[-1]).to(lora_a.dtype)
        middle = torch.mm(inputs, lora_a.t())
        if base.dtype == lora_a.dtype:
            out = torch.addmm(base.reshape(-1, width), middle, lora_b.t(), alpha=scaling)
        else:  # fp32 adapters on a 16-bit model: peft's arithmetic (update in fp32, cast, add)
            out = base.reshape(-1, width) + torch.mm(middle, lora_b.t()).mul_(scaling).to(base.dtype)
        ctx.save_for_backward(x_lora, middle, lora_a, lora_b)
        # The packed weight and its quantisation state as the forward used them, as bitsandbytes' own backward
        # keeps them (under FSDP2 the module's parameter is then a plain tensor gathered again before backward).
        ctx.weight, ctx.quant_state = base_layer.weight, base_layer.weight.quant_state
        ctx.scaling, ctx.x_shape = scaling, x.shape
        ctx.same_input = x_lora is x
        return out.view(*base.shape)

    @staticmethod
    def backward(ctx, grad):
        x_lora, middle, lora_a, lora_b = ctx.saved_tensors
        need_x, need_x_lora, need_a, need_b = ctx.needs_input_grad[:4]
        g = grad.reshape(-1, grad.shape[-1])
        g_adapter = g.to(lora_a.dtype)
        grad_middle = torch.mm(g_adapter, lora_b).mul_(ctx.scaling)  # r wide: the scale costs nothing here
        grad_b = torch.mm(g_adapter.t(), middle).mul_(ctx.scaling) if need_b else None
        grad_a = None
        if need_a:
            grad_a = torch.mm(grad_middle.t(), x_lora.reshape(-1, x_lora.shape[-1]).to(lora_a.dtype))
        grad_x = grad_x_lora = None
        through_adapter = torch.mm(grad_middle, lora_a) if (need_x or need_x_lora) else None
        if need_x:
            weight = dequantize(ctx.weight, ctx.quant_state, g.dtype)
            if ctx.same_input and through_adapter.dtype == g.dtype:  # both input gradients in one addmm
                grad_x = torch.addmm(through_adapter, g, weight)
            else:
                grad_x = torch.mm(g, weight)
                if ctx.same_input:
                    grad_x += through_adapter.to(g.dtype)
            grad_x = grad_x.view(ctx.x_shape)
        if need_x_lora and not ctx.same_input:
            grad_x_lora = through_adapter.to(x_lora.dtype).view(x_lora.shape)
        return grad_x, grad_x_lora, grad_a, grad_b, None, None


def dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit layer's weight as [out, in] in `dtype`, as bitsandbytes' own backward computes it."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(packed, quant_state).to(dtype)


def fused_forward(layer, x: torch.Tensor, *args, **kwargs):
    """The forward of a fused layer: the one node when it applies, else peft's own forward."""
    adapter = _plain_adapter(layer, args, kwargs)
    if adapter is None:
        return layer.peft_forward(x, *args, **kwargs)
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dropout = layer.lora_dropout[adapter]
    x_lora = x if isinstance(dropout, torch.nn.Identity) else dropout(x.to(lora_a.dtype))
    return FrozenLinearWithLora.apply(x, x_lora, lora_a, lora_b, layer.scaling[adapter], layer.base_layer)


def _plain_adapter(layer, args: tuple, kwargs: dict) -> str | None:
    """The one active plain LoRA adapter the fused node can compute, or None (peft's forward then runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged or torch.is_autocast_enabled():
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    [name] = active
    if name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    base = layer.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return name


@functools.cache
def fused_linear4bit() -> type:
    """peft's 4-bit LoRA layer class with the fused forward (isinstance checks against peft's class still hold)."""
    from peft.tuners.lora.bnb import Linear4bit

    return type("FusedLinear4bit", (Linear4bit,), {
        "forward": fused_forward, "peft_forward": Linear4bit.forward, "__module__": __name__,
        "__doc__": "peft's Linear4bit whose plain LoRA forward is one node (phi3local.model.fused_lora)."})


def use_fused_lora(model: torch.nn.Module) -> int:
    """Give every peft 4-bit LoRA layer of `model` the fused forward; returns how many layers changed."""
    from peft.tuners.lora.bnb import Linear4bit

    changed = 0
    for module in model.modules():
        if type(module) is Linear4bit:
            module.__class__ = fused_linear4bit()
            changed += 1
    return changed
