"""The recipe on two processes (torchrun, gloo on CPU) against one process with the same global batch.

Exactness: 2 ranks x micro-batch 4 x grad_accum 1 must train what 1 process x micro-batch 4 x grad_accum 2
trains. The tiny recipe has lora.dropout=0, so no random masks differ between the layouts. Tolerance: per-step
losses and adapter weights within 1e-5 relative (measured: bit-identical, 0.0, over 24 steps on this machine:
the sum of two ranks' gradients is the same float addition as accumulating two micro-batches).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from phi3local.config import load_recipe
from phi3local.train import distributed
from phi3local.train import recipe as loop
from phi3local.train.batching import plan_epoch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
STEPS = 24
COMMON = [f"training.max_steps={STEPS}", "training.log_every=1", "eval.every=0", "eval.generate_samples=0",
          "training.display=plain", "training.checkpoint_every=0"]
RTOL = 1e-5
# Stated bound: a killed rank ends the job within this many seconds (torchrun notices a dead child within
# its monitor interval and SIGTERMs the survivors, which fail at their next collective; measured ~1.1 s).
DEAD_RANK_BOUND_S = 30
# A hung rank (alive, not answering): the other fails when its collective times out after
# training.distributed_timeout_seconds (10, the least it may be) and says so within HUNG_SAID_MARGIN_S; torchrun
# then SIGTERMs the hung rank and SIGKILLs it TORCHRUN_KILL_GRACE_S later (torch 2.13 applies a fixed 30 s to a
# failed group, whatever --shutdown-timeout says). Measured on the loaded 2-core CPU: said after 12-16 s, ended
# after 45 s.
HUNG_TIMEOUT_S = 10
HUNG_SAID_MARGIN_S = 10
TORCHRUN_KILL_GRACE_S = 30
HUNG_END_MARGIN_S = TORCHRUN_KILL_GRACE_S + 15


def torchrun_command(*args: str) -> list[str]:
    launcher = Path(sys.executable).with_name("torchrun")
    head = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", "--nproc_per_node", "2", "-m", "phi3local", "train", str(TINY), *args]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_two_ranks(run_dir: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(f"output_dir={run_dir}", *COMMON, *extra), env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    metrics = Path(run_dir) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    from phi3local.model.load import resolve_model_path

    resolve_model_path("tiny")  # built once here, not by both ranks at the same time
    run_dir = tmp_path_factory.mktemp("ddp") / "two"
    done = run_two_ranks(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, done


def test_two_ranks_equal_one_process_with_the_same_global_batch(two_rank_run, tmp_path):
    run_dir, done = two_rank_run
    one = load_recipe(TINY, [f"output_dir={tmp_path / 'one'}", *COMMON, "training.display=none",
                             "training.grad_accum=2"])
    summary = loop.run_training(one)
    expected, got = step_losses(one.output_dir), step_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(expected) == sorted(got)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=RTOL), step
    assert expected[STEPS] < expected[1] - 0.5  # it trains: the losses fall
    a, b = adapter(one.output_dir), adapter(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=RTOL, atol=RTOL * float(a[name].abs().max()))
    two_summary = json.loads((run_dir / "summary.json").read_text())
    # Totals over ranks: every rank's trained tokens, as one process counts them.
    assert two_summary["trained_tokens"] == summary["trained_tokens"]
    assert two_summary["final"]["val_loss"] == pytest.approx(summary["final"]["val_loss"], rel=RTOL)
    # Rank 0 alone prints: one recipe, one summary table.
    assert done.stdout.count("adapter saved in") == 1 and done.stdout.count("trainable parameters") == 1


def test_stopped_and_resumed_two_rank_run_equals_uninterrupted(two_rank_run, tmp_path):
    full_dir, _ = two_rank_run
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun_command(f"output_dir={run_dir}", *COMMON), env=child_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 3, proc)
        proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun forwards it to both ranks
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-3000:]
    assert "stopped by SIGTERM" in out
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(saved) == 1, saved  # the ranks agreed on one step; rank 0 alone saved it
    stopped_at = int(saved[0].split("-")[1])
    assert 3 <= stopped_at < STEPS
    resumed = run_two_ranks(run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"(step {stopped_at})" in resumed.stdout
    expected, got = step_losses(full_dir), step_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=RTOL), step


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's child running `rank` (found by the RANK its launcher gave it)."""
    children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    found = [c for c in children if f"RANK={rank}" in Path(f"/proc/{c}/environ").read_bytes().decode().split("\0")]
    assert len(found) == 1, children
    return found[0]


