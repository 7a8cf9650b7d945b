"""The `auto` training settings, resolved once before the model loads: packing, micro-batch, checkpointing.

- `data.packing: auto`: the cheaper epoch of the two, by measured cost. A micro-batch's FLOPs come from the
  real document lengths and the batches `phi3local.train.batching.plan_epoch` would make: a row of width w
  costs 6N x w for the dense matmuls plus 12 x layers x d x (the attention's square): w x w where a packed
  row's block-diagonal mask computes the whole row, the sum of its documents' squares where they are attended
  one by one (`phi3local.model.document_attention`, SDPA's training path), so packing wins by filling rows and,
  with the mask, loses by lengthening attention.
  Once the model is loaded, one packed and one padded micro-batch are timed (forward + backward, after a
  warm-up each) to fit seconds = fixed + per-FLOP x FLOPs, which adds what FLOPs miss (per-step overheads
  that dominate small models, kernels of unequal speed); each epoch's batches are then costed with it.
  With flash-attention 2 (varlen: a packed row pays only its documents' own attention) packing is chosen.
- `training.gradient_checkpointing: auto`: off when the memory plan fits without it (~35% faster on CPU,
  measured in kernels_bench/results/train_e2e_extended.json), else on.
- `training.micro_batch_size: auto`: the largest the memory plan fits (at most `MAX_AUTO_MICRO_BATCH`).
- `training.selective_checkpointing: auto`: with checkpointing on, on when the plan with the kept outputs stays
  within `SELECTIVE_HEADROOM` of the memory available at the micro-batch chosen above (the micro-batch comes
  first: the batch a step trains on is the user's first concern, the recomputation's speed the second).
- `data.pad_to_multiple_of: auto`: by device type (`phi3local.train.batching.AUTO_PAD_TO_MULTIPLE_OF`; config.py
  says why), decided before the plan, which plans the rounded width.

On --resume an `auto` takes the value the run was started with (the checkpoint's recipe), so a resumed run
sees the same batches whatever the device's free memory is now. data.pad_to_multiple_of is not among them:
it changes no batch's documents, order or loss, only its width, so it is re-decided for the device resumed on
(checkpoint.RESUME_MAY_CHANGE).
"""

from __future__ import annotations

import copy
import dataclasses
import math

from phi3local.config import Recipe
from phi3local.model.shapes import ModelShape
from phi3local.train.batching import padded_width, plan_epoch, resolved_pad_to_multiple_of
from phi3local.train.memory_plan import (
    MemoryPlanError,
    PlanReport,
    available_bytes,
    device_kind,
    does_not_fit_message,
    make_plan,
    recipe_shape,
)

MAX_AUTO_MICRO_BATCH = 64
# auto keeps selective checkpointing's outputs only within this share of the memory available: the plan's stated
# error (15%, tests/test_memory_plan.py) must not turn a speed-up into an out-of-memory error.
SELECTIVE_HEADROOM = 0.85
AUTO_KEYS = (("data", "packing"), ("training", "micro_batch_size"), ("training", "gradient_checkpointing"),
             ("training", "selective_checkpointing"))


def adopt_saved_choices(recipe: Recipe, saved: dict) -> Recipe:
    """`recipe` with each `auto` replaced by the concrete value of the checkpoint's recipe `saved`."""
    out = copy.deepcopy(recipe)
    for section, key in AUTO_KEYS:
        value = (saved.get(section) or {}).get(key)
        if getattr(getattr(out, section), key) == "auto" and value not in (None, "auto"):
            setattr(getattr(out, section), key, value)
    return out


def batch_flops(batch: list[list[int]], lengths: list[int], shape: ModelShape, pad_to_multiple_of: int = 1,
                per_document: bool = False) -> float:
    """Estimated FLOPs of one micro-batch's forward + backward (see the module docstring), at the width collate
    gives it (data.pad_to_multiple_of's rounding included); `per_document`: each row's documents attended one by
    one (a row's pads extend its last document), else the whole row."""
    dense = 6.0 * shape.parameter_count
    attention = 12.0 * shape.num_hidden_layers * shape.num_attention_heads * shape.dims_per_head
    width = padded_width(max(sum(lengths[d] for d in row) for row in batch), pad_to_multiple_of,
                         shape.max_position_embeddings)
    if not per_document:
        return len(batch) * width * (dense + attention * width)
    squares = 0
    for row in batch:
        docs = [lengths[d] for d in row]
        docs[-1] += width - sum(docs)
        squares += sum(n * n for n in docs)
    return len(batch) * width * dense + attention * squares


