"""training.parallelism=fsdp: FSDP2's fully_shard on 2 gloo ranks (torchrun, an explicit CPU mesh) against one process
with the same global batch, on the tiny model.

2 ranks x micro-batch 4 x grad_accum 1 must train what 1 process x micro-batch 4 x grad_accum 2 trains. STEPS
crosses the first epoch's end (31 micro-batches: step 16 has one, so rank 1 runs a zero-weight filler pass), and
eval.max_batches=3 deals the validation batches 2 + 1 (rank 1 runs a filler forward). Tolerance: per-step losses,
validation loss and adapter within RTOL relative (measured on this machine: 16-bit LoRA and QLoRA, see
docs/scaling.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from phi3local.config import load_recipe
from phi3local.train import fsdp
from phi3local.train import recipe as loop
from phi3local.train.memory_plan import make_plan
from tests.test_distributed import TINY, adapter, child_env, step_losses, torchrun_command

STEPS = 18
COMMON = [f"training.max_steps={STEPS}", "training.log_every=1", "eval.every=0", "eval.max_batches=3",
          "eval.generate_samples=0", "training.display=plain", "training.checkpoint_every=6",
          "training.keep_checkpoints=10", "training.parallelism=fsdp"]
SIXTEEN_BIT = ["quantization.load_in_4bit=false"]
RTOL = 1e-5


def run_two_ranks(run_dir: Path, *extra: str):
    import subprocess

    done = subprocess.run(torchrun_command(f"output_dir={run_dir}", *COMMON, *extra), env=child_env(),
                          cwd=Path(TINY).parents[1], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def one_process(run_dir: Path, *extra: str) -> dict:
    recipe = load_recipe(TINY, [f"output_dir={run_dir}", *COMMON, "training.display=none", "training.grad_accum=2",
                                *extra])
    return loop.run_training(recipe)


def assert_equal_runs(got_dir: Path, expected_dir: Path) -> float:
    """Per-step losses and adapter within RTOL; returns the largest relative loss difference."""
    expected, got = step_losses(expected_dir), step_losses(got_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=RTOL), step
    assert expected[STEPS] < expected[1] - 0.5  # it trains
    a, b = adapter(expected_dir), adapter(got_dir)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a) and any("embed_tokens" in k for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=RTOL, atol=RTOL * float(a[name].abs().max()))
    return worst


@pytest.fixture(scope="module")
def sixteen_bit(tmp_path_factory):
    from phi3local.model.load import resolve_model_path

    resolve_model_path("tiny")  # built once here, not by both ranks at the same time
    root = tmp_path_factory.mktemp("fsdp")
    done = run_two_ranks(root / "two", *SIXTEEN_BIT)
    summary = one_process(root / "one", *SIXTEEN_BIT)
    return root, done, summary


def test_fsdp_16bit_lora_equals_one_process(sixteen_bit):
    root, done, summary = sixteen_bit
    worst = assert_equal_runs(root / "two", root / "one")
    print(f"\nfsdp 16-bit: largest relative per-step loss difference {worst:.2e} over {STEPS} steps")
    two = json.loads((root / "two" / "summary.json").read_text())
    assert two["final"]["val_loss"] == pytest.approx(summary["final"]["val_loss"], rel=RTOL)
    assert two["trained_tokens"] == summary["trained_tokens"]
    engine = two["data_parallel"]
    assert engine["engine"] == "torch.distributed.fsdp.fully_shard" and engine["world_size"] == 2
    assert engine["backend_name"] == "gloo" and engine["mesh_device"] == "cpu"
    assert engine["mixed_precision"] == {"param_dtype": "None", "reduce_dtype": "torch.float32"}
    assert "sharded data parallel: 2 ranks (gloo), torch.distributed.fsdp.fully_shard" in done.stdout
    # The final adapter and each checkpoint's are normal peft folders; the optimizer state is sharded.
    checkpoint = root / "two" / "checkpoints" / "step-6"
    assert (checkpoint / "adapter" / "adapter_config.json").is_file() and not (checkpoint / "optimizer.pt").exists()
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert loop.ckpt.verify(checkpoint) == []  # the checksums cover the shards


def test_frozen_weights_held_per_rank_are_half_of_one_process(sixteen_bit):
    root, _, _ = sixteen_bit
    held = json.loads((root / "two" / "summary.json").read_text())["data_parallel"]
    per_rank, full = held["frozen_per_rank"], held["frozen_full"]
    print(f"\nfrozen weights: {full} bytes in one process, {per_rank} per rank (the shards' local sizes)")
    assert len(per_rank) == 2 and sum(per_rank) == full  # every frozen weight on exactly one rank
    assert all(0.45 * full <= b <= 0.55 * full for b in per_rank), per_rank  # dim-0 shards: about half each
    assert held["trainable_local"] < 0.55 * held["trainable_full"]


def test_cpu_offload_trains_what_one_process_trains(sixteen_bit, tmp_path):
    """training.fsdp_cpu_offload: FSDP2's CPUOffloadPolicy on every unit (on this CPU mesh the copies to the device
    are no-ops, but the policy's code paths run: host shards, gradients moved to the host, the optimizer stepping
    on the host shards); the losses and adapter equal one process's as without it."""
    root, _, _ = sixteen_bit
    done = run_two_ranks(tmp_path / "offload", *SIXTEEN_BIT, "training.fsdp_cpu_offload=true")
    assert "in host memory (fsdp_cpu_offload)" in done.stdout
    worst = assert_equal_runs(tmp_path / "offload", root / "one")
    print(f"\nfsdp with CPU offload: largest relative per-step loss difference {worst:.2e} over {STEPS} steps")
    summary = json.loads((tmp_path / "offload" / "summary.json").read_text())
    assert summary["data_parallel"]["cpu_offload"] is True


