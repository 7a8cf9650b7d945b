"""Packed rows' documents attended one by one give the block-diagonal mask's attention, losses and gradients."""

from pathlib import Path

import pytest
import torch

from phi3local.config import load_recipe
from phi3local.model import document_attention
from phi3local.model.load import base_causal_lm, load_model, resolve_model_path
from phi3local.model.tokenizer import load_tokenizer
from phi3local.train.loss import chunked_cross_entropy

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"


class Module(torch.nn.Module):
    pass


def packed_positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def block_diagonal_causal(positions: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: a query sees the keys of its own document up to itself (what transformers builds)."""
    docs = (positions == 0).cumsum(-1)
    same = docs[:, :, None] == docs[:, None, :]
    causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool).tril()
    return (same & causal)[:, None]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_documents_one_by_one_equal_the_block_diagonal_mask(heads, kv_heads):
    positions = packed_positions([[5, 9, 2], [16]])  # two rows of 16: three documents, and one
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 16, 8, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, 16, 8, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, 16, 8, generator=g, requires_grad=True)
    module = Module().train()
    out, _ = document_attention.document_attention(module, q, k, v, None, scaling=0.3, position_ids=positions)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_causal(positions),
                                                            scale=0.3, enable_gqa=heads != kv_heads).transpose(1, 2)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in [(out, ref), *zip(grads, ref_grads)]:  # within 1e-5 of the largest (measured: ~1e-7)
        assert float((got - want).detach().abs().max() / want.detach().abs().max()) <= 1e-5


def test_only_packed_training_forwards_take_the_document_path():
    bounds = document_attention._document_bounds
    q = torch.zeros(2, 4, 16, 8)
    packed = packed_positions([[5, 11], [16]])
    train, evaluation = Module().train(), Module().eval()
    assert bounds(train, q, q, {"position_ids": packed}) == [[(0, 5), (5, 16)], [(0, 16)]]
    assert bounds(evaluation, q, q, {"position_ids": packed}) is None  # evaluation, generation: transformers' SDPA
    assert bounds(train, q, q, {"position_ids": packed_positions([[16], [16]])}) is None  # unpacked: is_causal
    assert bounds(train, q, q, {}) is None
    assert bounds(train, q, q, {"position_ids": packed, "sliding_window": 8}) is None  # a document past the window
    left_padded = torch.tensor([[1, 1, *range(14)], list(range(16))])
    assert bounds(train, q, q, {"position_ids": left_padded}) is None
    assert bounds(train, q[:, :, :1], q, {"position_ids": packed[:, :1]}) is None  # a cached decoding step
    # Found once per position_ids tensor (every layer of a forward passes the same one), again when it changed.
    searches = []
    original = torch.Tensor.nonzero
    torch.Tensor.nonzero = lambda self, *a, **k: searches.append(1) or original(self, *a, **k)
    try:
        fresh = packed_positions([[3, 13], [6, 10]])
        for _ in range(4):
            assert bounds(train, q, q, {"position_ids": fresh}) == [[(0, 3), (3, 16)], [(0, 6), (6, 16)]]
        assert len(searches) == 2  # one search per row, for the first layer only
        fresh[1, 6:] = torch.arange(10) + 6  # changed in place: row 1 is one document now
        assert bounds(train, q, q, {"position_ids": fresh}) == [[(0, 3), (3, 16)], [(0, 16)]]
    finally:
        torch.Tensor.nonzero = original


def load_tiny(*overrides):
    recipe = load_recipe(TINY, ["lora.modules_to_save=[]", "training.gradient_checkpointing=false", *overrides])
    torch.manual_seed(0)
    return load_model(recipe, load_tokenizer(resolve_model_path("tiny")), torch.device("cpu")).model


@pytest.mark.parametrize("overrides", [[], ["training.gradient_checkpointing=true"]], ids=["plain", "selective"])
def test_a_packed_training_step_equals_the_masked_one(overrides, monkeypatch):
    model = load_tiny(*overrides)
    base = base_causal_lm(model)
    assert base.config._attn_implementation == document_attention.NAME
    positions = packed_positions([[20, 12, 16], [30, 18]])
    input_ids = torch.randint(3, 500, positions.shape, generator=torch.Generator().manual_seed(1))
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    targets[positions.roll(-1, 1) == 0] = -100  # no document predicts the next one's first token

    def step():
        model.train()
        model.zero_grad()
        hidden = base.model(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state
        loss, _ = chunked_cross_entropy(hidden, targets, base.get_output_embeddings(), 32)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("is_causal")) or original(*a, **k))
    loss, grads = step()
    assert calls and all(calls)  # every call one document, causal: 5 documents x 2 layers (x2 when recomputed)
    assert len(calls) >= 10
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", original)
    base.set_attn_implementation("sdpa")  # transformers' own path: one call per row with the block-diagonal mask
    ref_loss, ref_grads = step()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert float((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-12)) <= 1e-5, name
