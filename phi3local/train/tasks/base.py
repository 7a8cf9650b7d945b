"""The protocol the training loop calls a task through, and the token documents (and the task code around them)
two of the tasks share.

A task is the part of training that depends on what is learned: how a prepared split becomes documents,
how a planned row of documents becomes tensors, the loss of one micro-batch and what it is averaged over,
the metrics logged at a step, evaluation, and greedy samples. The loop owns everything else (epoch plans,
gradient accumulation over micro-batches and ranks, clipping, the optimizer, checkpoints, logging sinks).

Units: a micro-batch's loss is a *sum* over its units (trained tokens, examples or pairs); the loop divides
every micro-batch's sum by the units of the whole optimizer step (over all ranks), so accumulation equals one
big batch. A task's `stats` are sums over the same units (0-dim tensors), added up by the loop over the step's
micro-batches and ranks and turned into the step's metrics by `step_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from phi3local.model.flops import StepFlops, lora_step_flops
from phi3local.model.tokenizer import stop_token_ids


@dataclass
class Documents:
    """A prepared split held in memory as plain lists: tokenised once, never in the loop."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    sources: list[str]
    class_labels: list[int] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def from_dataset(cls, ds) -> Documents:
        # Plain Python lists once: datasets' lazy columns would read Arrow on every index in the loop.
        data = ds.to_dict()
        n = len(data["input_ids"])
        return cls(
            input_ids=data["input_ids"],
            labels=data.get("labels") or [list(x) for x in data["input_ids"]],
            sources=data.get("source") or [str(i) for i in range(n)],
            class_labels=data.get("label"),
        )


class Task(Protocol):
    name: str
    # Several documents (pairs) may share a row when data.packing is on; false: one per row, padded.
    packs: bool
    # The adapter is a chat model (merge, export, chat, serve): a generation_config with every stop id and
    # greedy sample answers at the end of training.
    generates: bool
    # The stats step_metrics turns into a logged step's metrics; the same on every rank ((): none).
    metric_names: tuple[str, ...]

    def documents(self, ds) -> Any:
        """The prepared split (a datasets.Dataset) as documents with `lengths` (tokens per planned item, what
        rows are packed by), `sources` (file:line per item) and `len()`."""

    def check(self, docs, tokenizer) -> None:
        """Raise TrainingError when the documents leave nothing to learn."""

    def prepare(self, model, docs, batches: Iterable, *, chunk_size: int) -> None:
        """Once the model is loaded, before training: work on `docs` that needs the model (`batches`: all of them,
        collated, on the model's device). Preference: the precomputed reference log-probs; the others: nothing."""

    def row_capacity(self, max_seq_len: int) -> int:
        """Tokens a planned row may hold (data.max_seq_len is per sequence; a pair's row holds two)."""

    def collate(self, rows: list[list[int]], docs, pad_id: int, *, position_limit: int | None = None,
                pad_to_multiple_of: int = 1, max_width: int | None = None):
        """The tensors of one micro-batch (rows of item indices); has `.to(device)`, `doc_ids`, `real_tokens`,
        `padded_tokens`, `trained_tokens`."""

    def units(self, batch) -> int:
        """What the loss is averaged over in this micro-batch."""

    def trained_tokens(self, batch) -> int:
        """Tokens counted as trained in throughput (tokens/s, MFU)."""

    def loss(self, model, batch, *, chunk_size: int,
             count_correct: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the micro-batch's losses over its units, stats: 0-dim sums over the same units)."""

    def step_metrics(self, stats: dict[str, float], units: int) -> dict[str, float]:
        """The metrics of a logged step from its stats summed over micro-batches and ranks."""

    def evaluate(self, model, batches: Iterable, world, *, chunk_size: int) -> dict:
        """Validation metrics over `batches` (this rank's share, on the model's device), combined over ranks;
        always `val_loss` (the loop keeps the best step by it)."""

    def samples(self, model, docs, tokenizer, count: int, max_new_tokens: int) -> list[dict]:
        """Greedy answers to the first `count` validation prompts: [{prompt, expected, generated}]."""

    def step_flops(self, config, docs, lora) -> Any:
        """The matmul FLOPs of a step per real and per trained token (`phi3local.model.flops.StepFlops`, MFU),
        for the training documents `docs`."""

    def summary_rows(self, final: dict) -> list[tuple[str, str]]:
        """Extra rows of the run's summary table from the final evaluation."""


class DocumentTask:
    """What the tasks trained on token Documents (causal_lm, classification) share: one row per planned item of
    at most max_seq_len tokens, nothing to prepare with the model, no step metrics of their own, and the FLOPs
    of their documents' lengths. A subclass sets `name`, `packs`, `generates` and the rest of Task."""

    name: str
    metric_names: tuple[str, ...] = ()

    def __init__(self, recipe=None):
        self.recipe = recipe

    def documents(self, ds) -> Documents:
        return Documents.from_dataset(ds)

    def prepare(self, model, docs, batches, *, chunk_size: int) -> None:
        pass

    def row_capacity(self, max_seq_len: int) -> int:
        return max_seq_len

    def step_metrics(self, stats: dict, units: int) -> dict:
        return {}

    def step_flops(self, config, docs: Documents, lora) -> StepFlops:
        return lora_step_flops(config, token_weighted_length(docs.lengths), lora.target_modules if lora.enabled else [],
                               lora.r, lora.modules_to_save, self.name)


def val_loss_metrics(loss_sum: float, units: float, correct: float) -> dict[str, float]:
    """Validation loss per unit, perplexity and accuracy from sums over the units (the perplexity of a loss over
    50 is e^50: math.exp would overflow on a diverged run)."""
    loss = loss_sum / max(units, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_accuracy": correct / max(units, 1)}


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[tuple[list[int], list[int]]], max_new_tokens: int) -> list[dict]:
    """Greedy answers to (prompt ids, expected answer ids) pairs, decoded; the model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    samples = []
    for prompt_ids, expected in prompts:
        prompt = torch.tensor([prompt_ids], device=device)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id, use_cache=True)
        samples.append({
            "prompt": tokenizer.decode(prompt_ids),
            "expected": tokenizer.decode(expected),
            "generated": tokenizer.decode(out[0, len(prompt_ids):].tolist()),
        })
    model.train(was_training)
    return samples


def token_weighted_length(lengths: list[int]) -> float:
    """Causal attention per token grows with its own document's length: the token-weighted mean length."""
    total = float(sum(lengths))
    return sum(float(n) * n for n in lengths) / max(total, 1.0)


def add_stats(total: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """total += stats, key by key (detached): the loop's running sums of a step's stats (0-dim ones only)."""
    for key, value in stats.items():
        if value is None or value.dim() != 0:
            continue
        value = value.detach()
        total[key] = total[key] + value if key in total else value
    return total
