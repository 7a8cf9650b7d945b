"""The training recipe: setup() -> train() -> cleanup(), read top to bottom.

A custom PyTorch loop (no HF Trainer): 4-bit QLoRA model from `phi3local.model.load`, packed
micro-batches from `phi3local.train.batching`, the chunked loss from `phi3local.train.loss`,
atomic checkpoints from `phi3local.train.checkpoint`, the live panel from `phi3local.train.display`,
the metrics sinks from `phi3local.train.metrics`.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from phi3local import folders
from phi3local.config import Recipe, flatten_keys
from phi3local.cost import EnergyMeter, run_summary_fields, summary_rows
from phi3local.errors import Phi3LocalError
from phi3local.model.flops import StepFlops, lora_step_flops, measured_matmul_peak
from phi3local.model.load import (
    LoadedModel,
    activation_offload,
    base_causal_lm,
    cache_dir,
    load_model,
    pick_device,
    resolve_model_path,
    revision_kwargs,
)
from phi3local.model.shapes import longrope_switch
from phi3local.train import auto_settings, distributed
from phi3local.train import checkpoint as ckpt
from phi3local.train.batching import MicroBatch, collate, plan_epoch, resolved_pad_to_multiple_of
from phi3local.train.display import TrainDisplay, peak_memory_bytes
from phi3local.train.loss import chunked_cross_entropy
from phi3local.train.memory_plan import plan_table
from phi3local.train.metrics import MetricsLog, NullMetricsLog
from phi3local.train.plots import plot_losses
from phi3local.units import format_bytes


class TrainingError(Phi3LocalError, RuntimeError):
    """A run cannot start or go on; the message says why and what to change."""


class NonFiniteLossError(TrainingError):
    pass


class TrainingInterrupted(TrainingError):
    def __init__(self, signum: int, checkpoint: Path):
        self.signum = signum
        self.checkpoint = checkpoint
        # The command to continue is the CLI's to print: it knows how the user started this run.
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved in {checkpoint}")


class RunAlreadyFinished(TrainingError):
    """--resume on a run that has finished: nothing to continue, and its adapter is left as it is."""

    exit_code = 0


# A share of trained tokens below this almost always means a broken template or mask.
MIN_TRAINED_SHARE = 0.002


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


@dataclass
class Run:
    recipe: Recipe
    run_dir: Path
    console: Console
    tokenizer: object
    loaded: LoadedModel
    train_docs: Documents
    val_docs: Documents
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: ckpt.TrainerState
    total_steps: int
    step_flops: StepFlops
    peak_flops: float
    metrics: MetricsLog
    world: distributed.World = field(default_factory=distributed.World)  # this process among the ranks
    stop_signal: list[int] = field(default_factory=list)
    previous_handlers: dict = field(default_factory=dict)
    held: ExitStack = field(default_factory=ExitStack)  # the run folder's lock, released in cleanup()

    @property
    def model(self):
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device


# --------------------------------------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never overwrite a run by accident: a finished or started run needs --resume or --overwrite.

    Called with the folder claimed and locked: it is a phi3local run folder and no other process trains in it.
    """
    if overwrite and not resume:
        keep = {"prepared", folders.MARKER, folders.LOCK}  # the tokenised data cache and our own bookkeeping
        for child in run_dir.iterdir():
            if child.name not in keep:
                folders.remove(child)
        return
    state_file = run_dir / "trainer_state.json"
    try:
        finished = state_file.is_file() and json.loads(state_file.read_text()).get("finished")
    except (ValueError, AttributeError):  # damaged: its checkpoints decide what the run is
        finished = False
    if finished and resume:
        raise RunAlreadyFinished(f"{run_dir} holds a finished run: nothing to resume (its adapter is in "
                                 f"{run_dir / 'adapter'}); --overwrite trains it again")
    if finished:
        raise TrainingError(f"{run_dir} holds a finished run; pass --overwrite to replace it, "
                            "or choose another output_dir=...")
    if ckpt.list_checkpoints(run_dir) and not resume:
        raise TrainingError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it "
                            "or --overwrite to start again")


