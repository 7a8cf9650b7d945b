"""Turn prepared documents into micro-batches: packing without cross-document attention, or padding.

Packed rows hold several documents back to back; `position_ids` restart at 0 for each document,
from which transformers builds a block-diagonal causal mask for SDPA/eager, and flash-attn uses its
variable-length kernel on the micro-batch flattened into one row (`rows_for_attention` below: transformers
detects packed documents for flash-attn only in a single row), so attention never crosses documents.
Targets are shifted inside each document, so no document is trained to predict the next one's first token.
Right padding needs no attention mask: with a causal mask, real tokens never see the pads after them.
`collate(pad_to_multiple_of=m)` rounds a micro-batch's width up to a multiple of m with more such pads
(untrained, unseen by real tokens), so the kernels meet fewer distinct shapes; every loss stays the same.

LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): transformers picks the rotary factor set per forward call from
the largest position id in the whole batch: long factors when it is >= original_max_position_embeddings.
With `long_from` set to that switch point, `plan_epoch` never puts a document longer than it in a row or a
micro-batch with shorter ones, and `collate(position_limit=...)` keeps the pads of a batch of short documents
below the switch, so every document trains on the factor set a fresh forward of it gets at inference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L] next-token ids, -100 where untrained
    attention_mask: torch.Tensor | None  # only for classification
    doc_ids: list[int]
    trained_tokens: int
    real_tokens: int  # non-padding tokens
    padded_tokens: int  # B * L, what the model processes
    class_labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> MicroBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return MicroBatch(move(self.input_ids), move(self.position_ids), move(self.targets),
                          move(self.attention_mask), self.doc_ids, self.trained_tokens,
                          self.real_tokens, self.padded_tokens, move(self.class_labels))


def pack_rows(lengths: list[int], order: list[int], max_seq_len: int) -> list[list[int]]:
    """First-fit packing of documents (in `order`) into rows of at most max_seq_len tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for doc in order:
        n = lengths[doc]
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(doc)
                room[i] -= n
                break
        else:
            rows.append([doc])
            room.append(max_seq_len - n)
    return rows


def plan_epoch(
    lengths: list[int], max_seq_len: int, micro_batch_size: int, packing: bool, seed: int, epoch: int,
    *, long_from: int | None = None,
) -> list[list[list[int]]]:
    """The micro-batches of one epoch, each a list of rows, each row a list of document indices.

    Deterministic in (seed, epoch), which is what makes resuming mid-epoch exact.
    long_from: a LongRoPE switch point (original_max_position_embeddings). Documents longer than it get a row
    of their own and share micro-batches only with each other; the others are planned as without it (the
    same plan when no document is that long). None: no such split.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if long_from is None:
        long_rows: list[list[int]] = []
    else:
        long_docs = sorted((d for d in order if lengths[d] > long_from), key=lambda d: lengths[d])
        order = [d for d in order if lengths[d] <= long_from]
        long_rows = [[d] for d in long_docs]  # sorted by length: less padding in each long micro-batch
    batches = _plan_rows(lengths, order, max_seq_len, micro_batch_size, packing)
    batches += [long_rows[i : i + micro_batch_size] for i in range(0, len(long_rows), micro_batch_size)]
    rng.shuffle(batches)
    return batches


def _plan_rows(lengths: list[int], order: list[int], max_seq_len: int, micro_batch_size: int,
               packing: bool) -> list[list[list[int]]]:
    if packing:
        rows = pack_rows(lengths, order, max_seq_len)
        # Similar-length rows together: the last, fuller rows would otherwise pad short ones.
        rows.sort(key=lambda r: -sum(lengths[d] for d in r))
    else:
        # Length-grouped padding: sort within windows of 32 micro-batches, keep randomness across them.
        window = micro_batch_size * 32
        rows = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda d: lengths[d])
            rows.extend([d] for d in chunk)
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


# data.pad_to_multiple_of: auto per device type (config.py says why each).
AUTO_PAD_TO_MULTIPLE_OF = {"cuda": 8, "cpu": 1}


def resolved_pad_to_multiple_of(value: int | str, device_type: str) -> int:
    """data.pad_to_multiple_of with `auto` decided for a device type ("cuda", "cpu", ...)."""
    return AUTO_PAD_TO_MULTIPLE_OF.get(device_type, 1) if value == "auto" else int(value)


def padded_width(width: int, pad_to_multiple_of: int, max_width: int | None = None) -> int:
    """`width` rounded up to a multiple of pad_to_multiple_of, capped at max_width (never below `width`)."""
    rounded = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return max(width, min(rounded, max_width)) if max_width is not None else rounded


def collate(
    rows: list[list[int]],
    input_ids: list[list[int]],
    labels: list[list[int]],
    pad_id: int,
    class_labels: list[int] | None = None,
    *,
    position_limit: int | None = None,
    pad_to_multiple_of: int = 1,
    max_width: int | None = None,
) -> MicroBatch:
    """Build tensors for one micro-batch from per-document token and label lists.

    position_limit: a LongRoPE switch point. When no document of the batch is longer than it, the pads'
    positions wrap to 0 before reaching it, so padding never moves the batch onto the long factors.
    pad_to_multiple_of: the width is rounded up to a multiple of it, but not beyond max_width (the model's
    positions) unless the longest row is itself longer.
    """
    width = padded_width(max(sum(len(input_ids[d]) for d in row) for row in rows), pad_to_multiple_of, max_width)
    batch = len(rows)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    pos = torch.zeros((batch, width), dtype=torch.long)
    tgt = torch.full((batch, width), -100, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long) if class_labels is not None else None
    doc_ids, real, trained = [], 0, 0
    all_short = position_limit is not None and all(len(input_ids[d]) <= position_limit for r in rows for d in r)
    for b, row in enumerate(rows):
        at = 0
        for d in row:
            toks, labs = input_ids[d], labels[d]
            n = len(toks)
            ids[b, at : at + n] = torch.as_tensor(toks)
            pos[b, at : at + n] = torch.arange(n)
            shifted = torch.as_tensor(labs[1:] + [-100])
            tgt[b, at : at + n] = shifted
            trained += int((shifted != -100).sum())
            at += n
            doc_ids.append(d)
        # Pads continue the last document's positions, so they form no new segment (no mask work).
        if at < width:
            start = int(pos[b, at - 1]) + 1 if at else 0
            pos[b, at:] = torch.arange(start, start + width - at)
            if all_short:  # a new (pads-only) segment at the wrap: no real token attends to it
                pos[b, at:] %= position_limit
        if mask is not None:
            mask[b, :at] = 1
        real += at
    cls = torch.as_tensor([class_labels[row[0]] for row in rows]) if class_labels is not None else None
    return MicroBatch(ids, pos, tgt, mask, doc_ids, trained, real, batch * width, cls)


def rows_for_attention(batch, attn_implementation: str, *extra: torch.Tensor):
    """input_ids, position_ids and targets (and any `extra` [B, L] tensors) as the attention kernel needs them to
    keep documents apart.

    transformers runs flash-attention's variable-length kernel (documents found from position_ids) only for
    a single row: in a [B, L] batch, packed documents would attend to each other. Rows start at position 0
    and pads continue a document's positions, so the batch flattened into one row keeps every boundary.
    SDPA and eager build their block-diagonal mask per row and take the batch as it is.
    """
    tensors = (batch.input_ids, batch.position_ids, batch.targets, *extra)
    if attn_implementation == "flash_attention_2" and batch.input_ids.shape[0] > 1:
        return tuple(t.reshape(1, -1) for t in tensors)
    return tensors