def test_cpu_offload_plans_the_shards_in_host_memory_and_needs_fsdp():
    from phi3local.config import RecipeError, recipe_from_dict

    recipe = load_recipe(TINY, ["model.name_or_path=microsoft/Phi-3-medium-4k-instruct", *SIXTEEN_BIT,
                                "model.compute_dtype=bfloat16", "lora.modules_to_save=[]", "training.parallelism=fsdp"])
    sharded = make_plan(recipe, device="cuda", available=12 << 30, ranks=2).plan
    recipe.training.fsdp_cpu_offload = True
    offloaded = make_plan(recipe, device="cuda", available=12 << 30, ranks=2).plan
    assert not sharded.fits and offloaded.fits  # 14 GB of bf16 shards per rank: on a 12 GiB card no, offloaded yes
    assert offloaded.total == sharded.total - sharded.shards  # the device keeps the gathered units and activations
    assert offloaded.host == offloaded.shards > sharded.shards  # in host memory: the shards, and AdamW's fp32 state
    assert sharded.optimizer == "paged_adamw_8bit" and offloaded.optimizer == "adamw"  # auto: the host steps
    with pytest.raises(RecipeError, match=r"^recipe: training.fsdp_cpu_offload=true needs training.parallelism=fsdp"):
        recipe_from_dict({"training": {"fsdp_cpu_offload": True}}, source="recipe")
    with pytest.raises(RecipeError, match=r"^recipe: training.optimizer=paged_adamw_8bit steps on the GPU"):
        recipe_from_dict({"training": {"parallelism": "fsdp", "fsdp_cpu_offload": True,
                                       "optimizer": "paged_adamw_8bit"}}, source="recipe")


def test_resume_from_a_sharded_checkpoint_is_exact(sixteen_bit):
    root, _, _ = sixteen_bit
    resumed = root / "resumed"
    shutil.copytree(root / "two", resumed)
    # As the run stopped after its step-12 checkpoint: the later checkpoint, metrics and the adapter gone, the run not
    # finished; what the resumed run reports for steps 13-18 is its own.
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    for name in ("trainer_state.json", "summary.json"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "adapter")
    metrics = resumed / "metrics.jsonl"
    kept = [x for x in metrics.read_text().splitlines() if json.loads(x).get("step", 0) <= 12]
    metrics.write_text("\n".join(kept) + "\n")
    done = run_two_ranks(resumed, *SIXTEEN_BIT, "--resume")
    assert "(step 12)" in done.stdout
    expected, got = step_losses(root / "two"), step_losses(resumed)
    assert [got[s] for s in range(13, STEPS + 1)] == [expected[s] for s in range(13, STEPS + 1)]  # bit for bit
    a, b = adapter(root / "two"), adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_under_fsdp_equals_one_process(tmp_path):
    """The 4-bit base sharded (bnb_4bit_quant_storage = the compute dtype): on this stack (CPU, gloo, torch 2.13,
    bitsandbytes 0.50) the gathered NF4 weights are bit-identical (checked at start) and training equals one
    process."""
    done = run_two_ranks(tmp_path / "two")
    one_process(tmp_path / "one")
    worst = assert_equal_runs(tmp_path / "two", tmp_path / "one")
    print(f"\nfsdp QLoRA: largest relative per-step loss difference {worst:.2e} over {STEPS} steps")
    assert "sharded data parallel: 2 ranks" in done.stdout


def _one_rank_group(tmp_path: Path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)


