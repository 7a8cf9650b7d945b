"""SDPA attention that computes a packed row's documents one by one.

A packed row holds several documents whose `position_ids` restart at 0. With SDPA, transformers keeps them apart
with a block-diagonal mask over the whole row, and the kernel then computes every query against every key of the
row (an explicit mask also turns off the causal shortcut): for a 1,024-token row of ~180-token chats, about
20 times the products the documents need. `document_attention` instead runs SDPA once per document with
`is_causal=True`, on the document's own queries and keys, and concatenates the outputs: the same attention (the
mask allowed exactly these pairs), a fraction of the work. flash-attn's variable-length kernel does the same on
CUDA (`phi3local.train.batching.rows_for_attention`); this is the path for SDPA (CPU, or CUDA without flash-attn).

It applies only to training forwards (the module in train mode, as phi3local's loop calls the model: position_ids,
no padding mask, no cache) where some row holds several documents, none longer than the model's sliding window;
everything else (unpacked rows, evaluation, generation with its cache and padding) is transformers' own SDPA path.
Under selective checkpointing each document's attention output is kept as the whole row's was
(`phi3local.model.selective_checkpointing`). Losses and gradients equal the masked path's within float rounding
(tests/test_document_attention.py).
"""

from __future__ import annotations

import weakref

import torch

NAME = "sdpa_documents"  # the attention implementation's name in transformers' registry


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' attention interface: query [B, H, L, D], key/value [B, H_kv, L, D] -> ([B, L, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _document_bounds(module, query, key, kwargs)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    grouped = query.shape[1] != key.shape[1]
    rows = []
    for b, row in enumerate(bounds):
        parts = [torch.nn.functional.scaled_dot_product_attention(
            query[b:b + 1, :, start:end], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=grouped) for start, end in row]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _document_bounds(module, query, key, kwargs: dict) -> list[list[tuple[int, int]]] | None:
    """Each row's documents as (start, end) column ranges, or None where transformers' own SDPA path must run."""
    positions = kwargs.get("position_ids")
    if (not module.training or positions is None or positions.dim() != 2 or positions.shape[0] != query.shape[0]
            or query.shape[2] != key.shape[2] or positions.shape[1] != query.shape[2]):
        return None
    bounds = _bounds_of(positions)
    if bounds is None:
        return None
    window = kwargs.get("sliding_window")
    if window and any(end - start > window for row in bounds for start, end in row):
        return None  # a document longer than the sliding window: the window's mask applies
    return bounds


def use_document_attention(model: torch.nn.Module) -> None:
    """Switch an SDPA model to `document_attention` (registered with transformers under NAME, with SDPA's mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, document_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


# Every decoder layer of one forward gets the same position_ids tensor: its documents are found once (on CUDA
# each search is a host sync) and reused while that tensor, unchanged, is the one passed.
_last: tuple[weakref.ref, int, list | None] | None = None


def _bounds_of(positions: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Each row's documents as (start, end) ranges from where positions restart at 0; None for a row that does not
    start a document (padding on the left) or one document per row."""
    global _last
    if _last is not None and _last[0]() is positions and _last[1] == positions._version:
        return _last[2]
    width = positions.shape[1]
    starts = positions == 0
    bounds = None
    if bool(starts[:, 0].all()) and int(starts.sum()) > positions.shape[0]:
        bounds = []
        for row in starts:
            first = row.nonzero().flatten().tolist()
            bounds.append(list(zip(first, [*first[1:], width])))
    _last = (weakref.ref(positions), positions._version, bounds)
    return bounds
