"""Model FLOPs of a training step (for MFU) and a measured matmul peak of the device (its denominator)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one Phi-3 decoder layer, by its module name."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    return {"qkv_proj": (d, head_dim * (heads + 2 * kv_heads)), "o_proj": (heads * head_dim, d),
            "gate_up_proj": (d, 2 * config.intermediate_size), "down_proj": (config.intermediate_size, d)}


@dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs a LoRA training step needs: per non-padding token, plus per trained (loss) token."""

    per_token: float
    per_trained_token: float

    def total(self, real_tokens: float, trained_tokens: float) -> float:
        return real_tokens * self.per_token + trained_tokens * self.per_trained_token


def lora_step_flops(config, seq_len: float, lora_targets: list[str], lora_r: int,
                    trained_modules: list[str] = (), task: str = "causal_lm") -> StepFlops:
    """The matmul FLOPs one token of a (Q)LoRA step needs, whatever tool runs it (the MFU numerator).

    Frozen linear weights: forward (2 x in x out) and the input gradient (2 x in x out), no weight gradient.
    LoRA on a targeted linear: A (in -> r) and B (r -> out), forward plus both gradients, 6 x r x (in + out).
    A fully trained linear (lora.modules_to_save) adds its weight gradient. Causal attention over a document
    of seq_len tokens: QK^T and PV over seq_len / 2 keys on average, backward twice the forward. The output
    projection runs only for tokens that carry a loss (forward + input gradient), so a tool that computes
    logits for every position does work this count leaves out. Recomputation by checkpointing is not
    counted (the MFU convention); nor the first layer's input gradient while the embeddings are frozen.
    seq_len: for a mix of documents, the token-weighted mean length (sum of n^2 / sum of n), what the
    attention of an average token costs.
    Embedding lookups, norms and softmax are not matmuls and are left out.
    """
    shapes = _linear_shapes(config)
    targets, trained = set(lora_targets), {m.rsplit(".", 1)[-1] for m in trained_modules}
    per_layer = 0.0
    for name, (fan_in, fan_out) in shapes.items():
        per_layer += 4.0 * fan_in * fan_out
        if name in targets:
            per_layer += 6.0 * lora_r * (fan_in + fan_out)
        if name in trained:
            per_layer += 2.0 * fan_in * fan_out
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_layer += 6.0 * heads * head_dim * seq_len
    total = config.num_hidden_layers * per_layer
    if "embed_tokens" not in trained:  # nothing before the first qkv_proj learns: its input gradient is unneeded
        fan_in, fan_out = shapes["qkv_proj"]
        total -= 2.0 * fan_in * fan_out + (2.0 * lora_r * fan_in if "qkv_proj" in targets else 0.0)
    head = 0.0
    if task == "causal_lm":
        head = (6.0 if "lm_head" in trained else 4.0) * config.hidden_size * config.vocab_size
    return StepFlops(per_token=total, per_trained_token=head)


_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                         seconds: float = 0.5) -> float:
    """Best-of FLOP/s of a square matmul on this device: the MFU denominator used everywhere."""
    key = (str(device), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    if device.type == "cuda":
        size = max(size, 8192)
    # A private generator: measuring must not shift the global RNG a run's dropout draws from.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    (a @ b)  # warm-up
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2.0 * size**3 / (time.perf_counter() - t0))
    _PEAK_CACHE[key] = best
    return best
