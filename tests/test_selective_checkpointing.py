"""Selective checkpointing keeps the frozen 4-bit matmuls' and attention's outputs: the recomputation skips them,
the gradients equal full checkpointing's, and the memory plan counts what is kept."""

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from phi3local.config import load_recipe
from phi3local.model.load import base_causal_lm, load_model, resolve_model_path
from phi3local.model.selective_checkpointing import keeps
from phi3local.model.tokenizer import load_tokenizer
from phi3local.train import auto_settings
from phi3local.train.loss import chunked_cross_entropy
from phi3local.train.memory_plan import make_plan, recipe_shape, selective_kept_per_token_per_layer

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"


def load_tiny(*overrides):
    recipe = load_recipe(TINY, ["lora.modules_to_save=[]", *overrides])
    torch.manual_seed(0)
    return load_model(recipe, load_tokenizer(resolve_model_path("tiny")), torch.device("cpu")).model


def step_gradients(model, input_ids):
    """One forward + backward of the training loss; the LoRA gradients by name and the ops the step ran."""
    base = base_causal_lm(model)
    model.train()
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
        loss, _ = chunked_cross_entropy(hidden, targets, base.get_output_embeddings(), 32)
        loss.backward()
    calls = {e.key: e.count for e in prof.key_averages()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, calls


def test_selective_recomputes_no_4bit_matmul_and_gives_full_checkpointings_gradients():
    input_ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(3))
    runs = {}
    for name, overrides in {"none": ["training.gradient_checkpointing=false"],
                            "full": ["training.gradient_checkpointing=true", "training.selective_checkpointing=false"],
                            "selective": ["training.gradient_checkpointing=true",
                                          "training.selective_checkpointing=true"]}.items():
        runs[name] = step_gradients(load_tiny(*overrides), input_ids)
    layers = 2  # the tiny model's decoder layers, 4 NF4 linear layers each
    # Dequantisations show the work done (under selective checkpointing the profiler also records the kept ops'
    # cached replays, so gemm_4bit's own count is not the work): full checkpointing dequantises each NF4 weight
    # three times (forward, recompute, input gradient); selective twice, as no checkpointing does.
    dequant = {name: calls.get("bitsandbytes::dequantize_4bit", 0) for name, (_, _, calls) in runs.items()}
    assert dequant["full"] == 3 * 4 * layers and dequant["selective"] == 2 * 4 * layers, dequant
    # (without checkpointing layer 0's qkv needs no input gradient: the embedding output needs none)
    assert dequant["none"] == 2 * 4 * layers - 1, dequant
    # The same ops on the same inputs: the same loss and gradients to rounding (measured: bit-identical).
    full_loss, full_grads, _ = runs["full"]
    for name in ("selective", "none"):
        loss, grads, _ = runs[name]
        assert loss == pytest.approx(full_loss, rel=1e-6)
        assert grads.keys() == full_grads.keys() and len(grads) == 4 * layers * 2  # lora_A and lora_B
        for key, grad in grads.items():
            torch.testing.assert_close(grad, full_grads[key], rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")


def test_the_policy_keeps_full_rank_matmuls_and_recomputes_lora_paths():
    x, w = torch.zeros(8, 256), torch.zeros(256, 512)
    assert keeps("aten::mm", (x, w)) and keeps("aten::addmm", (torch.zeros(512), x, w))
    assert not keeps("aten::mm", (x, torch.zeros(256, 16)))  # LoRA A: rank-wide output
    assert not keeps("aten::mm", (torch.zeros(8, 16), torch.zeros(16, 512)))  # LoRA B: rank-deep product
    assert keeps("bitsandbytes::gemm_4bit", ()) and not keeps("aten::silu", ())


def test_the_plan_counts_the_kept_outputs_and_auto_keeps_them_only_where_they_fit():
    recipe = load_recipe(TINY, ["training.gradient_checkpointing=true", "training.micro_batch_size=4"])
    shape = recipe_shape(recipe)
    plain = make_plan(recipe, device="cpu", available=None, selective_checkpointing=False).plan
    kept = make_plan(recipe, device="cpu", available=None, selective_checkpointing=True).plan
    tokens = 4 * plain.width
    per_token = selective_kept_per_token_per_layer(shape, 4)  # fp32 on CPU
    # qkv + o + gate_up + down outputs and attention's output, fp32, plus a log-sum-exp per head
    d, i = shape.hidden_size, shape.intermediate_size
    assert per_token == 4 * (3 * d + 3 * d + 2 * i) + 4 * shape.num_attention_heads
    assert kept.activations - plain.activations == tokens * shape.num_hidden_layers * per_token
    assert kept.selective_checkpointing and not plain.selective_checkpointing
    # auto: on when the step fits with them, off when only the plain plan fits
    roomy, _, reasons = auto_settings.resolve(recipe, None, device="cpu", available=plain.total * 100)
    assert roomy.training.selective_checkpointing is True, reasons
    tight_bytes = (plain.total + kept.total) // 2
    tight, _, reasons = auto_settings.resolve(recipe, None, device="cpu", available=tight_bytes)
    assert tight.training.selective_checkpointing is False
    assert reasons["selective_checkpointing"].startswith("off")
    off, _, _ = auto_settings.resolve(load_recipe(TINY, ["training.gradient_checkpointing=false"]), None,
                                      device="cpu", available=plain.total * 100)
    assert off.training.selective_checkpointing is False  # nothing is recomputed, nothing to keep
