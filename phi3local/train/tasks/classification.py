"""task: classification. A `*ForSequenceClassification` model: one label per example from its last real token.

Batches: one example per row (never packed: the head reads each row's last real token), right-padded with an
attention mask. Loss: cross-entropy of the head's logits, summed; averaged over the optimizer step's examples.
Evaluation: loss, accuracy, macro-F1 and the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from phi3local.train.batching import collate
from phi3local.train.tasks.base import Documents, DocumentTask, val_loss_metrics


class Classification(DocumentTask):
    name = "classification"
    packs = False
    generates = False

    def check(self, docs: Documents, tokenizer) -> None:
        """Every token of an example feeds its label: nothing to check in a mask."""

    def collate(self, rows, docs: Documents, pad_id: int, **widths):
        return collate(rows, docs.input_ids, docs.labels, pad_id, docs.class_labels, **widths)

    def units(self, batch) -> int:
        return len(batch.doc_ids)

    def trained_tokens(self, batch) -> int:
        return batch.real_tokens  # an example trains on its whole text (one label from all its tokens)

    def forward(self, model, batch) -> torch.Tensor:
        """The head's fp32 logits, [examples, labels]."""
        # collate's positions, not the model's arange(width): its pads stay below a LongRoPE switch.
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits.float()

    def loss(self, model, batch, *, chunk_size: int = 0, count_correct: bool = False):
        logits = self.forward(model, batch)
        loss_sum = F.cross_entropy(logits, batch.class_labels, reduction="sum")
        # The logits ride along (not a sum: the loop adds up only 0-dim stats) for evaluation's predictions.
        return loss_sum, {"correct": (logits.argmax(-1) == batch.class_labels).sum(), "logits": logits.detach()}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable, world, *, chunk_size: int = 0) -> dict:
        loss_sum, units, correct = 0.0, 0, 0
        predictions, truths = [], []
        for batch in batches:
            ls, stats = self.loss(model, batch, count_correct=True)
            loss_sum += float(ls)
            correct += int(stats["correct"])
            units += self.units(batch)
            predictions += stats["logits"].argmax(-1).tolist()
            truths += batch.class_labels.tolist()
        loss_sum, units, correct = world.sum_floats([loss_sum, units, correct])
        predictions, truths = world.gather_lists(predictions), world.gather_lists(truths)
        num_labels = len(self.recipe.model.labels) if self.recipe is not None else max(truths + predictions) + 1
        return {**val_loss_metrics(loss_sum, units, correct), **classification_metrics(truths, predictions, num_labels)}

    def samples(self, model, docs, tokenizer, count: int, max_new_tokens: int) -> list[dict]:
        return []

    def summary_rows(self, final: dict) -> list[tuple[str, str]]:
        if "val_macro_f1" not in final:
            return []
        return [("val accuracy / macro-F1", f"{final['val_accuracy']:.3f} / {final['val_macro_f1']:.3f}")]


def classification_metrics(truths: list[int], predictions: list[int], num_labels: int) -> dict:
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(truths, predictions):
        confusion[t][p] += 1
    f1s = []
    for k in range(num_labels):
        tp = confusion[k][k]
        fp = sum(confusion[i][k] for i in range(num_labels)) - tp
        fn = sum(confusion[k]) - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"val_macro_f1": sum(f1s) / num_labels, "confusion_matrix": confusion}