def epoch_batches(lengths: list[int], recipe: Recipe, micro_batch_size: int, packing: bool) -> list:
    return plan_epoch(lengths, recipe.data.max_seq_len, micro_batch_size, packing, recipe.seed, 0)


def choose_packing(lengths: list[int], shape: ModelShape, recipe: Recipe, micro_batch_size: int,
                   fixed_flops: float = 0.0, pad_to_multiple_of: int = 1,
                   per_document: bool = False) -> tuple[bool, dict]:
    """Packed or not by estimated epoch cost; `fixed_flops`: a measured per-micro-batch overhead in FLOPs;
    `per_document`: packed documents attended one by one (see batch_flops)."""
    costs = {packing: sum(fixed_flops + batch_flops(b, lengths, shape, pad_to_multiple_of, per_document)
                          for b in epoch_batches(lengths, recipe, micro_batch_size, packing))
             for packing in (True, False)}
    return costs[True] <= costs[False], {"packed_flops": costs[True], "unpacked_flops": costs[False]}


def measure_packing(recipe: Recipe, docs, loaded, pad_id: int, forward_loss) -> tuple[Recipe, dict]:
    """`recipe` with data.packing decided by timing one micro-batch of each kind on the loaded model.

    `docs`: the training Documents; `forward_loss(recipe, model, batch)`: the loop's loss. Gradients are cleared
    and the RNG state restored afterwards: training starts as it would have.
    """
    import time

    import torch

    from phi3local.train.batching import collate

    out = copy.deepcopy(recipe)
    shape = recipe_shape(out)
    mbs = out.training.micro_batch_size
    lengths = docs.lengths
    if loaded.attn_implementation == "flash_attention_2":
        out.data.packing = True
        return out, {"chosen": "packed", "why": "flash-attention 2 varlen: packed rows pay no cross-document attention"}
    # SDPA models attend a packed row's documents one by one in training forwards (load_model switched them to
    # phi3local.model.document_attention): timed in train mode, costed per document.
    per_document = loaded.attn_implementation == "sdpa"
    was_training = loaded.model.training
    loaded.model.train()

    def flops(rows: list[list[int]]) -> float:
        return batch_flops(rows, lengths, shape, multiple, per_document)

    multiple = resolved_pad_to_multiple_of(out.data.pad_to_multiple_of, loaded.device.type)

    def seconds(rows: list[list[int]]) -> float:
        batch = collate(rows, docs.input_ids, docs.labels, pad_id, docs.class_labels, pad_to_multiple_of=multiple,
                        max_width=shape.max_position_embeddings).to(loaded.device)
        best = math.inf
        for _ in range(2):  # the first run warms allocator and kernels up; the second is timed
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_sum, _, _ = forward_loss(out, loaded.model, batch)
            loss_sum.backward()
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            best = time.perf_counter() - start
        return best

    samples = {}
    with torch.random.fork_rng(devices=[loaded.device] if loaded.device.type == "cuda" else []):
        for packing in (True, False):
            batches = sorted(epoch_batches(lengths, out, mbs, packing), key=flops)
            rows = batches[len(batches) // 2]  # the median micro-batch of its kind
            samples[packing] = (flops(rows), seconds(rows))
    loaded.model.zero_grad(set_to_none=True)
    loaded.model.train(was_training)
    (f_packed, t_packed), (f_padded, t_padded) = samples[True], samples[False]
    # seconds = fixed + per_flop x flops through the two points; noise can tilt it, so keep both >= 0.
    per_flop = (t_packed - t_padded) / (f_packed - f_padded) if f_packed != f_padded else 0.0
    if per_flop <= 0:
        per_flop = max(t_packed, t_padded) / max(f_packed, f_padded)
    fixed_flops = max(t_padded - per_flop * f_padded, 0.0) / per_flop
    out.data.packing, costs = choose_packing(lengths, shape, out, mbs, fixed_flops, multiple, per_document)
    return out, {**costs, "fixed_flops_per_micro_batch": fixed_flops,
                 "measured_seconds": {"packed": t_packed, "padded": t_padded},
                 "chosen": "packed" if out.data.packing else "length-grouped padding"}


def resolve(recipe: Recipe, lengths: list[int] | None, device: str | None = None,
            available: int | None = None) -> tuple[Recipe, PlanReport | None, dict]:
    """A copy of `recipe` with every `auto` decided, the memory plan of the result, and why (for the log).

    `lengths`: the training documents' token counts (None: packing stays undecided). Raises MemoryPlanError,
    naming the settings that fit, when the plan does not fit the device. A model whose shapes are unknown
    gets no plan (None); its `auto` packing is still decided, the other autos must then be set.
    """
    out = copy.deepcopy(recipe)
    t, d = out.training, out.data
    reasons: dict = {}
    if d.pad_to_multiple_of == "auto":
        kind = device_kind(device)
        d.pad_to_multiple_of = resolved_pad_to_multiple_of("auto", kind)
        reasons["pad_to_multiple_of"] = f"{d.pad_to_multiple_of} on {kind}"
    try:
        shape = recipe_shape(out)
    except MemoryPlanError as e:
        if "auto" in (t.micro_batch_size, t.gradient_checkpointing):
            raise MemoryPlanError(f"{e}; set training.micro_batch_size and training.gradient_checkpointing "
                                  "(not auto) for such a model") from None
        shape, reasons["plan"] = None, str(e)
    if available is None and shape is not None:
        available = available_bytes(device_kind(device))

    def plan(micro_batch_size: int, gradient_checkpointing: bool, selective: bool = False) -> PlanReport:
        return make_plan(out, device=device, available=available, micro_batch_size=micro_batch_size,
                         gradient_checkpointing=gradient_checkpointing, shape=shape,
                         selective_checkpointing=selective)

    if t.micro_batch_size == "auto":
        without = plan(1, False).largest_micro_batch if t.gradient_checkpointing is not True else 0
        if without >= 1 and t.gradient_checkpointing == "auto":
            t.gradient_checkpointing = False
        largest = plan(1, True).largest_micro_batch if t.gradient_checkpointing is not False else without
        t.micro_batch_size = max(1, min(largest, MAX_AUTO_MICRO_BATCH, len(lengths) if lengths else MAX_AUTO_MICRO_BATCH))
        reasons["micro_batch_size"] = f"the largest that fits is {largest}"
    if t.gradient_checkpointing == "auto":
        t.gradient_checkpointing = not plan(t.micro_batch_size, False).plan.fits
        reasons["gradient_checkpointing"] = ("on: the step does not fit without it" if t.gradient_checkpointing
                                             else "off: the step fits without it")
    selective_by_auto = t.selective_checkpointing == "auto"
    if selective_by_auto:
        if shape is None or not t.gradient_checkpointing:
            t.selective_checkpointing = False
        else:
            kept = plan(t.micro_batch_size, True, True).plan
            t.selective_checkpointing = kept.available is None or kept.total <= SELECTIVE_HEADROOM * kept.available
            # short: the plan command prints it unwrapped, in 60 columns with the key
            reasons["selective_checkpointing"] = "on: it fits" if t.selective_checkpointing else "off: it would not fit"
    if d.packing == "auto" and (out.task != "causal_lm" or shape is None):
        d.packing = out.task == "causal_lm"  # else measured once the model is loaded (measure_packing)
    if shape is None:
        return out, None, reasons
    report = plan(t.micro_batch_size, t.gradient_checkpointing, t.selective_checkpointing is True)
    if selective_by_auto and t.selective_checkpointing:
        # What else fits (a larger micro-batch, a longer row) is what auto would then choose: without the kept outputs.
        report = dataclasses.replace(plan(t.micro_batch_size, True, False), plan=report.plan)
    if not report.plan.fits:
        raise MemoryPlanError(does_not_fit_message(report))
    return out, report, reasons
