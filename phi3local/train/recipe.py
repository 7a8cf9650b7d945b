"""The training recipe: setup() -> train() -> cleanup(), read top to bottom.

A custom PyTorch loop (no HF Trainer): 4-bit QLoRA model from `phi3local.model.load`, epoch plans from
`phi3local.train.batching`, atomic checkpoints from `phi3local.train.checkpoint`, the live panel from
`phi3local.train.display`, the metrics sinks from `phi3local.train.metrics`. What depends on the recipe's
`task` (documents, collate, loss and its units, step metrics, evaluation, samples) is the task's, called
through `phi3local.train.tasks.base.Task` (`phi3local.train.tasks.task_for(recipe)`); this loop never asks
which task it runs.
"""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from phi3local import folders
from phi3local.config import Recipe, flatten_keys
from phi3local.cost import EnergyMeter, run_summary_fields, summary_rows
from phi3local.errors import Phi3LocalError
from phi3local.model.flops import StepFlops, measured_matmul_peak
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
from phi3local.model.tokenizer import stop_token_ids
from phi3local.train import auto_settings, distributed
from phi3local.train import checkpoint as ckpt
from phi3local.train.batching import collate, plan_epoch, resolved_pad_to_multiple_of, rows_for_attention  # noqa: F401
from phi3local.train.display import TrainDisplay, peak_memory_bytes
from phi3local.train.memory_plan import plan_table, resolved_optimizer
from phi3local.train.metrics import MetricsLog, NullMetricsLog
from phi3local.train.plots import plot_losses
from phi3local.train.tasks import Documents, task_for
from phi3local.train.tasks.base import add_stats
from phi3local.train.tasks.classification import classification_metrics  # noqa: F401 (its old home)
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


@dataclass
class Run:
    recipe: Recipe
    run_dir: Path
    console: Console
    tokenizer: object
    loaded: LoadedModel
    train_docs: Documents  # the task's documents (Documents, or a preference task's pairs)
    val_docs: Documents
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: ckpt.TrainerState
    total_steps: int
    step_flops: StepFlops
    peak_flops: float
    metrics: MetricsLog
    world: distributed.World = field(default_factory=distributed.World)  # this process among the ranks
    # Several ranks: the model under DistributedDataParallel or fully_shard (World.wrap); None for one process.
    # `model` stays the PEFT model (under fsdp its parameters are shards: evaluation, checkpoints and the adapter go
    # through the engine).
    engine: distributed.DataParallel | distributed.FullyShardedParallel | None = None
    stop_signal: list[int] = field(default_factory=list)
    previous_handlers: dict = field(default_factory=dict)
    held: ExitStack = field(default_factory=ExitStack)  # the run folder's lock, released in cleanup()

    @property
    def model(self):
        return self.loaded.model

    @functools.cached_property
    def task(self):  # built once: the training step asks for it every micro-batch
        return task_for(self.recipe)

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


def check_label_mask(docs, tokenizer, task: str) -> None:
    """The task's check that its documents leave something to learn (causal LM: the label mask)."""
    task_for(task).check(docs, tokenizer)


