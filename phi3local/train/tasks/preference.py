"""task: preference. DPO, IPO, ORPO or SimPO (recipe.preference.loss) on pairs of a preferred and a rejected answer.

Documents: one prepared row per pair (`phi3local.data.preference`): `prompt_ids` (the rendered prompt with the
generation prompt), `chosen_ids` and `rejected_ids` (answer tokens only, ending with the end-of-turn token).

Batches: a pair is planned as one item of 2 x prompt + both answers tokens; collated, it becomes two documents
of one row, prompt+chosen then prompt+rejected, each with positions from 0, so (as in causal-LM packing) the
block-diagonal mask keeps them apart: one forward scores both. With data.packing several pairs share a row
the same way. A row may hold 2 x data.max_seq_len tokens (data.max_seq_len bounds one sequence: the prompt
and the longer answer). Only answer tokens have targets.

Log-probs: `phi3local.train.loss.chunked_token_logprobs` on the answer positions only (never [tokens x vocab]
logits), summed per answer. The reference (dpo, ipo; `reference_model`), under torch.no_grad, in the same
micro-batch, before the policy's forward: with a fresh adapter, the same model with its adapter disabled (peft's
`disable_adapter()`, the 4-bit base with no LoRA and the original modules_to_save); when the run continues an
adapter (model.adapter, e.g. an SFT run's), that adapter as loaded, a frozen second peft adapter on the same 4-bit
base (`phi3local.model.load.reference_adapter`), while the trained adapter starts from the same weights. orpo and
simpo have none. Either way the policy is the reference at step 0, so the dpo loss starts at ln 2 with every
reward 0 (with lora.dropout > 0 the first training step's loss is near ln 2: dropout acts on the policy only).

Loss: `phi3local.train.preference_loss.preference_loss` per pair, summed; averaged over the optimizer step's
pairs. Metrics (TRL's names, means over the step's pairs): rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (and nll_loss, log_odds_* where the loss has
them); evaluation gives the same with a `val_` prefix and val_loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from phi3local.model.flops import StepFlops, lora_step_flops
from phi3local.model.load import base_causal_lm, has_reference_adapter, reference_adapter
from phi3local.train.batching import MicroBatch, collate, rows_for_attention
from phi3local.train.loss import chunked_token_logprobs
from phi3local.train.preference_loss import default_sft_weight, preference_loss, uses_reference
from phi3local.train.tasks.base import greedy_samples, token_weighted_length

# The metrics of every preference loss (preference_loss's names, as TRL logs them).
BASE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


@dataclass
class Pairs:
    """A prepared split of preference pairs held in memory as plain lists."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    sources: list[str]
    # preference.precompute_reference: [pairs, 2] reference log-probs (chosen, rejected), set by Preference.prepare.
    reference: torch.Tensor | None = None

    @property
    def lengths(self) -> list[int]:
        """Tokens of each pair's two sequences together (what a row holds)."""
        return [2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)]

    @property
    def sequence_lengths(self) -> list[int]:
        """Tokens of every sequence (prompt + one answer), chosen then rejected per pair."""
        return [len(p) + len(a) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids) for a in (c, r)]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def from_dataset(cls, ds) -> Pairs:
        data = ds.to_dict()
        n = len(data["prompt_ids"])
        return cls(prompt_ids=data["prompt_ids"], chosen_ids=data["chosen_ids"], rejected_ids=data["rejected_ids"],
                   sources=data.get("source") or [str(i) for i in range(n)])


@dataclass
class PairBatch:
    """One micro-batch of pairs: the sequences' tensors (a MicroBatch whose documents are the 2 x pairs
    sequences, chosen then rejected per pair) and each answer's length."""

    tokens: MicroBatch
    doc_ids: list[int]  # the pairs, in order
    chosen_lengths: torch.Tensor  # [pairs]
    rejected_lengths: torch.Tensor
    reference: torch.Tensor | None = None  # [2 x pairs] precomputed reference log-probs, as answer_logps orders them

    @property
    def trained_tokens(self) -> int:
        return self.tokens.trained_tokens

    @property
    def real_tokens(self) -> int:
        return self.tokens.real_tokens

    @property
    def padded_tokens(self) -> int:
        return self.tokens.padded_tokens

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.tokens.to(device), self.doc_ids, self.chosen_lengths.to(device),
                         self.rejected_lengths.to(device), None if self.reference is None else self.reference.to(device))