def test_changed_4bit_weights_after_sharding_refuse_the_run_naming_the_bitsandbytes_issue(tmp_path, monkeypatch):
    """What bitsandbytes issue 1945 reports (FSDP2 canonicalising NaN bit patterns of packed NF4 weights) is caught
    by the start-up check: one packed element changed in a shard between sharding and the check refuses the run."""
    import torch.distributed as dist

    from phi3local.model.load import load_model, resolve_model_path
    from phi3local.model.tokenizer import load_tokenizer
    from phi3local.train import distributed

    recipe = load_recipe(TINY, [])
    model = load_model(recipe, load_tokenizer(resolve_model_path("tiny")), torch.device("cpu")).model
    real_shard = fsdp.shard

    def shard_then_canonicalise(model, device_type, size, cpu_offload=False):
        root = real_shard(model, device_type, size, cpu_offload)
        weight = dict(fsdp._four_bit_modules(model))["base_model.model.model.layers.1.mlp.down_proj.base_layer"].weight
        local = weight.to_local().view(-1).view(torch.int32)
        local[7] = 0x7FC00000 if int(local[7]) != 0x7FC00000 else 0x7FC00001  # a NaN pattern, not the one stored
        return root

    monkeypatch.setattr(fsdp, "shard", shard_then_canonicalise)
    _one_rank_group(tmp_path)
    try:
        world = distributed.World(rank=0, size=1, backend="gloo", timeout_seconds=60)
        with pytest.raises(distributed.DistributedError) as refused:
            distributed.FullyShardedParallel(model, world)
    finally:
        dist.destroy_process_group()
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("rank 0: training.parallelism=fsdp changed the 4-bit weights of 1 layer(s) "
                       "(base_model.model.model.layers.1.mlp.down_proj.base_layer, ...) when sharding them "
                       f"(bitsandbytes issue 1945, {fsdp.BNB_FSDP_ISSUE}): use quantization.load_in_4bit=false or "
                       "training.parallelism=ddp")


def test_the_memory_plan_counts_the_frozen_weights_per_rank_under_fsdp():
    recipe = load_recipe(TINY, ["model.name_or_path=microsoft/Phi-3-medium-4k-instruct", *SIXTEEN_BIT,
                                "model.compute_dtype=bfloat16", "lora.modules_to_save=[]"])
    one = make_plan(recipe, device="cuda", available=24 << 30).plan
    recipe.training.parallelism = "fsdp"
    four = make_plan(recipe, device="cuda", available=24 << 30, ranks=4).plan
    assert one.ranks == 1 and four.ranks == 4
    assert four.weights_4bit == -(-one.weights_4bit // 4) and four.weights_kept == -(-one.weights_kept // 4)
    assert four.optimizer_state == -(-one.optimizer_state // 4)
    assert one.weights_4bit > 24 << 30 > four.total  # 28 GB of bf16 weights: one card no, 4 ranks yes
    assert not one.fits and four.fits


def test_preference_under_fsdp_is_refused_in_one_line():
    from phi3local.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match=r"^recipe: task=preference with training.parallelism=fsdp is not "
                                          r"supported yet .*use training.parallelism=ddp$"):
        recipe_from_dict({"task": "preference", "training": {"parallelism": "fsdp"}}, source="recipe")


ACCELERATE_FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def test_accelerate_launch_with_an_fsdp_config_trains_the_fsdp_path(sixteen_bit, tmp_path):
    """`accelerate launch --config_file fsdp.yaml -m phi3local train` (docs/scaling.md's config, as a user starts
    it) runs training.parallelism=fsdp without it in the recipe: the same losses as torchrun's fsdp run, bit for bit."""
    import subprocess
    import sys

    root, _, _ = sixteen_bit
    config = tmp_path / "fsdp.yaml"
    config.write_text(ACCELERATE_FSDP_CONFIG)
    run = tmp_path / "accelerate"
    common = [c for c in COMMON if c != "training.parallelism=fsdp"]
    accelerate = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(accelerate), "launch", "--config_file", str(config), "--main_process_port", "0",
                           "-m", "phi3local", "train", str(TINY), f"output_dir={run}", *common, *SIXTEEN_BIT],
                          env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "accelerate's FSDP config: training.parallelism=fsdp" in done.stdout
    assert "sharded data parallel: 2 ranks (gloo), torch.distributed.fsdp.fully_shard" in done.stdout
    assert step_losses(run) == step_losses(root / "two")


@pytest.mark.parametrize(("variables", "message"), [
    ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "asks for sharding strategy SHARD_GRAD_OP (reshard after forward: "
                                                  "true); phi3local shards fully"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, "(reshard after forward: false)"),
])
def test_accelerate_fsdp_settings_phi3local_does_not_do_are_refused_in_one_line(variables, message):
    from phi3local.train.distributed import DistributedError, launcher_overrides

    with pytest.raises(DistributedError) as refused:
        launcher_overrides({"ACCELERATE_USE_FSDP": "true", **variables})
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_accelerate_fsdp_config_maps_to_recipe_overrides():
    from phi3local.train.distributed import launcher_overrides

    assert launcher_overrides({}) == [] == launcher_overrides({"ACCELERATE_USE_FSDP": "false"})
    assert launcher_overrides({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}) == ["training.parallelism=fsdp"]
    assert launcher_overrides({"ACCELERATE_USE_FSDP": "true", "FSDP_ACTIVATION_CHECKPOINTING": "true"}) == [
        "training.parallelism=fsdp", "training.gradient_checkpointing=true"]
    assert launcher_overrides({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}) == [
        "training.parallelism=fsdp", "training.fsdp_cpu_offload=true"]
