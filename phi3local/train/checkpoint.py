"""Atomic, self-contained, verifiable checkpoints and exact resume.

A checkpoint folder is written under a temporary name and renamed only when every file is on disk,
so a crash or kill during a save leaves the previous checkpoint as the latest complete one. Its
`checksums.json` (sha256 and size of every other file) is written last; resume verifies it and falls
back to the previous intact checkpoint when the latest was damaged. Nothing is unpickled on load:
optimizer, scheduler and RNG states hold only tensors and plain values, read with `weights_only=True`,
so a checkpoint handed over from elsewhere cannot run code.

Under `training.parallelism: fsdp` the optimizer state and the adapter are sharded over the ranks: every rank
writes its shards into the temporary folder's `sharded/` through torch.distributed.checkpoint (`write_shards`),
then rank 0 writes the rest, with the adapter gathered whole into the usual peft folder (merge and export read it
unchanged); the checksums cover the shards too, and such a checkpoint resumes only under fsdp on the same number
of ranks (`restore`'s load_sharded).

A full disk (or quota) while writing is one CheckpointError naming the file, never a traceback: torch's
zip writer only says "iostream error" / "unexpected pos" when it writes to a path itself, so tensors are
written through a Python file object, whose OSError(ENOSPC) torch keeps in the exception's context.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from phi3local import folders, versions
from phi3local.config import Recipe, flatten_keys
from phi3local.errors import Phi3LocalError

CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
CHECKSUMS = "checksums.json"
SHARDED = "sharded"  # fsdp: torch.distributed.checkpoint's folder of every rank's adapter and optimizer shards
STEP_NAME = re.compile(r"step-\d+")
# Recipe keys that may change between a checkpoint and its resume: they do not change what is trained.
# data.pad_to_multiple_of changes only the batches' widths (masked, untrained pads), not their documents,
# order or losses (up to float rounding), so its `auto` is re-decided for the device resumed on.
RESUME_MAY_CHANGE = ("output_dir", "data.prepared_dir", "data.pad_to_multiple_of", "training.display",
                     "training.log_every",
                     "training.checkpoint_every", "training.keep_checkpoints", "training.on_damaged_checkpoint",
                     "training.peak_flops", "training.trackers", "training.distributed_timeout_seconds", "eval.", "export.",
                     "azure.")


class CheckpointError(Phi3LocalError):
    """A checkpoint cannot be written or trusted; the message names the file."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch comes from
    batch_in_epoch: int = 0  # index of the next micro-batch within that epoch's plan
    trained_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    finished: bool = False
    elapsed_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # validation results so far
    data_sha256: dict[str, str] = field(default_factory=dict)  # sha256 of each input data file
    world_size: int = 1  # processes that trained it (the global batch is world_size x micro-batch x grad_accum)