def test_killed_rank_ends_the_job_naming_it_within_the_bound(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_command(f"output_dir={run_dir}", *COMMON, "training.max_steps=100000"),
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 2, proc)
        rank1 = rank_pid(proc, 1)
        killed_at = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        out, _ = proc.communicate(timeout=DEAD_RANK_BOUND_S + 30)
        took = time.monotonic() - killed_at
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert took < DEAD_RANK_BOUND_S, took
    assert f"rank 1 (pid {rank1}) is dead" in out  # rank 0's own message
    assert "rank      : 1 (local_rank: 1)" in out and "SIGKILL" in out  # torchrun's report of the failed child


def test_hung_rank_ends_the_job_naming_it_within_the_collective_timeout(tmp_path):
    run_dir = tmp_path / "hung"
    proc = subprocess.Popen(torchrun_command(f"output_dir={run_dir}", *COMMON, "training.max_steps=100000",
                                             f"training.distributed_timeout_seconds={HUNG_TIMEOUT_S}"),
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []  # (when it arrived, line)
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout))
    reader.start()
    rank1 = None
    try:
        wait_for_step(run_dir, 2, proc)
        rank1 = rank_pid(proc, 1)
        stopped_at = time.monotonic()
        os.kill(rank1, signal.SIGSTOP)  # alive but making no progress: what a deadlocked or wedged rank looks like
        proc.wait(timeout=HUNG_TIMEOUT_S + HUNG_END_MARGIN_S + 30)
        ended = time.monotonic() - stopped_at
    finally:
        proc.kill()
        if rank1 is not None and distributed._process_state(rank1) is not None:
            os.kill(rank1, signal.SIGKILL)  # a stopped rank outlives a killed torchrun
        reader.join(timeout=10)
    out = "".join(line for _, line in lines)
    # rank 0's one line: which rank, what state, that the collective timed out and after how long
    said = f"phi3local train: error: rank 0: rank 1 (pid {rank1}) is stopped (SIGSTOP or a debugger): it hung, " \
           f"the collective timed out after {HUNG_TIMEOUT_S} s ("
    said_at = [t - stopped_at for t, line in lines if said in line]
    assert said_at, out[-3000:]
    print(f"\nhung rank: named {said_at[0]:.1f} s and the job ended {ended:.1f} s after rank 1 stopped "
          f"(timeout {HUNG_TIMEOUT_S} s)")
    assert HUNG_TIMEOUT_S - 1 < said_at[0] < HUNG_TIMEOUT_S + HUNG_SAID_MARGIN_S, said_at
    assert proc.returncode != 0
    assert ended < HUNG_TIMEOUT_S + HUNG_END_MARGIN_S, ended
    assert "rank      : 1 (local_rank: 1)" in out and "SIGKILL" in out  # torchrun killed the hung rank


