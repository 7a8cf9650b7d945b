"""Several processes, one recipe: everything distributed the training recipe needs, behind one `World`.

A launcher starts one process per device and tells each who it is through the environment:
torchrun, `accelerate launch` and Azure ML's PyTorch distribution all set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Without them this is one process, and every method below returns at
once without touching torch.distributed (a single run behaves and costs exactly as before).

Data parallel QLoRA with torch's DistributedDataParallel (`training.parallelism: ddp`, `World.wrap`): every
rank holds the whole 4-bit base and its own copy of the adapter; a step's micro-batches are dealt out over the
ranks (`share`); each rank backpropagates its share normalised by the step's trained units summed over ranks
(`sum_ints`), under DDP's `no_sync` for all but its last micro-batch, and DDP sums the trainable gradients in
that last backward, bucket by bucket as they are ready (a comm hook that sums instead of DDP's average: the
loss is already divided by the units of every rank), so the optimizer sees the same gradient as one process
running all the step's micro-batches. A rank without a micro-batch (an epoch's uneven end) joins that backward
with zero gradients (`DataParallel.idle`).

Sharded data parallel with FSDP2 (`training.parallelism: fsdp`, `World.wrap` -> `FullyShardedParallel`, the
mechanics in `phi3local.train.fsdp`): every rank holds 1/N of the base, the adapter and the optimizer state;
each decoder layer is all-gathered for its forward and backward and its gradients reduce-scattered (summed) after
every backward. Every FSDP collective must meet its peers, so under fsdp the ranks run the same number of passes:
a rank with fewer micro-batches in a step (or evaluation batches) runs zero-weight filler passes.

gloo on CPU, NCCL on CUDA (one device per process, cuda:LOCAL_RANK), chosen here. Collectives time out
after `training.distributed_timeout_seconds`; a rank that dies closes its sockets, so the others fail
at their next collective within seconds, and rank 0 names the dead rank (same host) from the pids the
ranks register at start. A rank that hangs (alive, no progress) fails the others when their collective
times out; they name it when it is stopped (same host) or is the only other rank. torchrun then SIGTERMs
it and SIGKILLs it 30 s later if it does not exit (torch 2.13: a fixed 30 s for a failed group, whatever
--shutdown-timeout says): a hung job ends within distributed_timeout_seconds + ~30 s (tests/test_distributed.py).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch

from phi3local.errors import Phi3LocalError
from phi3local.train import fsdp

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_PID_KEY = "phi3local/pid/{}"
log = logging.getLogger(__name__)


class DistributedError(Phi3LocalError, RuntimeError):
    """The processes of a distributed run cannot start or went out of step; the message names the rank."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" once the process group is up; None for one process
    pids: dict = field(default_factory=dict, compare=False)  # rank -> (host, pid), for naming a dead rank
    timeout_seconds: float | None = field(default=None, compare=False)  # of a collective, once the group is up

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The rank's device; None for one process (the model loader picks it, as without a launcher)."""
        if not self.distributed:
            return None
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    @property
    def _comm_device(self) -> torch.device:
        return self.device or torch.device("cpu")

    # ------------------------------------------------------------------------------ data

    def share(self, items: Sequence) -> list:
        """This rank's share of a step's micro-batches: every size-th from its rank on.

        Over the ranks every item is taken exactly once; a rank may get none at an epoch's uneven end
        (it still joins the step's collectives).
        """
        return list(items[self.rank :: self.size]) if self.distributed else list(items)

    # ------------------------------------------------------------------------------ collectives

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Each value summed over the ranks (exact, int64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=self._comm_device)
        self._collective("sum counts", lambda: _dist().all_reduce(t))
        return [int(v) for v in t.tolist()]

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        self._collective("sum values", lambda: _dist().all_reduce(t))
        return t.tolist()

    def gather_lists(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (small, picklable items: predictions, labels)."""
        if not self.distributed:
            return items
        out: list = [None] * self.size
        self._collective("gather results", lambda: _dist().all_gather_object(out, items))
        return [x for part in out for x in part]

    def max_int(self, value: int) -> int:
        """The largest value over the ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device)
        self._collective("agree on the number of passes", lambda: _dist().all_reduce(t, op=_dist().ReduceOp.MAX))
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: how the ranks agree to stop after a signal."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._comm_device)
        self._collective("agree to stop", lambda: _dist().all_reduce(t, op=_dist().ReduceOp.MAX))
        return bool(t.item())

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks, in place, on its device (no host sync: the step's loss sum)."""
        if self.distributed:
            self._collective("sum the step's loss", lambda: _dist().all_reduce(t))
        return t

    def wrap(self, model: torch.nn.Module, parallelism: str = "ddp",
             cpu_offload: bool = False) -> DataParallel | FullyShardedParallel | None:
        """The model under torch's DistributedDataParallel (ddp) or FSDP2's fully_shard (fsdp; `cpu_offload`: the
        shards in host memory) when there are several ranks; None for one process. DDP's construction broadcasts
        rank 0's trainable parameters, so every rank starts from one adapter; FSDP keeps each rank's shard of what
        every rank loaded alike (the same files and seed)."""
        if not self.distributed:
            return None
        engine: list[DataParallel | FullyShardedParallel] = []
        if parallelism == "fsdp":
            self._collective("shard the model with fully_shard",
                             lambda: engine.append(FullyShardedParallel(model, self, cpu_offload)))
        else:
            self._collective("wrap the model in DistributedDataParallel", lambda: engine.append(DataParallel(model, self)))
        return engine[0]

    def barrier(self) -> None:
        if self.distributed:
            self._collective("wait for the other ranks", lambda: _dist().barrier())

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (claims the folder, prepares the data); the others wait for it and
        then run it themselves, or stop with rank 0's error when it failed."""
        if not self.distributed:
            yield
            return
        if self.is_main:
            try:
                yield
            except BaseException as e:
                self._tell_outcome(f"{type(e).__name__}: {e}")
                raise
            self._tell_outcome(None)
        else:
            error = self._tell_outcome(None)
            if error is not None:
                raise DistributedError(f"rank {self.rank}: rank 0 failed during setup ({error})")
            yield

    def require_shared(self, path) -> None:
        """A rank other than 0 must see what rank 0 wrote (its run folder), or it would train on other data."""
        if not os.path.exists(path):
            raise DistributedError(f"rank {self.rank} on {socket.gethostname()} does not see {path}, which rank 0 "
                                   "wrote: output_dir must be on a filesystem every node shares (NFS, Azure ML's "
                                   "mounted job output)")

    def _tell_outcome(self, error: str | None) -> str | None:
        message = [error]
        self._collective("wait for rank 0's setup", lambda: _dist().broadcast_object_list(message, src=0))
        return message[0]

    def close(self) -> None:
        """Tear the process group down (the end of a run, or its failure).

        At a run's normal end every rank passes a barrier first (`recipe.cleanup`): a rank that destroys its
        gloo group while its peer is still finishing the last collective aborts the peer ("terminate called
        without an active exception", 4 of 30 two-rank runs of the DDP toy test without it, 0 of 40 with it)."""
        if self.distributed and _dist().is_initialized():
            _dist().destroy_process_group()

    # ------------------------------------------------------------------------------ failures

    def _collective(self, what: str, call) -> None:
        """Run one collective; its failure becomes one line naming the rank to blame.

        gloo collectives fail here, synchronously. NCCL's run asynchronously: a hung peer is then ended by
        NCCL's own watchdog at the same timeout, with NCCL's message instead of this one (not tried here).
        """
        try:
            call()
        except DistributedError:  # already one line (a refusal, a nested collective's failure)
            raise
        except (RuntimeError, _dist().DistBackendError) as e:
            raise self.failure(what, e) from e

    def failure(self, what: str, e: BaseException) -> DistributedError:
        """A failed collective as one line naming the rank to blame, said at once (the launcher may end this
        process, SIGTERM, before the error reaches the CLI)."""
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0] if str(e) else type(e).__name__)[:120]
        timed_out = re.search(r"timed? ?out", str(e), re.IGNORECASE) is not None  # gloo and NCCL's wording
        error = DistributedError(f"rank {self.rank}: {self.who_failed(timed_out)} ({what}: {detail})")
        log.error("%s", error)
        return error

    def who_failed(self, timed_out: bool = False) -> str:
        """Which rank failed this one: dead or stopped ranks on this host; after a timeout, the only other
        rank (it hung); else a hint at the launcher's report."""
        here = {r: pid for r, (host, pid) in sorted(self.pids.items())
                if host == socket.gethostname() and r != self.rank}
        states = {r: _process_state(pid) for r, pid in here.items()}
        dead = [f"rank {r} (pid {here[r]})" for r, state in states.items() if state in (None, "Z", "X")]
        if dead:
            return ", ".join(dead) + (" is" if len(dead) == 1 else " are") + " dead"
        after = f" after {self.timeout_seconds:g} s" if self.timeout_seconds else ""
        timed = f"the collective timed out{after}" if timed_out else "the collective failed"
        stopped = [f"rank {r} (pid {here[r]})" for r, state in states.items() if state in ("T", "t")]
        if stopped:
            return (", ".join(stopped) + (" is" if len(stopped) == 1 else " are") +
                    f" stopped (SIGSTOP or a debugger): it hung, {timed}")
        others = [r for r in range(self.size) if r != self.rank]
        if timed_out and len(others) == 1:
            host, pid = self.pids.get(others[0], (None, None))
            where = f" (pid {pid} on {host})" if pid is not None else ""
            if host is not None and host != socket.gethostname():  # from here, a hang and a lost machine look alike
                return f"rank {others[0]}{where} did not answer: it hung, or its machine or network is gone; {timed}"
            return f"rank {others[0]}{where} did not answer: it hung, {timed}"
        if timed_out:
            return f"{timed}: another rank hung (the launcher's log names it)"
        return "another rank stopped answering (it died, hung or was killed; the launcher's log names it)"


