"""Memory-lean cross-entropy: logits are computed a chunk of tokens at a time and never kept.

A full `[tokens x 32064]` fp32 logits tensor for 8k tokens is 1 GiB, plus as much again for its
gradient, and Phi-4-mini's 200064-row vocabulary makes that 6x larger. Here only the positions that
are trained are projected through `lm_head`, a chunk at a time, and each chunk's gradient is worked out
in the forward pass while its logits exist (softmax minus one-hot, times the lm_head weight): backward
only scales the stored gradient, so no chunk is projected twice and the peak extra memory is one
chunk's logits. When lm_head itself is trained (lora.modules_to_save) its weight gradient is summed
chunk by chunk in the same pass. An lm_head that is not a plain linear layer (LoRA-adapted, 4-bit)
takes the older path: each chunk under activation checkpointing, recomputed in backward.

`chunked_token_logprobs` is the same head for preference losses, which need each target token's log-prob
(summed per answer by the caller) rather than one summed loss: their gradient per token is a weight the loss
decides after the forward, so with a frozen lm_head the forward keeps d log p / d hidden per token (one
hidden-width row each, as the cross-entropy keeps its gradient) and backward scales it; a trained lm_head
recomputes each chunk's logits in backward to sum its weight gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) with its gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, want_grads: bool, count_correct: bool):
        grad_hidden = torch.empty_like(hidden) if want_grads and hidden.requires_grad else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if want_grads and weight.requires_grad else None)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, targets.numel(), chunk_size):
            h = hidden[start : start + chunk_size].to(weight.dtype)
            t = targets[start : start + chunk_size]
            logits = (h @ weight.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            loss_sum += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if count_correct:
                correct += (logits.argmax(-1) == t).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d CE / d logits = softmax - one_hot, built in place over the logits.
            probs = logits.sub_(log_norm[:, None]).exp_()
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
            d_logits = probs.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = (d_logits @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(d_logits.t().float(), h.float())
            del logits, probs, d_logits
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = list(ctx.saved_tensors)
        # A 0-dim fp32 factor keeps each stored gradient's own dtype.
        grad_hidden = saved.pop(0) * grad_loss if ctx.has[0] else None
        grad_weight = (saved.pop(0) * grad_loss).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def plain_linear(lm_head: torch.nn.Module) -> torch.nn.Linear | None:
    """The nn.Linear that lm_head computes with (peft's trainable copy when it is in modules_to_save),
    or None when it is something else (LoRA-adapted, 4-bit, with a bias)."""
    module = lm_head
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, torch.nn.ModuleDict) and hasattr(module, "original_module"):  # ModulesToSaveWrapper
        active = module.active_adapter
        active = active[0] if isinstance(active, (list, tuple)) and active else active
        module = copies[active] if not module.disable_adapters and active in copies else module.original_module
    if type(module) is torch.nn.Linear and module.bias is None:
        return module
    return None


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


@torch.no_grad()
def _chunk_correct(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    return (lm_head(hidden).argmax(-1) == targets).sum()


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_head: torch.nn.Module,
    chunk_size: int = 1024,
    count_correct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of token cross-entropies over positions whose target is not -100.

    hidden: [..., H] final hidden states; targets: [...] next-token ids (already shifted), -100 = untrained.
    Returns (loss_sum, correct_count or None). Divide by the trained-token count yourself, so that
    gradient accumulation can normalise by the tokens of the whole optimizer step.
    """
    keep = targets.reshape(-1) != -100
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets.reshape(-1)[keep]
    linear = plain_linear(lm_head)
    if linear is not None:
        loss_sum, correct = _LinearCrossEntropy.apply(hidden, linear.weight, targets, chunk_size,
                                                      torch.is_grad_enabled(), count_correct)
        return loss_sum, correct if count_correct else None
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device) if count_correct else None
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            loss_sum = loss_sum + checkpoint(_chunk_loss, h, t, lm_head, use_reentrant=False)
        else:
            loss_sum = loss_sum + _chunk_loss(h, t, lm_head)
        if count_correct:
            correct += _chunk_correct(h, t, lm_head)
    return loss_sum, correct


class _LinearTokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden_i @ weight.T)[target_i] per row, chunk by chunk, never all the logits at once."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, want_grads: bool):
        out = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
        need_weight = want_grads and weight.requires_grad
        # Frozen head: d logp_i / d hidden_i = weight[t_i] - softmax_i @ weight, kept from the forward.
        keep = want_grads and hidden.requires_grad and not need_weight
        unit = torch.empty_like(hidden) if keep else None
        for start in range(0, targets.numel(), chunk_size):
            h = hidden[start : start + chunk_size].to(weight.dtype)
            t = targets[start : start + chunk_size]
            logits = (h @ weight.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            out[start : start + chunk_size] = logits.gather(1, t[:, None]).squeeze(1) - log_norm
            if unit is not None:
                d_logits = logits.sub_(log_norm[:, None]).exp_().neg_()  # one_hot - softmax, in place
                d_logits[torch.arange(t.numel(), device=t.device), t] += 1.0
                unit[start : start + chunk_size] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits
        ctx.chunk_size, ctx.keep, ctx.need_weight = chunk_size, keep, need_weight
        ctx.need_hidden = want_grads and hidden.requires_grad
        if keep:
            ctx.save_for_backward(unit)
        elif want_grads:
            ctx.save_for_backward(hidden, weight, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.keep:
            (unit,) = ctx.saved_tensors
            return (unit * grad_out[:, None].to(unit.dtype)), None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.need_weight else None
        for start in range(0, targets.numel(), ctx.chunk_size):
            h = hidden[start : start + ctx.chunk_size].to(weight.dtype)
            t = targets[start : start + ctx.chunk_size]
            g = grad_out[start : start + ctx.chunk_size].float()
            logits = (h @ weight.t()).float()
            # d out_i / d logits_i = one_hot(t_i) - softmax_i, scaled by the upstream gradient.
            d_logits = torch.softmax(logits, dim=-1).mul_(-g[:, None])
            d_logits[torch.arange(t.numel(), device=t.device), t] += g
            del logits
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk_size] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(d_logits.t(), h.float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_head: torch.nn.Module,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log p(target) of every position whose target is not -100, in order of position ([kept] fp32).

    hidden: [..., H] final hidden states; targets: [...] next-token ids (already shifted), -100 = not scored.
    Gradients flow to hidden (and to lm_head's weight when it is trained) without [tokens x vocab] logits
    ever existing beyond one chunk.
    """
    keep = targets.reshape(-1) != -100
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets.reshape(-1)[keep]
    linear = plain_linear(lm_head)
    if linear is not None:
        return _LinearTokenLogprobs.apply(hidden, linear.weight, targets, chunk_size, torch.is_grad_enabled())
    parts = []
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logprobs, h, t, lm_head, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(h, t, lm_head))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