def make_optimizer(model, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameters: enable lora or list modules in lora.modules_to_save")
    choice = resolved_optimizer(recipe, device.type)
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
    plan = epoch_plan(recipe, docs.lengths, 0)
    steps_per_epoch = math.ceil(len(plan) / (recipe.training.grad_accum * world_size))
    total = recipe.training.max_steps or recipe.training.epochs * steps_per_epoch
    return total, steps_per_epoch


def decide_auto_settings(recipe: Recipe, docs: Documents, console: Console, world: distributed.World) -> Recipe:
    """The recipe with its `auto` settings decided; prints the memory plan and why each auto chose what it did."""
    resolved, report, reasons = auto_settings.resolve(recipe, docs.lengths, device=pick_device().type)
    if world.distributed:  # every rank must plan the same batches: what fits on all of them
        t = resolved.training
        choices = world.gather_lists([(t.micro_batch_size, t.gradient_checkpointing, resolved.data.pad_to_multiple_of,
                                       t.selective_checkpointing)])
        t.micro_batch_size = min(choice[0] for choice in choices)
        t.gradient_checkpointing = any(choice[1] for choice in choices)
        resolved.data.pad_to_multiple_of = choices[0][2]  # rank 0's: equal widths on every rank
        t.selective_checkpointing = all(choice[3] is True for choice in choices)
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
        if resume and world.is_main:
            ckpt.restore_renamed_checkpoints(run_dir)  # a repair: a step a kill left renamed aside counts
        # Checked before anything else in the run folder changes: a refused resume leaves it as it was.
        checkpoint = checkpoint_to_resume(recipe, run_dir, console) if resume else None
        if world.is_main:
            ckpt.clean_stale_temporaries(run_dir)  # safe: the lock says no other process is saving here
            folders.write_text_atomic(run_dir / "recipe.yaml",
                              recipe.to_yaml() + "\n# versions: " + json.dumps(ckpt.package_versions()) + "\n")
        seed_everything(recipe.seed)
        if recipe.model.adapter:  # checked before the data is prepared (load_model uses what it checks)
            from phi3local.model.load import check_start_adapter
            check_start_adapter(recipe, resolve_model_path(recipe.model.name_or_path))

        tokenizer = load_tokenizer(recipe.model.tokenizer or resolve_model_path(recipe.model.name_or_path),
                                   revision=None if recipe.model.tokenizer else recipe.model.revision)
        prepared = prepare(recipe, tokenizer, console=console)
    train_ds, val_ds = load_prepared(prepared.out_dir)
    task = task_for(recipe)
    train_docs, val_docs = task.documents(train_ds), task.documents(val_ds)
    if not len(train_docs):
        raise TrainingError(f"no training rows after prepare (see {prepared.out_dir / 'stats.json'})")
    task.check(train_docs, tokenizer)
    if checkpoint is not None:
        recipe = auto_settings.adopt_saved_choices(recipe, checkpoint.recipe)
    recipe = decide_auto_settings(recipe, train_docs, console, world)  # before loading: refuses a plan that won't fit
    if not len(val_docs):
        console.print(f"[yellow]warning:[/] no validation rows ({len(train_docs)} training rows, "
                      f"data.val_fraction={recipe.data.val_fraction}): the validation loss is not measured", soft_wrap=True)
    total_steps, _ = count_total_steps(recipe, train_docs, world.size)
    if total_steps < 1:
        raise TrainingError("this recipe trains zero steps (training.epochs, training.max_steps); nothing to do")

    loaded = load_model(recipe, tokenizer, world.device)
    if recipe.data.packing == "auto":  # timed on the loaded model: one micro-batch each way
        recipe = decide_packing(recipe, train_docs, loaded, tokenizer.pad_token_id, console, world)
        total_steps, _ = count_total_steps(recipe, train_docs, world.size)
    for docs in (train_docs, val_docs):  # work on the documents that needs the model (preference: reference log-probs)
        task.prepare(loaded.model, docs, document_batches(recipe, task, docs, loaded.model, tokenizer.pad_token_id,
                                                          loaded.device),
                     chunk_size=recipe.training.loss_chunk_size)
    if recipe.training.compile:
        # Compiles the decoder stack in place; the chunked loss and lm_head stay eager.
        base_causal_lm(loaded.model).model.compile()
    console.print(f"[bold]model[/] {loaded.base_path}  attention={loaded.attn_implementation}  "
                  f"dtype={loaded.compute_dtype}  device={loaded.device}  "
                  f"4-bit={recipe.quantization.load_in_4bit}")
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    console.print(f"trainable parameters: {trainable:,}")
    # Wrapped before the optimizer is built: fully_shard replaces the parameters with their shards.
    # DDP broadcasts rank 0's adapter to every rank
    engine = world.wrap(loaded.model, recipe.training.parallelism, recipe.training.fsdp_cpu_offload)
    if isinstance(engine, distributed.FullyShardedParallel):
        console.print(f"sharded data parallel: {world.size} ranks ({world.backend}), {engine.engine} per decoder layer "
                      f"and the root; frozen weights held per rank {format_bytes(max(engine.bytes_held['frozen_per_rank']))}"
                      f" of {format_bytes(engine.bytes_held['frozen_full'])}"
                      f"{' in host memory (fsdp_cpu_offload)' if engine.cpu_offload else ''}",
                      soft_wrap=True, highlight=False)
    elif engine is not None:
        console.print(f"data parallel: {world.size} ranks ({world.backend}), {engine.engine}, gradients summed by "
                      "a comm hook", soft_wrap=True, highlight=False)
    optimizer = make_optimizer(loaded.model, recipe, loaded.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_steps))
    state = ckpt.TrainerState(data_sha256={k: v["sha256"] for k, v in prepared.stats["inputs"].items()},
                              world_size=world.size)
    if checkpoint is not None:
        trained_by = checkpoint.trainer_state.get("world_size", 1)
        if trained_by != world.size:
            raise TrainingError(f"{checkpoint.path} was trained by {trained_by} process(es), this run has "
                                f"{world.size}: the global batch would change; resume with {trained_by}")
        state = ckpt.restore(checkpoint, loaded.model, optimizer, scheduler,
                             load_sharded=engine.load_sharded if isinstance(engine, distributed.FullyShardedParallel)
                             else None)
        console.print(f"resumed from {checkpoint.path} (step {state.step})", soft_wrap=True)
    elif resume:
        console.print("--resume: no checkpoint yet, starting from step 0")

    config = base_causal_lm(loaded.model).config
    step_flops = task.step_flops(config, train_docs, recipe.lora)
    # MFU over the whole job: every rank's tokens against every rank's device.
    peak = (recipe.training.peak_flops or measured_matmul_peak(loaded.device, loaded.compute_dtype)) * world.size
    metrics = open_metrics(recipe, run_dir) if world.is_main else NullMetricsLog()
    run = Run(recipe, run_dir, console, tokenizer, loaded, train_docs, val_docs, optimizer, scheduler, state,
              total_steps, step_flops, peak, metrics, world=world, engine=engine, held=held)
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