def test_a_timed_out_collective_names_the_hung_rank(tmp_path):
    host = socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        world = distributed.World(rank=0, size=2, pids={0: (host, os.getpid()), 1: (host, sleeper.pid)},
                                  timeout_seconds=10)
        # alive and running (here: asleep): after a timeout, the only other rank is the one that hung
        assert world.who_failed(timed_out=True) == (f"rank 1 (pid {sleeper.pid} on {host}) did not answer: it "
                                                    "hung, the collective timed out after 10 s")
        assert world.who_failed().startswith("another rank stopped answering")  # not a timeout: no guess
        sleeper.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while distributed._process_state(sleeper.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert world.who_failed(timed_out=True) == (f"rank 1 (pid {sleeper.pid}) is stopped (SIGSTOP or a "
                                                    "debugger): it hung, the collective timed out after 10 s")
        remote = distributed.World(rank=0, size=2, pids={0: (host, os.getpid()), 1: ("node-b", 4242)},
                                   timeout_seconds=10)
        assert remote.who_failed(timed_out=True) == ("rank 1 (pid 4242 on node-b) did not answer: it hung, or its "
                                                     "machine or network is gone; the collective timed out after 10 s")
        three = distributed.World(rank=0, size=3, pids={}, timeout_seconds=10)
        assert three.who_failed(timed_out=True) == ("the collective timed out after 10 s: another rank hung (the "
                                                    "launcher's log names it)")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert world.who_failed() == f"rank 1 (pid {sleeper.pid}) is dead"


def test_a_setup_error_on_rank_0_stops_every_rank_at_once(two_rank_run):
    run_dir, _ = two_rank_run
    started = time.monotonic()
    refused = run_two_ranks(run_dir, timeout=120)  # a finished run, neither --resume nor --overwrite
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert "holds a finished run" in out
    assert "rank 1: rank 0 failed during setup" in out  # not left waiting for the collective timeout
    assert time.monotonic() - started < 60


def test_a_two_rank_checkpoint_does_not_resume_on_one_process(two_rank_run, tmp_path):
    import shutil

    run_dir, _ = two_rank_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    # As a two-rank run stopped after its last checkpoint (a finished run has nothing to resume).
    state = json.loads((copy / "trainer_state.json").read_text())
    (copy / "trainer_state.json").write_text(json.dumps({**state, "finished": False}))
    recipe = load_recipe(TINY, [f"output_dir={copy}", *COMMON, "training.display=none"])
    with pytest.raises(loop.TrainingError, match=r"trained by 2 process\(es\), this run has 1: the global batch"):
        loop.setup(recipe, resume=True)


# ------------------------------------------------------------------------------------------ the DDP engine

def test_the_two_rank_run_trains_under_distributed_data_parallel_not_an_own_all_reduce(two_rank_run):
    run_dir, done = two_rank_run
    summary = json.loads((run_dir / "summary.json").read_text())
    engine = summary["data_parallel"]  # from DDP's own logging data, on rank 0
    assert engine["engine"] == "torch.nn.parallel.distributed.DistributedDataParallel", engine
    assert engine["world_size"] == 2 and engine["backend_name"] == "gloo"
    assert "_sum_hook" in engine["comm_hook"] and engine["gradient_as_bucket_view"] == 1, engine
    assert "data parallel: 2 ranks (gloo), torch.nn.parallel.DistributedDataParallel" in done.stdout
    # The project's own bucketed all-reduce of gradients is gone: DDP's reducer is the only one.
    assert not hasattr(distributed.World, "sum_gradients") and not hasattr(distributed, "_buckets")


class _Toy(torch.nn.Module):
    """A frozen base and a trainable adapter, the adapter's layer under non-reentrant checkpointing (as the
    recipe's gradient checkpointing)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(6, 8).requires_grad_(False)
        self.lora = torch.nn.Linear(8, 1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda h: self.lora(torch.tanh(h)), self.base(x), use_reentrant=False)


class _ToyBatch(SimpleNamespace):
    def to(self, device):
        return self


class _ToyTask:
    def units(self, batch):
        return len(batch.x)

    def loss(self, model, batch, *, chunk_size):
        return (model(batch.x).squeeze(-1) - batch.y).pow(2).sum(), {}


def _toy_steps():
    """The global micro-batches of three optimizer steps: 3 (uneven over 2 ranks), 1 (rank 1 has none), 2."""
    g = torch.Generator().manual_seed(1)
    batches = [_ToyBatch(x=torch.randn(3, 6, generator=g), y=torch.randn(3, generator=g), doc_ids=[i])
               for i in range(6)]
    return [batches[0:3], batches[3:4], batches[4:6]]


def _toy_train(world: distributed.World, out: Path) -> None:
    model = _Toy()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = world.wrap(model) or model
    losses = []
    for step in _toy_steps():
        result = loop.optimizer_step(_ToyTask(), engine, world.share(step), optimizer, scheduler, world,
                                     device=torch.device("cpu"), max_grad_norm=0.0, chunk_size=0)
        losses.append(float(result.loss))
    described = engine.describe() if world.distributed else None
    torch.save({"losses": losses, "lora": {k: v.clone() for k, v in model.lora.state_dict().items()},
                "engine": described}, out)


def _toy_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    world = distributed.World(rank=rank, size=2, local_rank=rank, backend="gloo", timeout_seconds=60)
    try:
        _toy_train(world, Path(out_dir) / f"rank{rank}.pt")
        world.barrier()  # as the recipe's cleanup at a normal end (World.close says why)
    finally:
        world.close()


def test_ddp_sums_uneven_and_missing_micro_batches_as_one_process(tmp_path):
    """2 gloo ranks through optimizer_step's DDP path: a step dealt 2 + 1 micro-batches (no_sync on rank 0's
    first), a step where rank 1 has none (its zero-gradient pass joins the synced backward), then 1 + 1: the
    same losses and adapter as one process, and no hang."""
    import torch.multiprocessing as mp

    mp.spawn(_toy_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    _toy_train(distributed.World(), tmp_path / "one.pt")
    one, ranks = torch.load(tmp_path / "one.pt"), [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["losses"] == pytest.approx(one["losses"], rel=1e-6)
        for name, value in one["lora"].items():
            torch.testing.assert_close(got["lora"][name], value, rtol=1e-6, atol=1e-7)
    assert ranks[0]["engine"]["engine"].endswith("DistributedDataParallel")
    assert ranks[0]["engine"]["static_graph"] is False and ranks[0]["engine"]["find_unused_parameters"] == 0


# ------------------------------------------------------------------------------------------ data sharding

def fake_run(world: distributed.World, lengths: list[int], packing: bool, grad_accum: int):
    recipe = load_recipe(TINY, [f"data.packing={str(packing).lower()}", f"training.grad_accum={grad_accum}",
                                "training.micro_batch_size=3", "data.max_seq_len=64", "seed=7"])
    docs = loop.Documents(input_ids=[[d % 50 + 1] * n for d, n in enumerate(lengths)],
                          labels=[[5] * n for n in lengths], sources=[str(d) for d in range(len(lengths))])
    return SimpleNamespace(recipe=recipe, state=loop.ckpt.TrainerState(), train_docs=docs, world=world)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize(("size", "grad_accum"), [(2, 1), (2, 3), (3, 2)])
def test_every_document_once_per_epoch_over_the_ranks(packing, size, grad_accum):
    lengths = [(d * 37) % 61 + 3 for d in range(101)]
    runs = [fake_run(distributed.World(rank=r, size=size), lengths, packing, grad_accum) for r in range(size)]
    _, steps_per_epoch = loop.count_total_steps(runs[0].recipe, runs[0].train_docs, size)
    seen_empty = False
    for epoch in range(2):
        used: list[int] = []
        plans = [{} for _ in runs]
        for _ in range(steps_per_epoch):
            for run, plan in zip(runs, plans):
                assert run.state.epoch == epoch
                batches = loop.next_micro_batches(run.recipe, run.state, run.train_docs, plan, world=run.world,
                                                  pad_id=0, sizes={"max_width": 4096})
                assert len(batches) <= grad_accum
                seen_empty |= not batches
                used += [d for b in batches for d in b.doc_ids]
        assert sorted(used) == list(range(len(lengths))), epoch  # each document exactly once over the ranks
        assert all(run.state.epoch == epoch + 1 and run.state.batch_in_epoch == 0 for run in runs)
    # Same seed and epoch, same plan: what each rank shares from is deterministic.
    r = runs[0].recipe
    assert plan_epoch(lengths, 64, 3, packing, r.seed, 1) == plan_epoch(lengths, 64, 3, packing, r.seed, 1)
    micro_batches = len(plan_epoch(lengths, 64, 3, packing, r.seed, 0))
    if micro_batches % (size * grad_accum) and micro_batches % (size * grad_accum) < size:
        assert seen_empty  # the uneven last step left a rank without a micro-batch


def test_one_process_without_a_launcher_and_bad_launcher_variables():
    assert distributed.from_environment({}) == distributed.World()
    assert distributed.start(60, {"WORLD_SIZE": "1"}).distributed is False
    world = distributed.from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "x",
                                          "MASTER_PORT": "1"})
    assert (world.rank, world.size, world.local_rank, world.is_main) == (1, 2, 1, False)
    assert world.share(list(range(7))) == [1, 3, 5]
    with pytest.raises(distributed.DistributedError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed.from_environment({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(distributed.DistributedError, match="RANK='one'"):
        distributed.from_environment({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                                      "MASTER_PORT": "1"})
    with pytest.raises(distributed.DistributedError, match="RANK=2 must be below WORLD_SIZE=2"):
        distributed.from_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                                      "MASTER_PORT": "1"})


class OtherRankSays:
    """A rank 0 of 2 whose gather returns its own value first, then the other rank's (given) value."""

    distributed, is_main, size = True, True, 2

    def __init__(self, other):
        self.other = other

    def gather_lists(self, items: list) -> list:
        return [*items, self.other]


