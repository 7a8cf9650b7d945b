"""Selective activation checkpointing: what a checkpointed decoder layer's recomputation may skip.

Full checkpointing keeps only each decoder layer's input and reruns the whole layer during backward: the
frozen matmuls (4-bit: dequantise + matmul), attention, and the cheap rest. Selective checkpointing
(torch.utils.checkpoint's `context_fn` with `create_selective_checkpoint_contexts`, PyTorch's own) keeps the
outputs of the expensive ops from the forward and reruns only the cheap ones: norms, RoPE, the MLP's
activation, residual sums and the LoRA paths (their matmuls have the adapter's rank as one dimension).
The recomputation then runs the same ops on the same inputs minus the kept ones, so the gradients equal full
checkpointing's (tests/test_selective_checkpointing.py). What the kept outputs cost per token and layer:
`phi3local.train.memory_plan.selective_kept_per_token_per_layer`.
"""

from __future__ import annotations

from functools import partial

from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Kept by qualified op name (a package that is not installed simply never shows its op).
KEPT_OPS = frozenset({
    "bitsandbytes::gemm_4bit",  # a frozen NF4 linear layer: dequantise + matmul in one op (bitsandbytes >= 0.49)
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward",
})
# Plain matmuls (16-bit frozen weights) are kept unless one dimension is at most LOW_RANK: the LoRA paths,
# cheap to redo and whose B output is as wide as the frozen layer's. Not bmm: eager attention's scores
# (tokens x tokens per head) go through it, and the memory plan counts no such thing.
DENSE_MATMULS = frozenset({"aten::mm", "aten::addmm"})
LOW_RANK = 64


def keeps(op_name: str, args: tuple) -> bool:
    """Whether the op's output is kept from the forward rather than recomputed."""
    if op_name in KEPT_OPS:
        return True
    if op_name in DENSE_MATMULS:
        a, b = (args[1], args[2]) if op_name == "aten::addmm" else (args[0], args[1])
        return min(a.shape[-1], b.shape[-1]) > LOW_RANK
    return False


def _policy(ctx, func, *args, **kwargs):
    name = getattr(getattr(func, "_schema", None), "name", "")
    return CheckpointPolicy.MUST_SAVE if keeps(name, args) else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(selective: bool) -> dict:
    """The keyword arguments of torch.utils.checkpoint.checkpoint for the model's decoder layers."""
    kwargs: dict = {"use_reentrant": False}  # non-reentrant: no requires_grad needed on the embedding output
    if selective:
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _policy)
    return kwargs