def forward_loss(recipe: Recipe, model, batch, count_correct: bool = False):
    """The task's loss of one micro-batch: (loss sum over its units, correct count or None, classification
    logits or None)."""
    loss_sum, stats = task_for(recipe).loss(model, batch, chunk_size=recipe.training.loss_chunk_size,
                                            count_correct=count_correct)
    return loss_sum, stats.get("correct"), stats.get("logits")


def epoch_plan(recipe: Recipe, lengths: list[int], epoch: int, packing: bool | None = None) -> list[list[list[int]]]:
    """The micro-batches of one epoch (rows of document indices): a pure function of (recipe, lengths, epoch)."""
    task = task_for(recipe)
    packing = bool(recipe.data.packing) and task.packs if packing is None else packing
    return plan_epoch(lengths, task.row_capacity(recipe.data.max_seq_len), recipe.training.micro_batch_size, packing,
                      recipe.seed, epoch, long_from=long_from(recipe))


def next_micro_batches(recipe: Recipe, state: ckpt.TrainerState, docs, plans: dict[int, list], *,
                       world: distributed.World, pad_id: int, sizes: dict) -> list:
    """This rank's micro-batches of the next optimizer step (grad_accum per rank) over the training `docs`; a step
    never crosses an epoch boundary. Advances `state`'s data position; `plans` caches the current epoch's plan.
    sizes: collate's width rounding (`widths`)."""
    s = state
    if s.epoch not in plans:
        plans.clear()
        plans[s.epoch] = epoch_plan(recipe, docs.lengths, s.epoch)
    plan = plans[s.epoch]
    chosen = plan[s.batch_in_epoch : s.batch_in_epoch + recipe.training.grad_accum * world.size]
    s.batch_in_epoch += len(chosen)
    if s.batch_in_epoch >= len(plan):
        s.epoch, s.batch_in_epoch = s.epoch + 1, 0
    return collate_rows(task_for(recipe), world.share(chosen), docs, pad_id, recipe, sizes)


def collate_rows(task, plan: list, docs, pad_id: int, recipe: Recipe, widths: dict) -> list:
    """The task's micro-batches of planned rows, with the LongRoPE position limit and the width rounding."""
    limit = long_from(recipe)
    return [task.collate(rows, docs, pad_id, position_limit=limit, **widths) for rows in plan]


def widths(recipe: Recipe, model, device: torch.device) -> dict:
    """collate's width rounding: data.pad_to_multiple_of, never past the model's positions."""
    return {"pad_to_multiple_of": resolved_pad_to_multiple_of(recipe.data.pad_to_multiple_of, device.type),
            "max_width": base_causal_lm(model).config.max_position_embeddings}


def document_batches(recipe: Recipe, task, docs, model, pad_id: int, device: torch.device):
    """Every document of `docs` once (epoch 0's plan), collated on `device`, one micro-batch at a time."""
    limit, sizes = long_from(recipe), widths(recipe, model, device)
    for rows in epoch_plan(recipe, docs.lengths, 0) if len(docs) else []:
        yield task.collate(rows, docs, pad_id, position_limit=limit, **sizes).to(device)