def package_versions() -> dict[str, str]:
    return versions.package_versions(
        ("phi3local", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"))


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (numpy's key array becomes a tensor)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos,
                                                    has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    table = {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    (folder / CHECKSUMS).write_text(json.dumps({"files": table}, indent=1))


def verify(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder (missing, truncated or changed files); empty when intact."""
    manifest = Path(folder) / CHECKSUMS
    try:
        table = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{manifest}: missing or unreadable, so the checkpoint cannot be verified"]
    problems = []
    for name, expected in table.items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {expected['bytes']} when written (truncated?)")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: contents changed since it was written (checksum mismatch)")
    return problems


def temporary_folder(run_dir: Path, step: int) -> Path:
    """Where a checkpoint of `step` is written before its rename (named by the writing process: rank 0's)."""
    return Path(run_dir) / CHECKPOINTS / f"{TMP_PREFIX}step-{step}-{os.getpid()}"


def write_shards(tmp: Path, write, run_dir: Path, remove: bool) -> None:
    """write(tmp/sharded): every rank's shards (a collective writer). On failure the folder is removed (by the rank
    that owns it, `remove`) and a full disk is one CheckpointError."""
    try:
        write(tmp / SHARDED)
    except BaseException as e:
        full = _is_disk_full(e, tmp.parent)
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(disk_full_message(tmp / SHARDED, run_dir)) from e
        raise


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, state: TrainerState, recipe_yaml: str, tokenizer=None, *,
    adapter_state: dict | None = None, tmp: Path | None = None,
) -> Path:
    """Write and rename one checkpoint. optimizer None: its state is in tmp/sharded already (fsdp, `write_shards`);
    adapter_state: the adapter's weights gathered whole (fsdp), else peft reads them from the model."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    given = tmp is not None
    tmp = tmp if given else temporary_folder(run_dir, state.step)
    writing = tmp
    try:
        if not given:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        writing = tmp / "adapter"
        model.save_pretrained(writing, **({"state_dict": adapter_state} if adapter_state is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(writing)
        states = [("scheduler.pt", scheduler.state_dict()), ("rng.pt", rng_state())]
        if optimizer is not None:
            states.insert(0, ("optimizer.pt", optimizer.state_dict()))
        for name, obj in states:
            writing = tmp / name
            save_tensors(obj, writing)
        for name, text in (("trainer_state.json", json.dumps(asdict(state), indent=2)), ("recipe.yaml", recipe_yaml),
                           ("versions.json", json.dumps(package_versions(), indent=2))):
            writing = tmp / name
            writing.write_text(text)
        writing = tmp / CHECKSUMS
        write_checksums(tmp)
        _fsync_tree(tmp)
    except BaseException as e:
        full = _is_disk_full(e, root)  # before the half-written folder is removed and frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(disk_full_message(writing, run_dir)) from e
        raise
    folders.replace_dir(tmp, final)  # over a re-save of the same step (e.g. the final step after a signal)
    return final


def save_tensors(obj, path: Path) -> None:
    """torch.save through a Python file object: a failed write raises (in the exception's context) the OSError
    that says why, e.g. ENOSPC, where torch's own file writer raises only RuntimeError("iostream error")."""
    with open(path, "wb") as f:
        torch.save(obj, f)


# Below this much free space, a write that failed without saying why (torch's zip writer given a path)
# failed because the disk is full.
NEARLY_FULL_BYTES = 1 << 20
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded")


def _is_disk_full(e: BaseException, folder: Path | None = None) -> bool:
    """Whether e (or an exception it wraps) is a full disk or quota: an OSError with errno ENOSPC or EDQUOT,
    a message that says so (safetensors, tokenizers and pyarrow wrap it in their own errors), or an I/O
    RuntimeError or OSError without errno while folder's filesystem has (nearly) no space left."""
    unexplained = False
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in DISK_FULL_MESSAGES):
            return True
        unexplained = unexplained or isinstance(e, RuntimeError) or (isinstance(e, OSError) and e.errno is None)
        e = e.__cause__ or e.__context__
    return unexplained and folder is not None and _free_bytes(folder) < NEARLY_FULL_BYTES


def _free_bytes(folder: Path) -> float:
    """Bytes an unprivileged process may still write on folder's filesystem (infinite when unknown)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows) or no such folder
        return float("inf")
    if st.f_blocks == 0:  # a filesystem that reports no sizes (some FUSE and network mounts)
        return float("inf")
    return st.f_bavail * st.f_frsize


def _written_file(e: BaseException) -> str | None:
    """The file named by the first OSError in e's chain that names one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
        e = e.__cause__ or e.__context__
    return None


def disk_full_is_one_error(run):
    """Decorate run(recipe, ...), which writes into recipe.output_dir: a full disk anywhere in it (data
    preparation, metrics.jsonl, a checkpoint, the final adapter, summary.json, loss.png) becomes one
    CheckpointError naming the file, instead of whatever OSError or RuntimeError the writer raised."""

    @functools.wraps(run)
    def wrapper(recipe, *args, **kwargs):
        try:
            return run(recipe, *args, **kwargs)
        except Phi3LocalError:
            raise
        except Exception as e:
            run_dir = Path(recipe.output_dir)
            if not _is_disk_full(e, run_dir):
                raise
            raise CheckpointError(disk_full_message(_written_file(e) or f"a file in {run_dir}", run_dir)) from e

    return wrapper


def disk_full_message(written, run_dir: Path) -> str:
    """The one line for a full disk: the file being written, what is still intact, what to do."""
    done = list_checkpoints(run_dir)
    kept = f"the last complete checkpoint {done[-1]} is intact" if done else "no checkpoint was written yet"
    return f"no space left on device while writing {written}; {kept}: free some space and run the same command " \
           "with --resume"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    # Only our own names: a user's `step-3.bak` copy beside them is neither listed nor pruned.
    done = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and STEP_NAME.fullmatch(p.name)
            and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def restore_renamed_checkpoints(run_dir: Path) -> None:
    """Put back a checkpoint a kill left renamed aside while the same step was saved again
    (`.step-N.old-*`, folders.replace_dir): before a resume picks its checkpoint, so it sees that step."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for step in {old.name[1:].split(".old-", 1)[0] for old in root.glob(".step-*.old-*")}:
            folders.settle(root / step)


def clean_stale_temporaries(run_dir: Path) -> None:
    """What a crash left in the run folder (call it holding the run's lock: nothing else writes there):
    checkpoints being written, and the adapter's or a re-saved checkpoint's staging (`folders.settle`)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
    restore_renamed_checkpoints(run_dir)
    folders.settle(Path(run_dir) / "adapter")
    shutil.rmtree(Path(run_dir) / ".tmp-adapter", ignore_errors=True)  # the adapter staging folder of earlier releases


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    ckpts = list_checkpoints(run_dir)
    keep = {p for p in ckpts[-keep_last:]} if keep_last > 0 else set(ckpts)
    for p in ckpts:
        if p not in keep and (best_step is None or p.name != f"step-{best_step}"):
            shutil.rmtree(p)


@dataclass
class Checkpoint:
    """A checkpoint read whole into memory, so a damaged file shows before anything is restored from it."""

    path: Path
    adapter_weights: dict
    optimizer: dict | None  # None: the optimizer state is in `sharded`
    scheduler: dict
    rng: dict
    trainer_state: dict
    recipe: dict
    sharded: Path | None = None  # fsdp: the adapter and optimizer shards (torch.distributed.checkpoint's folder)


def read_checkpoint(path: Path) -> Checkpoint:
    """Every file of a checkpoint, parsed; a CheckpointError names the file that cannot be read."""
    import yaml
    from safetensors.torch import load_file

    path = Path(path)
    sharded = path / SHARDED if (path / SHARDED).is_dir() else None

    def read(name: str, loader):
        try:
            return loader(path / name)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the parser raises, the file is what is wrong
            raise CheckpointError(f"{path / name} cannot be read: {str(e).splitlines()[0][:200]}") from e

    return Checkpoint(
        path=path,
        adapter_weights=read("adapter/adapter_model.safetensors", lambda p: load_file(str(p))),
        optimizer=None if sharded else read("optimizer.pt", _load_plain),
        scheduler=read("scheduler.pt", _load_plain),
        rng=read("rng.pt", _load_plain),
        trainer_state=read("trainer_state.json", lambda p: _mapping(json.loads(p.read_text()), p)),
        recipe=read("recipe.yaml", lambda p: _mapping(yaml.safe_load(p.read_text()), p)),
        sharded=sharded,
    )


def _mapping(value, path: Path) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    return value


def find_resumable(run_dir: Path, on_damaged: str = "previous", warn=print) -> Checkpoint | None:
    """The newest checkpoint that passes its checksums and reads whole; damaged ones are reported (and
    skipped, or fatal with on_damaged="stop")."""
    checkpoints = list_checkpoints(run_dir)
    for path in reversed(checkpoints):
        problems = verify(path)
        if not problems:
            try:
                return read_checkpoint(path)
            except CheckpointError as e:
                problems = [str(e)]
        detail = "; ".join(problems[:3])
        if on_damaged == "stop":
            raise CheckpointError(f"checkpoint {path} is damaged ({detail}); stopping as "
                                  "training.on_damaged_checkpoint=stop asks")
        warn(f"checkpoint {path} is damaged ({detail}); trying the one before it")
    if checkpoints:
        raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS}: all {len(checkpoints)} "
                              "are damaged; start again with --overwrite")
    return None


def recipe_changes(saved_recipe: dict, recipe_dict: dict) -> list[str]:
    """Keys whose value differs from the recipe a checkpoint was trained with ('key: old -> new')."""
    saved, now = flatten_keys(saved_recipe), flatten_keys(recipe_dict)
    defaults = flatten_keys(Recipe().to_dict())
    changed = []
    for key in sorted(set(saved) | set(now)):
        if key.startswith(RESUME_MAY_CHANGE) or saved.get(key) == now.get(key):
            continue
        if key not in saved and now.get(key) == defaults.get(key):
            continue  # a key newer than the checkpoint, left at its default: the run trained that way
        changed.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changed


def _load_plain(path: Path):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds pickled Python objects, not plain tensors; refusing to load it "
                              "(a checkpoint from elsewhere could run code)") from e


def restore(checkpoint: Checkpoint, model, optimizer, scheduler, load_sharded=None) -> TrainerState:
    """Put a checkpoint read by read_checkpoint into model, optimizer and scheduler; return its trainer state.

    load_sharded(optimizer, folder): under fsdp, the engine's reader of a sharded checkpoint's adapter and optimizer
    shards (every rank calls restore); None for one process or ddp, which read the whole adapter and optimizer."""
    from peft.utils import set_peft_model_state_dict

    if (checkpoint.sharded is None) != (load_sharded is None):
        written = "under training.parallelism=fsdp" if checkpoint.sharded is not None else "without fsdp"
        raise CheckpointError(f"{checkpoint.path} was written {written}: resume it with the training.parallelism "
                              "it was trained with")
    try:
        if load_sharded is not None:
            load_sharded(optimizer, checkpoint.sharded)
        else:
            result = set_peft_model_state_dict(model, checkpoint.adapter_weights)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise CheckpointError(f"{checkpoint.path}: adapter weights do not fit this model (unexpected: "
                                      f"{unexpected[:5]})")
            optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        set_rng_state(checkpoint.rng)
        return TrainerState(**checkpoint.trainer_state)
    except Phi3LocalError:  # already one line naming what failed (a rank, a file)
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{checkpoint.path} does not fit this run: {str(e).splitlines()[0][:200]}") from e
