"""Phi family members at their real size with seeded random weights: what the Hub would give, minus the training.

    folder = ensure_real_model("phi3-mini")   # runs/bench/models/real-phi3-mini: 3.8B, bf16 safetensors

The Hub is not reachable here, but the real shapes are (`phi3local.model.shapes`): every code path that depends
on size (the memory plan, loading and quantising 7.6 GB, the chunked loss over 200,064 rows, merging, the export
builder) runs on these exactly as on the released checkpoints; only the trained values differ. The weights are
drawn tensor by tensor (normal, std = the config's initializer_range; norms 1), so building needs about the
model's own bf16 size in memory, and are written once per member as sharded bf16 safetensors with an index, as
the Hub ships them.

Tokenizers: Phi-3-mini uses its real tokenizer (`../shared/data/phi3-mini-tokenizer`, read in place by the
recipe's `model.tokenizer`); Phi-4-mini gets a byte-level BPE trained on the chat data with Phi-4-mini's special
tokens, filled with reserved `<|dummy_i|>` entries up to the real 200,029 tokens (the real one has 200,029
entries in 200,064 embedding rows), built by `phi3local.model.family.build_phi4_tokenizer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels_bench.common import CHAT_DATA, PHI3_TOKENIZER, WORK_DIR

REAL_MODELS_VERSION = 1  # bump when a built member changes, so cached builds are rebuilt
SHARD_BYTES = 2 * 1024**3  # the Hub's checkpoints come in shards of a few GB; so do these


@dataclass(frozen=True)
class RealMember:
    name: str
    model_id: str  # the Hub id whose shape (phi3local.model.shapes) it has
    tokenizer_entries: int | None = None  # None: the real Phi-3 tokenizer from ../shared/data


MEMBERS = {m.name: m for m in (
    RealMember("phi3-mini", "microsoft/Phi-3-mini-4k-instruct"),
    RealMember("phi4-mini", "microsoft/Phi-4-mini-instruct", tokenizer_entries=200029),
)}


def real_config(member: RealMember):
    """The member's Phi3Config as its Hub config.json has it (LongRoPE factors: phi3local.model.family's stand-ins,
    48 short near 1 and 48 long growing to 8, since the real factor values are not available offline)."""
    from transformers import Phi3Config

    from phi3local.model.family import longrope_factors
    from phi3local.model.shapes import known_shape

    shape = known_shape(member.model_id)
    assert shape is not None, member.model_id
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if shape.rope_type == "longrope":
        short, long = longrope_factors(shape.rotary_dims // 2)
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
                "original_max_position_embeddings": shape.original_max_position_embeddings}
    eos = list(shape.eos_token_ids)
    config = Phi3Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        original_max_position_embeddings=shape.original_max_position_embeddings or shape.max_position_embeddings,
        partial_rotary_factor=shape.partial_rotary_factor, rope_parameters=rope, rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tie_word_embeddings, bos_token_id=1 if member.tokenizer_entries is None else 199999,
        eos_token_id=eos[0], pad_token_id=shape.pad_token_id, sliding_window=shape.sliding_window,
    )
    config.dtype = torch.bfloat16
    return config, eos


def _random_tensor(name: str, shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.float32, device=generator.device)
    out.normal_(0.0, std, generator=generator)
    return out.to(torch.bfloat16).cpu()


def write_random_weights(folder: Path, config, seed: int = 0, device: str = "cpu") -> dict:
    """device: where the numbers are drawn (a GPU draws 3.8B in seconds; the values differ from the CPU's)."""
    """Sharded bf16 safetensors + model.safetensors.index.json for config's Phi3ForCausalLM, drawn from seed."""
    from safetensors.torch import save_file
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        skeleton = Phi3ForCausalLM(config)
    tensors = {n: p.shape for n, p in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # one tensor, as the Hub's tied checkpoints store it
    generator = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in tensors.items():
        t = _random_tensor(name, shape, config.initializer_range, generator)
        if size and size + t.numel() * 2 > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({n: file for n in shard})
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return {"parameters": sum(s.numel() for s in tensors.values()), "bytes": total, "shards": len(shards)}


def build_real_model(folder: Path, member: RealMember, seed: int = 0, device: str = "cpu") -> None:
    from transformers import GenerationConfig

    from phi3local.model.family import build_phi4_tokenizer
    from phi3local.model.tiny import _special_ids

    config, eos = real_config(member)
    if member.tokenizer_entries is not None:
        texts = [json.loads(line)["messages"][-1]["content"]
                 for line in (CHAT_DATA / "train.jsonl").read_text().splitlines() if line.strip()]
        # n pieces (learned + reserved) - 1, then <|endoftext|> and the 10 chat and tool tokens
        build_phi4_tokenizer(folder, texts, member.tokenizer_entries - 10)
        # The stand-in's special tokens sit after its learned pieces, not at Phi-4-mini's 199999/200020: the
        # config takes their ids from the tokenizer, as a checkpoint's config and tokenizer agree.
        ids = _special_ids(folder)
        config.pad_token_id = config.bos_token_id = ids["<|endoftext|>"]
        config.eos_token_id = ids["<|end|>"]
        eos = [ids["<|end|>"], ids["<|endoftext|>"]]
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
                     ).save_pretrained(folder)
    facts = write_random_weights(folder, config, seed, device)
    (folder / "real_model.json").write_text(json.dumps({"imitates": member.model_id, "seed": seed, "drawn_on": device,
                                                        **facts}) + "\n")


def ensure_real_model(name: str, seed: int = 0, device: str = "cpu") -> Path:
    """The real-size member `name` under runs/bench/models/, built on first use (minutes; 7.6 GB on disk)."""
    from phi3local.model.tiny import build_once

    member = MEMBERS[name]
    stamp = {"real_models": REAL_MODELS_VERSION, "member": name, "seed": seed}
    suffix = ""
    if device != "cpu":
        stamp["device"] = device
        suffix = f"-{device}"
    return build_once(WORK_DIR / "models" / f"real-{name}{suffix}", lambda f: build_real_model(f, member, seed, device),
                      stamp)


def tokenizer_of(name: str, device: str = "cpu") -> Path:
    """Where the member's tokenizer lives: the shared real Phi-3 tokenizer, or the built model folder."""
    return PHI3_TOKENIZER if MEMBERS[name].tokenizer_entries is None else ensure_real_model(name, device=device)


if __name__ == "__main__":  # python -m kernels_bench.real_models phi3-mini phi4-mini
    import sys
    import time

    for n in sys.argv[1:] or list(MEMBERS):
        began = time.perf_counter()
        print(n, ensure_real_model(n), f"{time.perf_counter() - began:.0f} s", flush=True)