@dataclass
class StepResult:
    """One optimizer step: the mean loss over its units, the gradient norm before clipping, the step's units
    (over all ranks) and the task's stats summed over this rank's micro-batches (`step_metrics` sums them over
    the ranks). Unpacks as (loss, grad_norm)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    units: int = 0  # over all ranks
    stats: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.loss, self.grad_norm))


def train_step(run: Run, batches: list) -> StepResult:
    """One optimizer step of the run (its task, model, optimizer, scheduler, world) over `batches`."""
    t = run.recipe.training
    return optimizer_step(run.task, run.engine or run.model, batches, run.optimizer, run.scheduler, run.world,
                          device=run.device, max_grad_norm=t.max_grad_norm, chunk_size=t.loss_chunk_size,
                          offload_activations=t.offload_activations, step=run.state.step + 1,
                          sources=run.train_docs.sources if run.train_docs is not None else ())


def optimizer_step(task, model, batches: list, optimizer, scheduler, world: distributed.World, *,
                   device: torch.device, max_grad_norm: float, chunk_size: int, offload_activations: bool = False,
                   step: int = 0, sources: list[str] = ()) -> StepResult:
    """One optimizer step over grad_accum micro-batches (on each rank), normalised by the task's units of the
    whole step (over all ranks): trained tokens, examples or pairs.

    model: the bare model (one process) or World.wrap's engine (several ranks): DataParallel, where
    DistributedDataParallel sums the gradients over the ranks in the backward of each rank's last micro-batch (the
    others run under no_sync), or FullyShardedParallel, where fully_shard reduce-scatters them after every backward
    and a rank with fewer micro-batches runs zero-weight passes to keep the ranks in step.
    step and sources: only for the message when the loss or gradient is not finite (the step's number, the
    documents' file:line)."""
    engine = distributed.engine_for(model, world)
    model = engine.model
    (units,) = world.sum_ints([sum(task.units(b) for b in batches)])
    if units == 0:
        return StepResult(torch.zeros(()), torch.zeros(()))
    fillers = engine.fillers(len(batches))  # several ranks: zero-gradient passes that keep the ranks in step
    loss_total = torch.zeros((), device=device)
    per_batch = []
    stats: dict = {}
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        with engine.micro_batch(last=i == len(batches) - 1):
            with activation_offload(offload_activations, device):
                loss_sum, batch_stats = engine.forward(lambda m, b=batch: task.loss(m, b, chunk_size=chunk_size))
            engine.backward(loss_sum / units)
        per_batch.append(loss_sum.detach())
        loss_total += loss_sum.detach()
        add_stats(stats, batch_stats)
    for _ in range(fillers):
        engine.idle()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_total = world.sum_tensor(loss_total)  # the step's loss sum over the ranks
    grad_norm = engine.clip_grad_norm(params, max_grad_norm or float("inf"))
    # One host sync per optimizer step: a non-finite loss must stop the run before it poisons the weights.
    if not bool(torch.isfinite(loss_total) & torch.isfinite(grad_norm)):
        bad = [b for b, loss in zip(batches, per_batch) if not torch.isfinite(loss)] or batches
        shown = [sources[d] for b in bad for d in b.doc_ids][:10]
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (loss sum {float(loss_total)}, "
            f"grad norm {float(grad_norm)}); documents in the batch: {shown}. Hint: lower training.lr, "
            "check those rows, or use compute_dtype=bfloat16 instead of float16")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=not engine.zero_grads_in_place)
    return StepResult(loss_total / units, grad_norm, units, stats)


def step_metrics(task, result: StepResult, world: distributed.World) -> dict:
    """The task's metrics of a logged step, its stats summed over the ranks (every rank calls this)."""
    if not task.metric_names:
        return {}
    stats = getattr(result, "stats", None) or {}  # none on a rank that had no micro-batch this step
    totals = world.sum_floats([float(stats.get(k, 0.0)) for k in task.metric_names])
    return task.step_metrics(dict(zip(task.metric_names, totals)), int(getattr(result, "units", 0)))