def test_ranks_agree_on_auto_settings_that_timing_or_free_memory_could_split():
    from rich.console import Console

    quiet = Console(quiet=True)
    recipe = load_recipe(TINY, ["training.micro_batch_size=auto", "training.gradient_checkpointing=auto"])
    docs = SimpleNamespace(lengths=[100, 200, 300])
    alone = loop.decide_auto_settings(recipe, docs, quiet, distributed.World())
    assert alone.training.micro_batch_size > 1 and alone.training.gradient_checkpointing is False
    # The other rank has less free memory: both take its smaller micro-batch and its checkpointing; the
    # batch width rounding is rank 0's (each rank decides it by its device type; they must pad alike).
    agreed = loop.decide_auto_settings(recipe, docs, quiet, OtherRankSays((1, True, 8, False)))
    assert (agreed.training.micro_batch_size, agreed.training.gradient_checkpointing) == (1, True)
    # selective checkpointing only where every rank fits it (this rank, without checkpointing, did not choose it)
    assert agreed.training.selective_checkpointing is False
    assert agreed.data.pad_to_multiple_of == alone.data.pad_to_multiple_of != 8

    class Rank1(OtherRankSays):
        def gather_lists(self, items):
            return [self.other, *items]  # rank 0's value comes first

    assert loop.decide_auto_settings(recipe, docs, quiet, Rank1((1, True, 8, False))).data.pad_to_multiple_of == 8
    both_fit = loop.decide_auto_settings(load_recipe(TINY, ["training.gradient_checkpointing=true"]), docs, quiet,
                                         OtherRankSays((4, True, 8, True)))
    assert both_fit.training.selective_checkpointing is True


def test_rank_0s_packing_timing_decides_for_every_rank(monkeypatch):
    from rich.console import Console

    recipe = load_recipe(TINY, ["data.packing=auto"])

    def timed(recipe, docs, loaded, pad_id, forward_loss, choice):
        recipe = copy.deepcopy(recipe)
        recipe.data.packing = choice
        return recipe, {"chosen": choice}

    for mine, theirs in ((True, False), (False, True)):
        monkeypatch.setattr(loop.auto_settings, "measure_packing", lambda *a, mine=mine: timed(*a, mine))
        rank0 = loop.decide_packing(recipe, None, None, 0, Console(quiet=True), OtherRankSays(theirs))
        assert rank0.data.packing is mine  # rank 0 (first in the gather) keeps its own timing's choice

        class Rank1(OtherRankSays):
            def gather_lists(self, items):
                return [self.other, *items]  # rank 0's value comes first

        rank1 = loop.decide_packing(recipe, None, None, 0, Console(quiet=True), Rank1(theirs))
        assert rank1.data.packing is theirs  # rank 1 adopts rank 0's choice, not its own timing's