def data_sha256(recipe: Recipe) -> dict[str, str]:
    """sha256 of each input data file, as prepare records them (the embedded demo file when none is set)."""
    from phi3local.data.prepare import demo_file, input_digest, resolve_data_path

    d = recipe.data
    files = {"train": (resolve_data_path(d.train_file, recipe), d.train_file) if d.train_file
             else (demo_file(recipe.task), "demo")}
    if d.validation_file:
        files["validation"] = (resolve_data_path(d.validation_file, recipe), d.validation_file)
    return {name: input_digest(path, shown) for name, (path, shown) in files.items() if path.exists()}


def checkpoint_to_resume(recipe: Recipe, run_dir: Path, console: Console) -> ckpt.Checkpoint | None:
    """The intact checkpoint to continue from, after checking it was trained with this recipe and data."""
    checkpoint = ckpt.find_resumable(run_dir, recipe.training.on_damaged_checkpoint,
                                     warn=lambda msg: console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True))
    if checkpoint is None:
        return None
    recipe = auto_settings.adopt_saved_choices(recipe, checkpoint.recipe)  # auto: what the run chose then
    changes = ckpt.recipe_changes(checkpoint.recipe, recipe.to_dict())
    if changes:
        raise TrainingError(f"the recipe differs from the one {checkpoint.path} was trained with ("
                            + "; ".join(changes) + "); resume with the same recipe, or start again with --overwrite")
    saved = checkpoint.trainer_state.get("data_sha256") or {}
    now = data_sha256(recipe)
    for name, digest in saved.items():
        if name not in now:
            raise TrainingError(f"the {name} data file of this recipe is missing (data.{name}_file); {checkpoint.path} "
                                "was trained on it")
        if digest != now[name]:
            raise TrainingError(f"the {name} data changed since {checkpoint.path} was written (sha256 {digest[:12]}… "
                                f"then, {now[name][:12]}… now); resume with the same data, or start again with "
                                "--overwrite")
    return checkpoint


def check_label_mask(docs: Documents, tokenizer, task: str) -> None:
    if task == "classification":
        return
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


def make_optimizer(model, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameters: enable lora or list modules in lora.modules_to_save")
    choice = recipe.training.optimizer
    if choice == "auto":
        choice = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if choice == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=recipe.training.lr, weight_decay=recipe.training.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.training.lr, weight_decay=recipe.training.weight_decay)


def lr_lambda(recipe: Recipe, total_steps: int):
    t = recipe.training
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if t.lr_schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay

    return factor


def long_from(recipe: Recipe) -> int | None:
    """The model's LongRoPE switch: batching keeps longer documents apart from shorter ones (see batching.py)."""
    return _longrope_switch(recipe.model.name_or_path, str(cache_dir()))


@functools.lru_cache(maxsize=16)
def _longrope_switch(name_or_path: str, model_cache: str) -> int | None:
    # Once per model, not per step: resolving the path and reading config.json are file reads.
    return longrope_switch(resolve_model_path(name_or_path))


def count_total_steps(recipe: Recipe, docs: Documents, world_size: int = 1) -> tuple[int, int]:
    plan = plan_epoch(docs.lengths, recipe.data.max_seq_len, recipe.training.micro_batch_size,
                      recipe.data.packing and recipe.task == "causal_lm", recipe.seed, 0, long_from=long_from(recipe))
    steps_per_epoch = math.ceil(len(plan) / (recipe.training.grad_accum * world_size))
    total = recipe.training.max_steps or recipe.training.epochs * steps_per_epoch
    return total, steps_per_epoch


def decide_auto_settings(recipe: Recipe, docs: Documents, console: Console, world: distributed.World) -> Recipe:
    """The recipe with its `auto` settings decided; prints the memory plan and why each auto chose what it did."""
    resolved, report, reasons = auto_settings.resolve(recipe, docs.lengths, device=pick_device().type)
    if world.distributed:  # every rank must plan the same batches: what fits on all of them
        choices = world.gather_lists([(resolved.training.micro_batch_size, resolved.training.gradient_checkpointing,
                                       resolved.data.pad_to_multiple_of)])
        resolved.training.micro_batch_size = min(size for size, _, _ in choices)
        resolved.training.gradient_checkpointing = any(checkpointing for _, checkpointing, _ in choices)
        resolved.data.pad_to_multiple_of = choices[0][2]  # rank 0's: equal widths on every rank
    if report is not None:
        console.print(plan_table(report))
    for key, why in reasons.items():
        console.print(f"[dim]auto {key}: {why}[/]", soft_wrap=True, highlight=False)
    return resolved