def collate_pairs(rows: list[list[int]], pairs: Pairs, pad_id: int, **widths) -> PairBatch:
    """Each pair of `rows` as two documents of its row (prompt+chosen, prompt+rejected), positions from 0 in each,
    targets on the answer tokens only (batching.collate does the packing, padding and LongRoPE limit)."""
    ids, labels, seq_rows, doc_ids = [], [], [], []
    for row in rows:
        seq_row = []
        for d in row:
            prompt = pairs.prompt_ids[d]
            for answer in (pairs.chosen_ids[d], pairs.rejected_ids[d]):
                seq_row.append(len(ids))
                ids.append(prompt + answer)
                labels.append([-100] * len(prompt) + answer)
            doc_ids.append(d)
        seq_rows.append(seq_row)
    tokens = collate(seq_rows, ids, labels, pad_id, None, **widths)
    tokens.doc_ids = doc_ids
    reference = None if pairs.reference is None else pairs.reference[doc_ids].reshape(-1)
    return PairBatch(tokens, doc_ids, torch.tensor([len(pairs.chosen_ids[d]) for d in doc_ids]),
                     torch.tensor([len(pairs.rejected_ids[d]) for d in doc_ids]), reference)


def answer_logps(model, batch: PairBatch, chunk_size: int) -> torch.Tensor:
    """[2 x pairs] summed log-probs of each answer (chosen, rejected, chosen, ... in pair order) in one forward."""
    base = base_causal_lm(model)
    ids, positions, targets = rows_for_attention(batch.tokens, base.config._attn_implementation)
    hidden = base.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    token_logps = chunked_token_logprobs(hidden, targets, base.get_output_embeddings(), chunk_size)
    # The scored positions come row by row, document by document: the answers in order, each its length long.
    lengths = torch.stack([batch.chosen_lengths, batch.rejected_lengths], dim=1).reshape(-1)
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    return torch.zeros(lengths.numel(), dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, owner, token_logps)


def reference_model(model):
    """The context in which `model` is the reference (dpo, ipo): the frozen start adapter when the run continues one
    (model.adapter: `phi3local.model.load.reference_adapter`), else the model with its adapter disabled (peft), or a
    refusal naming why there is none."""
    if has_reference_adapter(model):
        return reference_adapter(model)
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        from phi3local.train.recipe import TrainingError

        raise TrainingError("preference.loss dpo/ipo compares with the model without its adapter: it needs "
                            "lora.enabled=true (or preference.loss orpo/simpo, which need no reference)")
    return disable()


