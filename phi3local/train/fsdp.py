"""FSDP2 mechanics for `training.parallelism: fsdp`: shard the PEFT model with torch's `fully_shard`, check the
4-bit weights survive it, gather the adapter, and save and load sharded state with torch.distributed.checkpoint.

`phi3local.train.distributed` builds its engine (`FullyShardedParallel`) from these and keeps the collectives'
failure naming; nothing here knows about ranks beyond the device mesh.

- One FSDP unit per decoder layer, and a root unit over `Root` (forward(fn) = fn(model)), which owns what is
  left: the embeddings, the final norm, the lm_head and their modules_to_save copies. The tasks' losses call the
  decoder and project hidden states through lm_head chunk by chunk, outside `model.forward`; inside the root's
  forward those parameters stay gathered for the whole pass, so the number of chunks may differ between ranks.
- Mixed precision: the parameters are all-gathered and computed in the dtypes they are stored in, which is what
  one process computes with (the frozen base in model.compute_dtype, LoRA and modules_to_save copies in fp32,
  `phi3local.model.load.keep_trainable_fp32`): param_dtype=None. Casting the fp32 trainables to a 16-bit
  param_dtype would change the LoRA numerics and break the fp32 lm_head copy's input hook. Gradients are
  reduce-scattered in fp32 (reduce_dtype).
- Gradients are summed over the ranks, not averaged (divide factor 1, sum-only collectives): the loss is already
  divided by the trained units of the whole step over all ranks, as under DDP. gloo has no PREMUL_SUM, which a
  divide factor of 1 otherwise asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

# bitsandbytes issue 1945: FSDP2's parameter swap canonicalises NaN bit patterns of packed NF4 weights stored in a
# float dtype (bnb_4bit_quant_storage), which changes the 4-bit codes and the outputs (reported on CUDA, bf16).
BNB_FSDP_ISSUE = "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1945"
_DIGEST_CHUNK = 1 << 22  # elements per chunk of a weight's digest: bounds its int64 temporary


class Root(torch.nn.Module):
    """The root FSDP unit: the PEFT model, and forward(fn) = fn(model), so any task's loss (or evaluation) runs
    inside one root forward with the root's parameters gathered."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a PEFT or plain *ForCausalLM / *ForSequenceClassification (one FSDP unit each)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def shard(model: torch.nn.Module, device_type: str, size: int, cpu_offload: bool = False) -> Root:
    """fully_shard per decoder layer and on the root, over an explicit 1-D mesh of `size` ranks on `device_type`
    (gloo needs the CPU mesh named: FSDP2 would otherwise pick the accelerator's); `cpu_offload`: the shards in
    host memory (FSDP2's CPUOffloadPolicy, pinned on CUDA for asynchronous copies)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device_type, (size,))
    policy = mixed_precision_policy()
    offload = CPUOffloadPolicy(pin_memory=device_type == "cuda") if cpu_offload else OffloadPolicy()
    root = Root(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(root, mesh=mesh, mp_policy=policy, offload_policy=offload)
    for unit in [*decoder_layers(model), root]:  # each unit's own setting: these do not recurse
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # A rank whose pass leaves a parameter without a gradient still sends zeros: every rank's reduce-scatter has the
    # same size (a zero-weight filler pass and a task's loss may touch different parameters).
    root.set_reduce_scatter_unused_params(True)
    return root


def mixed_precision_policy():
    """The stored dtypes computed with (param_dtype None), gradients reduced in fp32: see the module's docstring."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def describe_policy() -> dict:
    """The policy every unit runs with, as the run's summary records it."""
    policy = mixed_precision_policy()
    return {"param_dtype": str(policy.param_dtype), "reduce_dtype": str(policy.reduce_dtype)}


# ---------------------------------------------------------------------------------------------- 4-bit weights

def _four_bit_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    import bitsandbytes as bnb

    return ((name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))


def _bits_digest(weight: torch.Tensor) -> int:
    """A position-weighted sum of the weight's bit patterns: any changed element (a canonicalised NaN) changes it."""
    flat = weight.detach().reshape(-1)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    total = 0
    for start in range(0, flat.numel(), _DIGEST_CHUNK):
        bits = flat[start:start + _DIGEST_CHUNK].view(as_int).to(torch.int64)
        where = torch.arange(start, start + bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        total += int((bits * where).sum())
    return total


def four_bit_digests(model: torch.nn.Module) -> dict[str, int]:
    """Each Linear4bit's packed weight digest, taken before sharding."""
    return {name: _bits_digest(m.weight) for name, m in _four_bit_modules(model)}


def changed_four_bit(root: Root, before: dict[str, int]) -> list[str]:
    """The Linear4bit layers whose packed weights, gathered by FSDP2, differ from `before` (one all-gather of every
    unit, one unit at a time; every rank must call it)."""
    names = {id(m): name for name, m in _four_bit_modules(root.model)}
    layers = decoder_layers(root.model)
    in_layers = [[m for _, m in _four_bit_modules(layer)] for layer in layers]
    inside = {id(m) for mods in in_layers for m in mods}
    in_root = [m for _, m in _four_bit_modules(root.model) if id(m) not in inside]
    changed = []
    for unit, modules in [*zip(layers, in_layers), (root, in_root)]:
        unit.unshard()
        try:
            changed += [names[id(m)] for m in modules if _bits_digest(m.weight) != before.get(names[id(m)])]
        finally:
            unit.reshard()
    return changed


# ---------------------------------------------------------------------------------------------- what a rank holds

def held_bytes(root: Root) -> dict[str, int]:
    """Bytes of the parameters this rank holds (its shards' local sizes) and of the whole model, frozen and
    trainable apart."""
    from torch.distributed.tensor import DTensor

    out = {"frozen_local": 0, "frozen_full": 0, "trainable_local": 0, "trainable_full": 0}
    for p in root.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        kind = "trainable" if p.requires_grad else "frozen"
        out[f"{kind}_local"] += local.numel() * local.element_size()
        out[f"{kind}_full"] += p.numel() * p.element_size()
    return out


# ---------------------------------------------------------------------------------------------- steps

def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip over sharded gradients; the total norm over every rank's shards, as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def filler_loss(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """A zero-weight loss through every layer on one token: what a rank runs when it has fewer micro-batches than
    another, so every FSDP unit's all-gather and reduce-scatter meets its peers (its gradients are exact zeros)."""
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    return model(input_ids=token).logits.float().sum() * 0.0


# ---------------------------------------------------------------------------------------------- state

def full_trainable_state(root: Root) -> dict[str, torch.Tensor]:
    """The trainable parameters gathered whole, on CPU, named as in the PEFT model (what peft's save_pretrained
    takes as state_dict). Every rank must call it (one all-gather per parameter); the frozen base is not gathered."""
    from torch.distributed.tensor import DTensor

    # After a no-grad forward (evaluation) the root unit's parameters are still gathered, as plain tensors whose
    # storage FSDP frees at its next reshard: reshard first, and copy, so nothing returned aliases FSDP's buffers.
    root.reshard()
    out = {}
    for name, p in root.model.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", copy=True)
    return out


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The frozen base is loaded from the model's files by every run: only the adapter and its optimizer state are
    # checkpointed. strict=False: the loaded state has no frozen keys by design.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(root: Root, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the adapter and the optimizer state into `folder` (torch.distributed.checkpoint,
    collective; rank 0 also writes the metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(root, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(root: Root, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The adapter and optimizer shards of `folder` into the sharded model and optimizer (collective; the same
    world size that wrote them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(root, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())