def decide_packing(recipe: Recipe, docs: Documents, loaded: LoadedModel, pad_id: int, console: Console,
                   world: distributed.World) -> Recipe:
    """data.packing=auto decided by timing one packed and one padded micro-batch on the loaded model."""
    recipe, why = auto_settings.measure_packing(recipe, docs, loaded, pad_id, forward_loss)
    # Timings differ between ranks; every rank must plan the same batches, so rank 0's choice holds for all.
    recipe.data.packing = world.gather_lists([recipe.data.packing])[0]
    console.print(f"[dim]auto packing: {why}[/]", soft_wrap=True, highlight=False)
    return recipe


def setup(recipe: Recipe, resume: bool = False, overwrite: bool = False,
          console: Console | None = None) -> Run:
    """Claim and lock the run folder, then prepare the data, load the model and (on resume) the checkpoint.

    Under a launcher rank 0 alone claims, locks and writes the folder; the other ranks wait for it, then
    read the same prepared data and checkpoint, and print nothing.
    """
    console = console or Console()
    world = distributed.start(recipe.training.distributed_timeout_seconds)
    held = ExitStack()
    held.callback(world.close)  # the last thing released
    try:
        run_dir = Path(recipe.output_dir)
        with world.main_first():  # a folder refused to rank 0 stops every rank
            if world.is_main:
                run_dir = folders.claim(run_dir, "train")
                held.enter_context(folders.exclusive(run_dir, "training"))
        console = console if world.is_main else Console(quiet=True)
        return _setup_locked(recipe, run_dir, held, resume, overwrite, console, world)
    except BaseException:
        held.close()
        raise


