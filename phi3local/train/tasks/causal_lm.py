"""task: causal_lm. Next-token cross-entropy on the trained (assistant) tokens of packed chats.

Batches: `phi3local.train.batching.collate` (several documents per row, positions restarting per document).
Loss: `phi3local.train.loss.chunked_cross_entropy` on the trained positions only, summed; averaged over the
optimizer step's trained tokens. Evaluation: loss, perplexity and next-token accuracy on trained tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from phi3local.model.load import base_causal_lm
from phi3local.train.batching import collate, rows_for_attention
from phi3local.train.loss import chunked_cross_entropy
from phi3local.train.tasks.base import Documents, DocumentTask, greedy_samples, val_loss_metrics

# A share of trained tokens below this almost always means a broken template or mask.
MIN_TRAINED_SHARE = 0.002


class CausalLM(DocumentTask):
    name = "causal_lm"
    packs = True
    generates = True

    def check(self, docs: Documents, tokenizer) -> None:
        from phi3local.train.recipe import TrainingError

        total = sum(len(x) for x in docs.input_ids)
        trained = sum(sum(1 for t in lab if t != -100) for lab in docs.labels)
        if total and trained / total >= MIN_TRAINED_SHARE:
            return
        example = docs.input_ids[0] if docs.input_ids else []
        shown = tokenizer.decode(example[:200]) if example else "(no documents)"
        raise TrainingError(
            f"only {trained} of {total} tokens ({100 * trained / max(total, 1):.3f}%) are trained: the label mask "
            f"leaves almost nothing to learn. Check the data format and chat template. First example:\n{shown}"
        )

    def collate(self, rows, docs: Documents, pad_id: int, **widths):
        return collate(rows, docs.input_ids, docs.labels, pad_id, None, **widths)

    def units(self, batch) -> int:
        return batch.trained_tokens

    def trained_tokens(self, batch) -> int:
        return batch.trained_tokens

    def loss(self, model, batch, *, chunk_size: int, count_correct: bool = False):
        base = base_causal_lm(model)
        ids, positions, targets = rows_for_attention(batch, base.config._attn_implementation)
        hidden = base.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        loss_sum, correct = chunked_cross_entropy(hidden, targets, base.get_output_embeddings(), chunk_size,
                                                  count_correct)
        return loss_sum, ({"correct": correct} if count_correct else {})

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable, world, *, chunk_size: int) -> dict:
        loss_sum, units, correct = 0.0, 0, 0
        for batch in batches:
            ls, stats = self.loss(model, batch, chunk_size=chunk_size, count_correct=True)
            loss_sum += float(ls)
            correct += int(stats["correct"])
            units += self.units(batch)
        return val_loss_metrics(*world.sum_floats([loss_sum, units, correct]))

    def samples(self, model, docs: Documents, tokenizer, count: int, max_new_tokens: int) -> list[dict]:
        """Greedy answers to the first validation prompts (everything before the first trained token)."""
        prompts = []
        for ids, labels in list(zip(docs.input_ids, docs.labels))[:count]:
            first = next((i for i, t in enumerate(labels) if t != -100), None)
            if first:
                prompts.append((ids[:first], [t for t in labels if t != -100]))
        return greedy_samples(model, tokenizer, prompts, max_new_tokens)

    def summary_rows(self, final: dict) -> list[tuple[str, str]]:
        return []