class _LossModule(torch.nn.Module):
    """What DistributedDataParallel wraps: the PEFT model, and forward(fn) = fn(model).

    The tasks' losses call the base's decoder directly (a chunked loss over hidden states, not model.forward),
    and DDP reduces the gradients of a backward only after a pass through its own forward: this makes any
    task's loss such a pass, with the task unaware of DDP."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


class DataParallel:
    """The PEFT model under torch.nn.parallel.DistributedDataParallel (`World.wrap`, several ranks).

    - DDP registers only the parameters that require a gradient (the adapter, modules_to_save); the frozen
      4-bit base and the buffers are left out of its start-up broadcast too (every rank loads the same files).
    - gradient_as_bucket_view: the gradients live in DDP's buckets (no second copy; optimizer_step zeroes them
      in place rather than setting them to None, so they stay views).
    - find_unused_parameters=False: every trainable parameter takes part in every forward (LoRA on the target
      modules, modules_to_save). static_graph=False: gradient checkpointing is non-reentrant
      (`model.load.prepare_for_training`), which DDP's hooks support without a static graph, and a static
      graph does not hold with no_sync accumulation (torch 2.13: an internal assert, expect_autograd_hooks_, in
      the first step's backward).
    - forward_sync_buffers=False: no buffer broadcast per forward (rotary tables: the same on every rank), so
      the ranks may run different numbers of micro-batches in a step; only the last one, the synced backward,
      meets the other ranks.
    - The comm hook sums (`_sum_hook`): the loss is already normalised by the units of the whole step over all
      ranks, so DDP's default average would divide the gradient by the world size once too often. A sum is the
      same float addition as one process accumulating the ranks' micro-batches (exact for 2 ranks); scaling
      the loss by the world size instead is exact only for powers of two.
    """

    engine = "torch.nn.parallel.DistributedDataParallel"
    # gradient_as_bucket_view: the gradients are views of DDP's buckets, zeroed in place rather than set to None, or
    # each step would copy them in and hold both.
    zero_grads_in_place = True

    def __init__(self, model: torch.nn.Module, world: World):
        from torch.nn.parallel import DistributedDataParallel

        self.model = model
        self.world = world
        self.failed: DistributedError | None = None  # set by the comm hook when the gradients' all-reduce fails
        module = _LossModule(model)
        frozen = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, frozen + [f"model.{n}" for n, _ in model.named_buffers()])
        self.ddp = DistributedDataParallel(
            module, device_ids=[world.local_rank] if world.backend == "nccl" else None,
            gradient_as_bucket_view=True, find_unused_parameters=False, static_graph=False,
            forward_sync_buffers=False)
        self.ddp.register_comm_hook(self, _sum_hook)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def forward(self, fn):
        """fn(model) inside DDP's forward (what lets the next backward reduce the gradients)."""
        try:
            return self.ddp(fn)
        except _dist().DistError as e:  # the one-time bucket rebuild broadcasts in the second step's forward
            raise self.world.failure("DDP's forward", e) from e

    def backward(self, loss: torch.Tensor) -> None:
        try:
            loss.backward()
        except Exception as e:
            if self.failed is not None:  # the all-reduce failed (named, said already): that, not autograd's wrapper
                raise self.failed from e
            raise

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """DDP's no_sync around the forward and backward of every micro-batch but the step's last."""
        if last:
            yield
        else:
            with self.ddp.no_sync():
                yield

    def fillers(self, passes: int) -> int:
        """The zero-gradient passes (`idle`) a rank with `passes` micro-batches this step adds after them: one when it
        has none (an epoch's uneven end), so that it still joins the step's synced backward; each rank runs exactly
        one synced backward per step, whatever its number of micro-batches, as DDP's all-reduce needs."""
        return 0 if passes else 1

    def idle(self) -> None:
        """Exact zeros for every trainable gradient in a synced backward, without a pass through the model."""
        params = self.trainable
        zero = self.forward(lambda model: torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0)
        self.backward(zero)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def evaluate(self, fn, batches: Iterator, missing: int):
        """fn(model, batches) on the bare model: DDP's forward syncs nothing evaluation needs."""
        return fn(self.model, batches)

    def describe(self) -> dict:
        """What the run's summary records: the engine and its settings, as DDP itself reports them."""
        data = self.ddp._get_ddp_logging_data()
        keep = ("backend_name", "world_size", "comm_hook", "gradient_as_bucket_view", "find_unused_parameters",
                "broadcast_buffers", "can_set_static_graph", "bucket_cap_bytes", "bucket_sizes",
                "num_parameter_tensors", "total_parameter_size_bytes", "iteration")
        return {"engine": f"{type(self.ddp).__module__}.{type(self.ddp).__qualname__}",
                "static_graph": bool(self.ddp.static_graph), **{k: data[k] for k in keep if k in data}}


def _sum_hook(state: DataParallel, bucket):  # no annotations: DDP checks them (a string under __future__ fails)
    """DDP comm hook: the bucket's gradients summed over the ranks (DDP's default hook averages), asynchronously,
    so the all-reduce of a ready bucket overlaps the rest of the backward. A failure becomes the one line naming
    the rank to blame (the backward then raises it)."""
    work = _dist().all_reduce(bucket.buffer(), async_op=True)

    def summed(fut):
        try:
            return fut.value()[0]
        except Exception as e:
            state.failed = state.failed or state.world.failure("sum the gradients", e)
            raise state.failed from e

    return work.get_future().then(summed)


class FullyShardedParallel:
    """The PEFT model under FSDP2's fully_shard (`World.wrap`, several ranks, `training.parallelism: fsdp`).

    - One unit per decoder layer and the root (`fsdp.Root`: embeddings, final norm, lm_head), over an explicit
      device mesh: CPU under gloo, CUDA under NCCL. Parameters are computed in their stored dtypes (the base in
      model.compute_dtype, the trainables fp32, as one process computes), gradients reduce-scattered in fp32.
    - The gradients are summed over the ranks after every micro-batch's backward (the loss is normalised by the
      whole step's units over all ranks), accumulating into each rank's gradient shard; no no_sync: that would hold
      the unsharded gradients of every layer between micro-batches.
    - Lockstep: every forward and backward all-gathers and reduce-scatters, so the ranks run the same number of
      passes per step; a rank with fewer micro-batches runs zero-weight filler passes (`idle`) under a forked
      random stream, so its LoRA dropout masks stay those of every other rank.
    - `cpu_offload` (training.fsdp_cpu_offload): every shard in host memory, copied to the device per unit; the
      optimizer steps on the host copies.
    - A 4-bit (QLoRA) base is checked bit for bit after sharding: FSDP2 can change packed NF4 weights held in a
      float storage dtype (bitsandbytes issue 1945); a changed layer refuses the run at start.
    """

    engine = "torch.distributed.fsdp.fully_shard"
    zero_grads_in_place = False

    def __init__(self, model: torch.nn.Module, world: World, cpu_offload: bool = False):
        self.model = model
        self.world = world
        self.device = world.device or torch.device("cpu")
        self.cpu_offload = cpu_offload
        before = fsdp.four_bit_digests(model)
        self.root = fsdp.shard(model, self.device.type, world.size, cpu_offload)
        changed = fsdp.changed_four_bit(self.root, before) if before else []
        if changed:
            raise DistributedError(f"rank {world.rank}: training.parallelism=fsdp changed the 4-bit weights of "
                                   f"{len(changed)} layer(s) ({changed[0]}, ...) when sharding them (bitsandbytes "
                                   f"issue 1945, {fsdp.BNB_FSDP_ISSUE}): use quantization.load_in_4bit=false or "
                                   "training.parallelism=ddp")
        held = fsdp.held_bytes(self.root)
        self.bytes_held = {**held, "frozen_per_rank": world.gather_lists([held["frozen_local"]])}

    def forward(self, fn):
        """fn(model) inside the root unit's forward (its parameters gathered for the whole pass)."""
        return self.root(fn)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        yield

    def fillers(self, passes: int) -> int:
        """The zero-weight passes (`idle`) a rank with `passes` micro-batches this step adds after them: as many as
        the rank with the most has more (agreed before any pass, whose collectives would otherwise meet this one)."""
        return self.world.max_int(passes) - passes

    def idle(self) -> None:
        """One zero-weight forward and backward through every unit, under a forked random stream (its LoRA dropout
        masks must not advance this rank's stream past the others')."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.backward(self.forward(lambda model: fsdp.filler_loss(model, self.device)))

    def evaluate(self, fn, batches: Iterator, missing: int):
        """fn(model, batches) inside one root forward; after this rank's own batches, `missing` filler forwards, so
        every rank's layers gather as often as the rank with the most batches before any rank combines results."""

        def padded(model):
            yield from batches
            for _ in range(missing):
                fsdp.filler_loss(model, self.device)

        return self.forward(lambda model: fn(model, padded(model)))

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return fsdp.clip_grad_norm(params, max_norm)

    def full_adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights gathered whole (every rank calls it; rank 0 saves them as a normal peft folder)."""
        state: list[dict] = []
        self.world._collective("gather the adapter", lambda: state.append(fsdp.full_trainable_state(self.root)))
        return state[0]

    def save_sharded(self, optimizer: torch.optim.Optimizer, folder) -> None:
        self.world._collective("write the sharded checkpoint", lambda: fsdp.save_sharded(self.root, optimizer, folder))

    def load_sharded(self, optimizer: torch.optim.Optimizer, folder) -> None:
        self.world._collective("read the sharded checkpoint", lambda: fsdp.load_sharded(self.root, optimizer, folder))

    def describe(self) -> dict:
        """What the run's summary records: the engine, its mesh and policy, and the bytes each rank holds."""
        return {"engine": self.engine, "backend_name": self.world.backend, "world_size": self.world.size,
                "mesh_device": self.device.type, "units": len(fsdp.decoder_layers(self.model)) + 1,
                "mixed_precision": fsdp.describe_policy(), "cpu_offload": self.cpu_offload, **self.bytes_held}


def engine_for(model, world: World):
    """What optimizer_step runs the micro-batches through: World.wrap's DataParallel or FullyShardedParallel, or for
    one process the model itself (`Local`)."""
    if isinstance(model, (DataParallel, FullyShardedParallel)):
        return model
    if world.distributed:
        raise DistributedError(f"rank {world.rank}: several ranks need the model wrapped by World.wrap "
                               "(DistributedDataParallel or fully_shard reduces the gradients); got the bare model")
    return Local(model)


class Local:
    """One process: the same calls as DataParallel, plain."""

    engine = None
    zero_grads_in_place = False

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def forward(self, fn):
        return fn(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        yield

    def fillers(self, passes: int) -> int:
        return 0

    def idle(self) -> None:
        pass

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def evaluate(self, fn, batches: Iterator, missing: int):
        return fn(self.model, batches)


def _dist():
    import torch.distributed as dist

    return dist


def _process_state(pid: int) -> str | None:
    """The process's state letter (R, S, D, T stopped, Z zombie: dead, not yet reaped), None when it is gone;
    "?" where there is no /proc (macOS) and the kernel says it exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):  # no /proc: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"
    return "?"


def _int_variable(environ, name: str, low: int = 0) -> int:
    value = environ.get(name)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"environment variable {name}={value!r} is not a whole number (set by the "
                               "launcher: torchrun, accelerate launch or Azure ML)") from None
    if number < low:
        raise DistributedError(f"environment variable {name}={number} must be at least {low}")
    return number


def from_environment(environ=None) -> World:
    """Who this process is, from the launcher's variables (one process when WORLD_SIZE is unset or 1)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return World()
    size = _int_variable(environ, "WORLD_SIZE", 1)
    if size == 1:
        return World()
    missing = [v for v in LAUNCHER_VARIABLES if v not in environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start several processes "
                               "with torchrun, accelerate launch or an Azure ML PyTorch job, which set them all")
    rank = _int_variable(environ, "RANK")
    if rank >= size:
        raise DistributedError(f"environment variable RANK={rank} must be below WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=_int_variable(environ, "LOCAL_RANK"))


def launcher_overrides(environ=None) -> list[str]:
    """The recipe overrides an `accelerate launch --config_file` FSDP config asks for (docs/scaling.md).

    accelerate passes its config to the processes as environment variables. `distributed_type: FSDP`
    (ACCELERATE_USE_FSDP) selects training.parallelism=fsdp and `fsdp_activation_checkpointing: true`
    training.gradient_checkpointing=true. phi3local shards its own way (FSDP2 whatever fsdp_version says, one unit
    per decoder layer and the root, full sharding), so the wrap policy, prefetch, state-dict and loading settings do
    not apply; fsdp_offload_params: true selects training.fsdp_cpu_offload=true, and a sharding strategy other than
    full sharding is refused. Overrides on the command line come after these, so they win.
    """
    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return []
    strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if strategy not in ("FULL_SHARD", "1") or reshard not in ("true", "1"):
        raise DistributedError(f"accelerate's FSDP config asks for sharding strategy {strategy} (reshard after "
                               f"forward: {reshard}); phi3local shards fully: use fsdp_sharding_strategy: FULL_SHARD "
                               "(fsdp_reshard_after_forward: true)")
    overrides = ["training.parallelism=fsdp"]
    if environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("true", "1"):
        overrides.append("training.fsdp_cpu_offload=true")
    if environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in ("true", "1"):
        overrides.append("training.gradient_checkpointing=true")
    return overrides


def start(timeout_seconds: float, environ=None) -> World:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA, one GPU per process), or stay one process."""
    world = from_environment(environ)
    if not world.distributed:
        return world
    dist = _dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if world.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {world.rank}: LOCAL_RANK={world.local_rank} but this machine shows "
                                   f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {world.rank}: cannot join the other {world.size - 1} process(es) at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                                   f"{timeout_seconds:g} s: {str(e).splitlines()[0][:200]}") from e
    world = replace(world, backend=backend, timeout_seconds=timeout_seconds)
    return replace(world, pids=_register_pids(world))


def _register_pids(world: World) -> dict:
    """Every rank's (host, pid) through the launcher's key-value store, to name a rank that dies."""
    try:
        store = _dist().distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # a private helper of torch: without it no names
        return {}
    store.set(_PID_KEY.format(world.rank), f"{socket.gethostname()} {os.getpid()}")
    world.barrier()  # every rank has registered
    pids = {}
    for r in range(world.size):
        host, pid = store.get(_PID_KEY.format(r)).decode().rsplit(" ", 1)
        pids[r] = (host, int(pid))
    return pids