def _setup_locked(recipe: Recipe, run_dir: Path, held: ExitStack, resume: bool, overwrite: bool,
                  console: Console, world: distributed.World) -> Run:
    from phi3local.data.prepare import load_prepared, prepare
    from phi3local.model.tokenizer import load_tokenizer

    with world.main_first():
        if world.is_main:
            check_run_dir(run_dir, resume, overwrite)
        else:
            world.require_shared(run_dir / "recipe.yaml")
        # Checked before anything in the run folder changes: a refused resume leaves it as it was.
        checkpoint = checkpoint_to_resume(recipe, run_dir, console) if resume else None
        if world.is_main:
            ckpt.clean_stale_temporaries(run_dir)  # safe: the lock says no other process is saving here
            folders.write_text_atomic(run_dir / "recipe.yaml",
                              recipe.to_yaml() + "\n# versions: " + json.dumps(ckpt.package_versions()) + "\n")
        seed_everything(recipe.seed)

        tokenizer = load_tokenizer(recipe.model.tokenizer or resolve_model_path(recipe.model.name_or_path),
                                   revision=None if recipe.model.tokenizer else recipe.model.revision)
        prepared = prepare(recipe, tokenizer, console=console)
    train_ds, val_ds = load_prepared(prepared.out_dir)
    train_docs, val_docs = Documents.from_dataset(train_ds), Documents.from_dataset(val_ds)
    if not train_docs.input_ids:
        raise TrainingError(f"no training rows after prepare (see {prepared.out_dir / 'stats.json'})")
    check_label_mask(train_docs, tokenizer, recipe.task)
    if checkpoint is not None:
        recipe = auto_settings.adopt_saved_choices(recipe, checkpoint.recipe)
    recipe = decide_auto_settings(recipe, train_docs, console, world)  # before loading: refuses a plan that won't fit
    if not val_docs.input_ids:
        console.print(f"[yellow]warning:[/] no validation rows ({len(train_docs.input_ids)} training rows, "
                      f"data.val_fraction={recipe.data.val_fraction}): the validation loss is not measured", soft_wrap=True)
    total_steps, _ = count_total_steps(recipe, train_docs, world.size)
    if total_steps < 1:
        raise TrainingError("this recipe trains zero steps (training.epochs, training.max_steps); nothing to do")

    loaded = load_model(recipe, tokenizer, world.device)
    if recipe.data.packing == "auto":  # timed on the loaded model: one micro-batch each way
        recipe = decide_packing(recipe, train_docs, loaded, tokenizer.pad_token_id, console, world)
        total_steps, _ = count_total_steps(recipe, train_docs, world.size)
    if recipe.training.compile:
        # Compiles the decoder stack in place; the chunked loss and lm_head stay eager.
        base_causal_lm(loaded.model).model.compile()
    console.print(f"[bold]model[/] {loaded.base_path}  attention={loaded.attn_implementation}  "
                  f"dtype={loaded.compute_dtype}  device={loaded.device}  "
                  f"4-bit={recipe.quantization.load_in_4bit}")
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    console.print(f"trainable parameters: {trainable:,}")
    optimizer = make_optimizer(loaded.model, recipe, loaded.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_steps))
    state = ckpt.TrainerState(data_sha256={k: v["sha256"] for k, v in prepared.stats["inputs"].items()},
                              world_size=world.size)
    if checkpoint is not None:
        state = ckpt.restore(checkpoint, loaded.model, optimizer, scheduler)
        console.print(f"resumed from {checkpoint.path} (step {state.step})", soft_wrap=True)
        if state.world_size != world.size:
            raise TrainingError(f"{checkpoint.path} was trained by {state.world_size} process(es), this run has "
                                f"{world.size}: the global batch would change; resume with {state.world_size}")
    elif resume:
        console.print("--resume: no checkpoint yet, starting from step 0")
    world.broadcast_parameters([p for p in loaded.model.parameters() if p.requires_grad])

    config = base_causal_lm(loaded.model).config
    # Causal attention per token grows with its own document's length: the token-weighted mean length.
    lengths = np.asarray(train_docs.lengths, dtype=np.float64)
    attention_len = float((lengths**2).sum() / max(lengths.sum(), 1.0))
    lora = recipe.lora
    step_flops = lora_step_flops(config, attention_len, lora.target_modules if lora.enabled else [], lora.r,
                                 lora.modules_to_save, recipe.task)
    # MFU over the whole job: every rank's tokens against every rank's device.
    peak = (recipe.training.peak_flops or measured_matmul_peak(loaded.device, loaded.compute_dtype)) * world.size
    metrics = open_metrics(recipe, run_dir) if world.is_main else NullMetricsLog()
    run = Run(recipe, run_dir, console, tokenizer, loaded, train_docs, val_docs, optimizer, scheduler, state,
              total_steps, step_flops, peak, metrics, world=world, held=held)
    install_signal_handlers(run)
    return run


def open_metrics(recipe: Recipe, run_dir: Path) -> MetricsLog:
    """metrics.jsonl plus the recipe's trackers, which get the recipe's values and file too."""
    return MetricsLog(run_dir, recipe.training.trackers, params=flatten_keys(recipe.to_dict()),
                      recipe_file=run_dir / "recipe.yaml", run_name=run_dir.name)