class Preference:
    name = "preference"
    packs = True
    generates = True  # the adapter is a chat model like an SFT one: merge, export, chat, serve take it as it is

    def __init__(self, recipe=None):
        from phi3local.config import PreferenceConfig

        self.settings = recipe.preference if recipe is not None else PreferenceConfig()
        self.sft_weight = (default_sft_weight(self.settings.loss) if self.settings.sft_weight is None
                           else self.settings.sft_weight)
        self.needs_reference = uses_reference(self.settings.loss)
        # What step_metrics and evaluate report, the same on every rank (a rank without pairs adds zeros).
        self.metric_names = (*BASE_METRICS, *(("nll_loss",) if self.sft_weight else ()),
                             *(("log_odds_chosen", "log_odds_ratio") if self.settings.loss == "orpo" else ()))

    def documents(self, ds) -> Pairs:
        return Pairs.from_dataset(ds)

    def check(self, docs: Pairs, tokenizer) -> None:
        """prepare refuses empty answers and identical sides; nothing is left to check here."""

    @torch.no_grad()
    def prepare(self, model, docs: Pairs, batches: Iterable, *, chunk_size: int) -> None:
        """preference.precompute_reference (dpo, ipo): every pair's reference log-probs, once, before training; the
        steps then run the policy's forward only. The reference never changes (the adapter off, or the frozen start
        adapter), so a resumed run computes the same table."""
        if not (self.needs_reference and self.settings.precompute_reference) or not len(docs):
            return
        table = torch.zeros(len(docs), 2, dtype=torch.float32)
        for batch in batches:
            logps = self.reference_logps(model, batch, chunk_size).float().cpu().reshape(-1, 2)
            table[torch.tensor(batch.doc_ids)] = logps
        docs.reference = table

    def row_capacity(self, max_seq_len: int) -> int:
        return 2 * max_seq_len

    def collate(self, rows, docs: Pairs, pad_id: int, **widths) -> PairBatch:
        return collate_pairs(rows, docs, pad_id, **widths)

    def units(self, batch: PairBatch) -> int:
        return len(batch.doc_ids)

    def trained_tokens(self, batch: PairBatch) -> int:
        return batch.trained_tokens  # the answer tokens scored, chosen and rejected

    def reference_logps(self, model, batch: PairBatch, chunk_size: int) -> torch.Tensor | None:
        if not self.needs_reference:
            return None
        if batch.reference is not None:  # precomputed (preference.precompute_reference)
            return batch.reference
        with reference_model(model), torch.no_grad():
            return answer_logps(model, batch, chunk_size)

    def pair_losses(self, model, batch: PairBatch, chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss per pair, metrics per pair) of one micro-batch: the reference pass, then the policy's."""
        reference = self.reference_logps(model, batch, chunk_size)
        policy = answer_logps(model, batch, chunk_size)
        pc, pr = policy[0::2], policy[1::2]
        nc, nr = batch.chosen_lengths, batch.rejected_lengths
        s = self.settings
        return preference_loss(
            s.loss, pc, pr, None if reference is None else reference[0::2], None if reference is None else reference[1::2],
            beta=s.beta, sft_weight=self.sft_weight, simpo_gamma=s.simpo_gamma, chosen_lengths=nc, rejected_lengths=nr,
            chosen_nll=-pc / nc.to(pc.dtype) if self.sft_weight else None)

    def loss(self, model, batch: PairBatch, *, chunk_size: int, count_correct: bool = False):
        per_pair, metrics = self.pair_losses(model, batch, chunk_size)
        return per_pair.sum(), {name: value.sum() for name, value in metrics.items()}

    def step_metrics(self, stats: dict, units: int) -> dict:
        return {name: value / max(units, 1) for name, value in stats.items()}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable, world, *, chunk_size: int) -> dict:
        sums: dict[str, float] = {}
        loss_sum, pairs = 0.0, 0
        for batch in batches:
            ls, stats = self.loss(model, batch, chunk_size=chunk_size)
            loss_sum += float(ls)
            pairs += self.units(batch)
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        totals = world.sum_floats([loss_sum, pairs] + [sums.get(n, 0.0) for n in self.metric_names])
        loss_sum, pairs = totals[0], max(totals[1], 1)
        return {"val_loss": loss_sum / pairs, **{f"val_{n}": v / pairs for n, v in zip(self.metric_names, totals[2:])}}

    def samples(self, model, docs: Pairs, tokenizer, count: int, max_new_tokens: int) -> list[dict]:
        """Greedy answers to the first validation prompts; `expected` is the preferred answer."""
        prompts = list(zip(docs.prompt_ids, docs.chosen_ids))[:count]
        return greedy_samples(model, tokenizer, prompts, max_new_tokens)

    def step_flops(self, config, docs: Pairs, lora) -> StepFlops:
        """The policy's step as a causal LM over both sequences (attention per sequence), plus, for dpo/ipo with the
        reference computed each step, the reference's forward: about half the frozen part of a step (forward
        without the input gradient). A precomputed reference runs once, before training, not in the step."""
        attention_len = token_weighted_length(docs.sequence_lengths)
        policy = lora_step_flops(config, attention_len, lora.target_modules if lora.enabled else [], lora.r,
                                 lora.modules_to_save, "causal_lm")
        if not self.needs_reference or self.settings.precompute_reference:
            return policy
        frozen = lora_step_flops(config, attention_len, [], lora.r, [], "causal_lm")
        return StepFlops(policy.per_token + frozen.per_token / 2, policy.per_trained_token + frozen.per_trained_token / 2)

    def summary_rows(self, final: dict) -> list[tuple[str, str]]:
        if "val_rewards/accuracies" not in final:
            return []
        return [("val reward accuracy / margin",
                 f"{final['val_rewards/accuracies']:.3f} / {final['val_rewards/margins']:.3f}")]



