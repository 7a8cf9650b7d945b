"""Model FLOPs per token (for MFU) and a measured matmul peak of the device (its denominator)."""

from __future__ import annotations

import time

import torch


def training_flops_per_token(config, seq_len: int) -> float:
    """FLOPs of one forward+backward per token, PaLM-style: 6*N (dense matmuls) + 12*L*d*s (attention).

    N counts the transformer's matmul weights (not embeddings, but the output projection). This is the
    conventional "model FLOPs" even for LoRA, where frozen weights skip their weight-gradient matmul,
    so MFU is comparable to other tools' figures; recomputation by checkpointing is not counted.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn_params = d * head_dim * (heads + 2 * kv_heads) + heads * head_dim * d
    mlp_params = 3 * d * config.intermediate_size
    n = layers * (attn_params + mlp_params) + d * config.vocab_size
    return 6.0 * n + 12.0 * layers * heads * head_dim * seq_len


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
