"""Memory-lean cross-entropy: logits are computed a chunk of tokens at a time and never kept.

A full `[tokens x 32064]` fp32 logits tensor for 8k tokens is 1 GiB, plus as much again for its
gradient. Here only the positions that are trained are projected through `lm_head`, in chunks,
and each chunk is recomputed in backward (activation checkpointing), so peak extra memory is one
chunk's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