@torch.no_grad()
def evaluate(recipe: Recipe, model, docs, *, pad_id: int, device: torch.device, world: distributed.World,
             engine: distributed.DataParallel | distributed.FullyShardedParallel | None = None,
             max_batches: int = 0) -> dict:
    """The task's validation metrics of `model` over `docs` (always val_loss). engine: the training run's
    (World.wrap) when several ranks evaluate; None for one process (`phi3local eval`)."""
    if not len(docs):
        return {}
    task = task_for(recipe)
    was_training = model.training
    model.eval()
    plan = epoch_plan(recipe, docs.lengths, 0)
    if max_batches:
        plan = plan[:max_batches]
    limit, sizes = long_from(recipe), widths(recipe, model, device)
    share = world.share(plan)
    batches = (task.collate(rows, docs, pad_id, position_limit=limit, **sizes).to(device)
               for rows in share)  # one at a time
    engine = engine or distributed.Local(model)
    missing = math.ceil(len(plan) / world.size) - len(share)  # fsdp: filler forwards to the most any rank has
    try:
        return engine.evaluate(lambda m, own: task.evaluate(m, own, world, chunk_size=recipe.training.loss_chunk_size),
                               batches, missing)
    finally:
        model.train(was_training)


def sample_generations(recipe: Recipe, model, tokenizer, docs, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers to the first validation prompts (tasks whose adapter chats; none for the others)."""
    task = task_for(recipe)
    if not task.generates or count <= 0:
        return []
    return task.samples(model, docs, tokenizer, count, max_new_tokens)


# --------------------------------------------------------------------------------------------- train

def save(run: Run) -> Path:
    """Rank 0 writes the checkpoint (under ddp the ranks hold the same adapter and state); the others wait until it
    is written, so none ends the job while rank 0 still saves. Under fsdp every rank first writes its shards of the
    adapter and optimizer state into rank 0's temporary folder (torch.distributed.checkpoint), and the adapter is
    gathered whole for the checkpoint's peft folder."""
    path = run.run_dir / ckpt.CHECKPOINTS / f"step-{run.state.step}"
    sharded = isinstance(run.engine, distributed.FullyShardedParallel)
    adapter = adapter_state(run)
    tmp = None
    if sharded:
        named = [str(ckpt.temporary_folder(run.run_dir, run.state.step))] if run.world.is_main else []
        tmp = Path(run.world.gather_lists(named)[0])
        ckpt.write_shards(tmp, lambda folder: run.engine.save_sharded(run.optimizer, folder), run.run_dir,
                          remove=run.world.is_main)
    if run.world.is_main:
        path = ckpt.save_checkpoint(run.run_dir, run.model, None if sharded else run.optimizer, run.scheduler,
                                    run.state, run.recipe.to_yaml(), run.tokenizer, adapter_state=adapter, tmp=tmp)
        ckpt.prune_checkpoints(run.run_dir, run.recipe.training.keep_checkpoints, run.state.best_step)
    run.world.barrier()
    return path


def adapter_state(run: Run) -> dict | None:
    """Under fsdp the trainable weights gathered whole (every rank calls it; peft saves them as a normal folder);
    None otherwise (peft reads them from the model)."""
    engine = run.engine
    return engine.full_adapter_state() if isinstance(engine, distributed.FullyShardedParallel) else None


def run_eval(run: Run) -> dict:
    result = evaluate(run.recipe, run.model, run.val_docs, pad_id=run.tokenizer.pad_token_id, device=run.device,
                      world=run.world, engine=run.engine, max_batches=run.recipe.eval.max_batches)
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
    r, s, task = run.recipe, run.state, run.task
    run.model.train()
    plans: dict[int, list] = {}
    sizes = widths(r, run.model, run.device)
    display = TrainDisplay(run.total_steps, r.training.display if run.world.is_main else "none", run.console)
    window_tokens = window_real = window_padded = 0
    window_start = time.perf_counter()
    run_start = time.perf_counter() - s.elapsed_seconds
    total_real = total_padded = 0
    energy = EnergyMeter(run.device.type, run.device.index)  # this session's energy (a resumed run's earlier part is not in it)
    with display:
        while s.step < run.total_steps:
            batches = next_micro_batches(r, s, run.train_docs, plans, world=run.world,
                                         pad_id=run.tokenizer.pad_token_id, sizes=sizes)
            try:
                result = train_step(run, batches)
                loss, grad_norm = result
            except torch.OutOfMemoryError as e:
                raise TrainingError(
                    f"out of GPU memory at step {s.step + 1} (micro_batch_size={r.training.micro_batch_size}, "
                    f"max_seq_len={r.data.max_seq_len}, gradient_checkpointing={r.training.gradient_checkpointing})."
                    " Lower training.micro_batch_size (raise training.grad_accum to keep the batch), lower "
                    "data.max_seq_len, or turn on training.gradient_checkpointing=true (and for long rows "
                    "training.offload_activations=true); `phi3local plan RECIPE` shows what fits") from e
            s.step += 1
            tokens, real, padded = run.world.sum_ints([
                sum(task.trained_tokens(b) for b in batches),
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
                    **step_metrics(task, result, run.world),
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
    # Rank 0 generates alone; under fsdp it would need the other ranks' shards at every token, so none are made.
    sharded = isinstance(run.engine, distributed.FullyShardedParallel)
    samples = sample_generations(r, run.model, run.tokenizer, run.val_docs,
                                 r.eval.generate_samples if run.world.is_main and not sharded else 0,
                                 r.eval.max_new_tokens)
    if sharded and r.eval.generate_samples:
        run.console.print("[dim]eval.generate_samples: none under training.parallelism=fsdp (chat with the adapter "
                          "instead)[/]", soft_wrap=True, highlight=False)
    save(run)
    adapter = adapter_state(run)
    if not run.world.is_main:  # rank 0 alone writes the adapter and the summary
        return {"rank": run.world.rank, "steps": s.step}
    save_adapter(run, adapter)
    summary = {
        "steps": s.step, "trained_tokens": s.trained_tokens, "seconds": s.elapsed_seconds,
        "tokens_per_second": s.trained_tokens / max(s.elapsed_seconds, 1e-9),
        "padding_share": 1.0 - total_real / max(total_padded, 1),
        "peak_memory_bytes": peak_memory_bytes(run.device), "first_val_loss": None,
        "best_val_loss": s.best_val_loss, "best_step": s.best_step, "final": final, "samples": samples,
        "attn_implementation": run.loaded.attn_implementation,
        "data_parallel": run.engine.describe() if run.engine is not None else None,
        "cost": run_summary_fields(s.elapsed_seconds, s.trained_tokens, r.training.usd_per_device_hour,
                                   run.device.type, run.peak_flops, energy, devices=run.world.size),
    }
    vals = [h["val_loss"] for h in s.history if "val_loss" in h]
    summary["first_val_loss"] = vals[0] if vals else None
    folders.write_text_atomic(run.run_dir / "summary.json", json.dumps(summary, indent=2))
    folders.write_text_atomic(run.run_dir / "trainer_state.json", json.dumps(ckpt.asdict(s), indent=2))
    print_summary(run.run_dir, summary, run.console, run.device, task)
    return summary


def save_adapter(run: Run, state: dict | None = None) -> Path:
    """The final adapter: a peft folder with tokenizer and a generation_config listing every stop id. state: the
    adapter's weights gathered whole (fsdp, `adapter_state`); None: peft reads them from the model."""
    from transformers import GenerationConfig

    out = run.run_dir / "adapter"
    with folders.staged(out) as tmp:  # the run folder is ours (locked): no stage check
        run.model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        run.tokenizer.save_pretrained(tmp)
        if run.task.generates:
            try:
                gen = GenerationConfig.from_pretrained(
                    run.loaded.base_path, **revision_kwargs(run.loaded.base_path, run.recipe.model.revision))
            except OSError:
                gen = GenerationConfig()
            gen.eos_token_id = stop_token_ids(run.tokenizer)
            gen.pad_token_id = run.tokenizer.pad_token_id
            gen.save_pretrained(tmp)
    return out


def _round(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def print_summary(run_dir: Path, summary: dict, console: Console, device: torch.device, task=None) -> None:
    table = Table(title=f"run {run_dir}")
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
        if device.type == "cuda" else
        ("peak memory, process RSS", f"{format_bytes(summary['peak_memory_bytes'])} (Python, libraries, tensors)"),
        ("first → final val loss", f"{_round(summary['first_val_loss'])} → {_round(final.get('val_loss'))}"),
        ("best val loss (step)", f"{_round(summary['best_val_loss'])} ({summary['best_step']})"),
    ]
    rows += task.summary_rows(final) if task is not None else []
    rows += summary_rows(summary["cost"])
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for sample in summary["samples"]:
        console.print(f"[dim]prompt:[/] {sample['prompt']!r}\n[green]generated:[/] {sample['generated']!r}")


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
        if not failed:
            run.world.barrier()  # see World.close: no rank tears the group down while a peer is still in it
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