def install_signal_handlers(run: Run) -> None:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit cleanly."""

    first_at: list[float] = []

    def handler(signum, frame):
        # A second signal stops now; under a launcher the first may come twice at once (the terminal's Ctrl-C
        # and torchrun forwarding it), which is still the first.
        if run.stop_signal:
            if run.world.distributed and time.monotonic() - first_at[0] < 2.0:
                return
            raise KeyboardInterrupt
        first_at.append(time.monotonic())
        run.stop_signal.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            run.previous_handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a test runner's worker): no handler
            pass


# --------------------------------------------------------------------------------------------- steps

def forward_loss(run: Run, batch: MicroBatch, count_correct: bool = False):
    """Sum of per-token (or per-example) losses of one micro-batch, and its correct-prediction count."""
    if run.recipe.task == "classification":
        # collate's positions, not the model's arange(width): its pads stay below a LongRoPE switch.
        logits = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits.float()
        loss_sum = F.cross_entropy(logits, batch.class_labels, reduction="sum")
        return loss_sum, (logits.argmax(-1) == batch.class_labels).sum(), logits
    base = base_causal_lm(run.model)
    ids, positions, targets = rows_for_attention(batch, base.config._attn_implementation)
    hidden = base.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    loss_sum, correct = chunked_cross_entropy(hidden, targets, base.get_output_embeddings(),
                                              run.recipe.training.loss_chunk_size, count_correct)
    return loss_sum, correct, None


def rows_for_attention(batch: MicroBatch, attn_implementation: str):
    """input_ids, position_ids and targets as the attention kernel needs them to keep documents apart.

    transformers runs flash-attention's variable-length kernel (documents found from position_ids) only for
    a single row: in a [B, L] batch, packed documents would attend to each other. Rows start at position 0
    and pads continue a document's positions, so the batch flattened into one row keeps every boundary.
    SDPA and eager build their block-diagonal mask per row and take the batch as it is.
    """
    tensors = batch.input_ids, batch.position_ids, batch.targets
    if attn_implementation == "flash_attention_2" and batch.input_ids.shape[0] > 1:
        return tuple(t.reshape(1, -1) for t in tensors)
    return tensors


def batch_units(run: Run, batch: MicroBatch) -> int:
    """What the loss is averaged over: trained tokens (causal LM) or examples (classification)."""
    return len(batch.doc_ids) if run.recipe.task == "classification" else batch.trained_tokens


def make_batches(run: Run, docs: Documents, epoch: int, packing: bool | None = None) -> list[list[list[int]]]:
    r = run.recipe
    packing = r.data.packing and r.task == "causal_lm" if packing is None else packing
    return plan_epoch(docs.lengths, r.data.max_seq_len, r.training.micro_batch_size, packing, r.seed, epoch,
                      long_from=long_from(r))


def next_micro_batches(run: Run, plans: dict[int, list]) -> list[MicroBatch]:
    """This rank's micro-batches of the next optimizer step (grad_accum per rank); a step never crosses an
    epoch boundary."""
    s = run.state
    if s.epoch not in plans:
        plans.clear()
        plans[s.epoch] = make_batches(run, run.train_docs, s.epoch)
    plan = plans[s.epoch]
    chosen = plan[s.batch_in_epoch : s.batch_in_epoch + run.recipe.training.grad_accum * run.world.size]
    s.batch_in_epoch += len(chosen)
    if s.batch_in_epoch >= len(plan):
        s.epoch, s.batch_in_epoch = s.epoch + 1, 0
    pad = run.tokenizer.pad_token_id
    docs = run.train_docs
    limit = long_from(run.recipe)
    return [collate(rows, docs.input_ids, docs.labels, pad, docs.class_labels, position_limit=limit, **padding(run))
            for rows in run.world.share(chosen)]


def padding(run: Run) -> dict:
    """collate's width rounding: data.pad_to_multiple_of, never past the model's positions."""
    return {"pad_to_multiple_of": resolved_pad_to_multiple_of(run.recipe.data.pad_to_multiple_of, run.device.type),
            "max_width": base_causal_lm(run.model).config.max_position_embeddings}


def train_step(run: Run, batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over grad_accum micro-batches (on each rank), normalised by the step's trained tokens
    (over all ranks)."""
    (units,) = run.world.sum_ints([sum(batch_units(run, b) for b in batches)])
    if units == 0:
        return torch.zeros(()), torch.zeros(())
    loss_total = torch.zeros((), device=run.device)
    per_batch = []
    for batch in batches:
        with activation_offload(run.recipe.training.offload_activations, run.device):
            loss_sum, _, _ = forward_loss(run, batch.to(run.device))
        (loss_sum / units).backward()
        per_batch.append(loss_sum.detach())
        loss_total += loss_sum.detach()
    params = [p for p in run.model.parameters() if p.requires_grad]
    loss_total = run.world.sum_gradients(params, loss_total)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.recipe.training.max_grad_norm or float("inf"))
    # One host sync per optimizer step: a non-finite loss must stop the run before it poisons the weights.
    if not bool(torch.isfinite(loss_total) & torch.isfinite(grad_norm)):
        bad = [b for b, loss in zip(batches, per_batch) if not torch.isfinite(loss)] or batches
        sources = [run.train_docs.sources[d] for b in bad for d in b.doc_ids][:10]
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {run.state.step + 1} (loss sum {float(loss_total)}, "
            f"grad norm {float(grad_norm)}); documents in the batch: {sources}. Hint: lower training.lr, "
            "check those rows, or use compute_dtype=bfloat16 instead of float16")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_total / units, grad_norm


@torch.no_grad()
def evaluate(run: Run, docs: Documents, max_batches: int = 0) -> dict:
    """Validation loss, perplexity, next-token accuracy on trained tokens (or accuracy/F1 for classification)."""
    if not docs.input_ids:
        return {}
    was_training = run.model.training
    run.model.eval()
    loss_sum, units, correct = 0.0, 0, 0
    predictions, truths = [], []
    plan = make_batches(run, docs, epoch=0)
    if max_batches:
        plan = plan[:max_batches]
    limit = long_from(run.recipe)
    for rows in run.world.share(plan):
        batch = collate(rows, docs.input_ids, docs.labels, run.tokenizer.pad_token_id, docs.class_labels,
                        position_limit=limit, **padding(run))
        batch = batch.to(run.device)
        ls, c, logits = forward_loss(run, batch, count_correct=True)
        loss_sum += float(ls)
        correct += int(c)
        units += batch_units(run, batch)
        if logits is not None:
            predictions += logits.argmax(-1).tolist()
            truths += batch.class_labels.tolist()
    run.model.train(was_training)
    loss_sum, units, correct = run.world.sum_floats([loss_sum, units, correct])
    predictions, truths = run.world.gather_lists(predictions), run.world.gather_lists(truths)
    loss = loss_sum / max(units, 1)
    result = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_accuracy": correct / max(units, 1)}
    if run.recipe.task == "classification":
        result.update(classification_metrics(truths, predictions, len(run.recipe.model.labels)))
    return result


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


def stop_token_ids(tokenizer) -> list[int]:
    """Every id that ends a turn: Phi-3's <|end|> and <|endoftext|>, plus the tokenizer's eos."""
    ids = []
    for token in ("<|end|>", "<|endoftext|>", tokenizer.eos_token):
        if token is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


@torch.no_grad()
def sample_generations(run: Run, docs: Documents, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers to the first validation prompts (everything before the first trained token)."""
    if run.recipe.task != "causal_lm" or count <= 0:
        return []
    was_training = run.model.training
    run.model.eval()
    samples = []
    for ids, labels in list(zip(docs.input_ids, docs.labels))[:count]:
        first = next((i for i, t in enumerate(labels) if t != -100), None)
        if not first:
            continue
        prompt = torch.tensor([ids[:first]], device=run.device)
        out = run.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_token_ids(run.tokenizer),
                                 pad_token_id=run.tokenizer.pad_token_id, use_cache=True)
        expected = [t for t in labels if t != -100]
        samples.append({
            "prompt": run.tokenizer.decode(ids[:first]),
            "expected": run.tokenizer.decode(expected),
            "generated": run.tokenizer.decode(out[0, first:].tolist()),
        })
    run.model.train(was_training)
    return samples


# --------------------------------------------------------------------------------------------- train

def save(run: Run) -> Path:
    """Rank 0 writes the checkpoint (the ranks hold the same adapter and state); the others wait until it is
    written, so none ends the job while rank 0 still saves."""
    path = run.run_dir / ckpt.CHECKPOINTS / f"step-{run.state.step}"
    if run.world.is_main:
        path = ckpt.save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, run.state,
                                    run.recipe.to_yaml(), run.tokenizer)
        ckpt.prune_checkpoints(run.run_dir, run.recipe.training.keep_checkpoints, run.state.best_step)
    run.world.barrier()
    return path


def run_eval(run: Run) -> dict:
    result = evaluate(run, run.val_docs, run.recipe.eval.max_batches)
    if not result:
        return {}
    s = run.state
    if s.best_val_loss is None or result["val_loss"] < s.best_val_loss:
        s.best_val_loss, s.best_step = result["val_loss"], s.step
    record = {"step": s.step, **{k: v for k, v in result.items() if k != "confusion_matrix"}}
    s.history.append(record)
    run.metrics.write(record)
    return result


def train(run: Run) -> dict:
    r, s = run.recipe, run.state
    run.model.train()
    plans: dict[int, list] = {}
    display = TrainDisplay(run.total_steps, r.training.display if run.world.is_main else "none", run.console)
    window_tokens = window_real = window_padded = 0
    window_start = time.perf_counter()
    run_start = time.perf_counter() - s.elapsed_seconds
    total_real = total_padded = 0
    energy = EnergyMeter(run.device.type, run.device.index)  # this session's energy (a resumed run's earlier part is not in it)
    with display:
        while s.step < run.total_steps:
            batches = next_micro_batches(run, plans)
            try:
                loss, grad_norm = train_step(run, batches)
            except torch.OutOfMemoryError as e:
                raise TrainingError(
                    f"out of GPU memory at step {s.step + 1} (micro_batch_size={r.training.micro_batch_size}, "
                    f"max_seq_len={r.data.max_seq_len}, gradient_checkpointing={r.training.gradient_checkpointing})."
                    " Lower training.micro_batch_size (raise training.grad_accum to keep the batch), lower "
                    "data.max_seq_len, or turn on training.gradient_checkpointing=true (and for long rows "
                    "training.offload_activations=true); `phi3local plan RECIPE` shows what fits") from e
            s.step += 1
            # A classification example trains on its whole text (one label from all its tokens).
            tokens, real, padded = run.world.sum_ints([
                sum(b.real_tokens if r.task == "classification" else b.trained_tokens for b in batches),
                sum(b.real_tokens for b in batches), sum(b.padded_tokens for b in batches)])
            window_tokens += tokens
            window_real += real
            window_padded += padded
            s.trained_tokens += tokens

            logged = s.step % r.training.log_every == 0 or s.step == run.total_steps
            if logged:
                if run.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                seconds = now - window_start
                total_real += window_real
                total_padded += window_padded
                steps_in_window = r.training.log_every if s.step % r.training.log_every == 0 else 1
                record = {
                    "step": s.step, "epoch": s.epoch, "loss": float(loss), "lr": run.scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm), "tokens_per_second": window_tokens / seconds,
                    "step_seconds": seconds / steps_in_window,
                    "mfu": run.step_flops.total(window_real, window_tokens) / seconds / run.peak_flops,
                    "padding_share": 1.0 - total_real / max(total_padded, 1),
                    "peak_memory_bytes": peak_memory_bytes(run.device), "trained_tokens": s.trained_tokens,
                    "eta_seconds": (now - run_start) / s.step * (run.total_steps - s.step),
                }
                run.metrics.write(record)
                display.update(record)
                window_tokens = window_real = window_padded = 0

            if r.eval.every and s.step % r.eval.every == 0 and s.step < run.total_steps:
                display.update(run_eval(run))
            s.elapsed_seconds = time.perf_counter() - run_start
            if r.training.checkpoint_every and s.step % r.training.checkpoint_every == 0:
                save(run)
            if run.world.any(bool(run.stop_signal)):  # the ranks stop together, after the same step
                raise TrainingInterrupted((run.stop_signal or [signal.SIGTERM])[0], save(run))
            if logged:  # after eval and checkpoint, so their time is not charged to the next window
                window_start = time.perf_counter()

    final = run_eval(run)
    s.finished = True
    s.elapsed_seconds = time.perf_counter() - run_start
    samples = sample_generations(run, run.val_docs, r.eval.generate_samples if run.world.is_main else 0,
                                 r.eval.max_new_tokens)
    save(run)
    if not run.world.is_main:  # rank 0 alone writes the adapter and the summary
        return {"rank": run.world.rank, "steps": s.step}
    save_adapter(run)
    summary = {
        "steps": s.step, "trained_tokens": s.trained_tokens, "seconds": s.elapsed_seconds,
        "tokens_per_second": s.trained_tokens / max(s.elapsed_seconds, 1e-9),
        "padding_share": 1.0 - total_real / max(total_padded, 1),
        "peak_memory_bytes": peak_memory_bytes(run.device), "first_val_loss": None,
        "best_val_loss": s.best_val_loss, "best_step": s.best_step, "final": final, "samples": samples,
        "attn_implementation": run.loaded.attn_implementation,
        "cost": run_summary_fields(s.elapsed_seconds, s.trained_tokens, r.training.usd_per_device_hour,
                                   run.device.type, run.peak_flops, energy, devices=run.world.size),
    }
    vals = [h["val_loss"] for h in s.history if "val_loss" in h]
    summary["first_val_loss"] = vals[0] if vals else None
    folders.write_text_atomic(run.run_dir / "summary.json", json.dumps(summary, indent=2))
    folders.write_text_atomic(run.run_dir / "trainer_state.json", json.dumps(ckpt.asdict(s), indent=2))
    print_summary(run, summary)
    return summary


def save_adapter(run: Run) -> Path:
    """The final adapter: a peft folder with tokenizer and a generation_config listing every stop id."""
    from transformers import GenerationConfig

    out = run.run_dir / "adapter"
    tmp = run.run_dir / ".tmp-adapter"
    if tmp.exists():
        shutil.rmtree(tmp)
    run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    if run.recipe.task == "causal_lm":
        try:
            gen = GenerationConfig.from_pretrained(
                run.loaded.base_path, **revision_kwargs(run.loaded.base_path, run.recipe.model.revision))
        except OSError:
            gen = GenerationConfig()
        gen.eos_token_id = stop_token_ids(run.tokenizer)
        gen.pad_token_id = run.tokenizer.pad_token_id
        gen.save_pretrained(tmp)
    if out.exists() or out.is_symlink():
        folders.remove(out)
    tmp.rename(out)
    return out


def _round(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def print_summary(run: Run, summary: dict) -> None:
    table = Table(title=f"run {run.run_dir}")
    table.add_column("metric", style="cyan")
    table.add_column("value")
    final = summary["final"] or {}
    rows = [
        ("steps", str(summary["steps"])),
        ("trained tokens", f"{summary['trained_tokens']:,}"),
        ("trained tokens/s", f"{summary['tokens_per_second']:.1f}"),
        ("padding share", f"{100 * summary['padding_share']:.1f}%"),
        # What peak_memory_bytes counts: CUDA's allocated tensors (the plan's "peak (step's tensors)" counts the
        # same), else the process's peak RSS, which adds the Python runtime, torch and the data to the tensors.
        ("peak memory, CUDA tensors", f"{format_bytes(summary['peak_memory_bytes'])} (the plan's count)")
        if run.device.type == "cuda" else
        ("peak memory, process RSS", f"{format_bytes(summary['peak_memory_bytes'])} (Python, libraries, tensors)"),
        ("first → final val loss", f"{_round(summary['first_val_loss'])} → {_round(final.get('val_loss'))}"),
        ("best val loss (step)", f"{_round(summary['best_val_loss'])} ({summary['best_step']})"),
    ]
    if "val_macro_f1" in final:
        rows.append(("val accuracy / macro-F1", f"{final['val_accuracy']:.3f} / {final['val_macro_f1']:.3f}"))
    rows += summary_rows(summary["cost"])
    for k, v in rows:
        table.add_row(k, v)
    run.console.print(table)
    for sample in summary["samples"]:
        run.console.print(f"[dim]prompt:[/] {sample['prompt']!r}\n[green]generated:[/] {sample['generated']!r}")


def cleanup(run: Run, failed: bool = False) -> None:
    """Restore signal handlers, close the metrics, plot the losses, release the run folder."""
    try:
        for sig, previous in run.previous_handlers.items():
            signal.signal(sig, previous)
        run.metrics.close(failed)
        metrics = run.run_dir / "metrics.jsonl"
        if metrics.is_file() and run.world.is_main:
            try:
                plot_losses(metrics, run.run_dir / "loss.png")
            except Exception as e:  # noqa: BLE001 - a plot must not hide the error that ended the run
                if not failed:
                    raise
                run.console.print(f"[yellow]warning:[/] could not write {run.run_dir / 'loss.png'}: {e}")
    finally:
        run.held.close()


@ckpt.disk_full_is_one_error
def run_training(recipe: Recipe, resume: bool = False, overwrite: bool = False,
                 console: Console | None = None) -> dict:
    run = setup(recipe, resume=resume, overwrite=overwrite, console=console)
    failed = True
    try:
        if run.state.step == 0:
            run_eval(run)  # the starting point of the validation curve (eval uses no randomness)
        summary = train(run)
        failed = False
        return summary
    finally:
        cleanup(run, failed)
