"""The fused 4-bit LoRA node gives peft's losses and gradients, keeps peft's forward where it does not apply, and
changes nothing that is saved."""

from pathlib import Path

import pytest
import torch
from peft.tuners.lora.bnb import Linear4bit

from phi3local.config import load_recipe
from phi3local.model.fused_lora import FrozenLinearWithLora, fused_linear4bit
from phi3local.model.load import base_causal_lm, load_model, resolve_model_path
from phi3local.model.tokenizer import load_tokenizer
from phi3local.train.loss import chunked_cross_entropy
from phi3local.train.memory_plan import recipe_shape, saved_per_token_per_layer

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
LAYERS = 2  # the tiny model's decoder layers, 4 NF4 linear layers each, all LoRA targets


def load_tiny(*overrides):
    recipe = load_recipe(TINY, ["lora.modules_to_save=[]", *overrides])
    torch.manual_seed(0)
    return load_model(recipe, load_tokenizer(resolve_model_path("tiny")), torch.device("cpu")).model


def train_step(model, input_ids, seed=0):
    """One forward + backward of the training loss: the loss, the LoRA gradients and the embeddings' gradient."""
    base = base_causal_lm(model)
    model.train()
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    embeds = base.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks for both paths
    hidden = base.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    loss, _ = chunked_cross_entropy(hidden, targets, base.get_output_embeddings(), 32)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, embeds.grad


@pytest.mark.parametrize("overrides", [
    ["training.gradient_checkpointing=false"],
    ["training.gradient_checkpointing=true", "training.selective_checkpointing=false"],
    ["training.gradient_checkpointing=true", "training.selective_checkpointing=true"],
    ["training.gradient_checkpointing=false", "lora.dropout=0.2"],
    ["training.gradient_checkpointing=false", "model.compute_dtype=bfloat16"],
], ids=["no-checkpointing", "checkpointing", "selective", "dropout", "bf16-model-fp32-adapters"])
def test_fused_layers_give_peft_losses_and_gradients(overrides, monkeypatch):
    calls = []
    original = FrozenLinearWithLora.apply
    monkeypatch.setattr(FrozenLinearWithLora, "apply", lambda *a: calls.append(1) or original(*a))
    input_ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(3))
    fused = load_tiny(*overrides)
    plain = load_tiny(*overrides, "training.fused_lora=false")
    assert sum(type(m) is fused_linear4bit() for m in fused.modules()) == 4 * LAYERS
    assert not any(isinstance(m, fused_linear4bit()) for m in plain.modules())
    # the LoRA B matrices start at zero; nonzero ones make the adapter's path count in every gradient
    for model in (fused, plain):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    loss, grads, x_grad = train_step(fused, input_ids)
    assert len(calls) >= 4 * LAYERS  # every layer's forward went through the node (twice when recomputed)
    ref_loss, ref_grads, ref_x_grad = train_step(plain, input_ids)
    bf16 = "model.compute_dtype=bfloat16" in overrides
    # fp32: the same products summed in another order (measured: largest difference 3.4e-7 of the largest
    # gradient); bf16 model, fp32 adapters: the layer outputs round to bf16 where peft's do, the input
    # gradient's two parts are summed before rounding instead of after (measured: identical here)
    tolerance = 1e-3 if bf16 else 1e-5
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * LAYERS
    for key, grad in [*grads.items(), ("input", x_grad)]:
        ref = ref_grads.get(key, ref_x_grad).float()
        difference = (grad.float() - ref).abs().max() / ref.abs().max()
        assert difference <= tolerance, (key, float(difference))


def test_fused_node_is_used_only_where_it_applies(monkeypatch):
    model = load_tiny("training.gradient_checkpointing=false")
    calls = []
    original = FrozenLinearWithLora.apply
    monkeypatch.setattr(FrozenLinearWithLora, "apply", lambda *a: calls.append(1) or original(*a))
    input_ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    base = base_causal_lm(model)
    with torch.no_grad():
        fused_logits = base(input_ids=input_ids).logits
        assert len(calls) == 4 * LAYERS
        with model.disable_adapter():  # the preference task's reference: peft's forward, base layer only
            reference = base(input_ids=input_ids).logits
        assert len(calls) == 4 * LAYERS
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    assert isinstance(layer, fused_linear4bit()) and "lora." in repr(layer)  # still peft's class to peft
    # a fresh adapter (B = 0) leaves the base model's output, through either path
    torch.testing.assert_close(fused_logits, reference, rtol=0, atol=0)


def test_a_dora_adapter_runs_peft_forward(monkeypatch):
    model = load_tiny("training.gradient_checkpointing=false", "lora.use_dora=true")
    calls = []
    original = FrozenLinearWithLora.apply
    monkeypatch.setattr(FrozenLinearWithLora, "apply", lambda *a: calls.append(1) or original(*a))
    base_causal_lm(model)(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls == []


def saved_bytes_per_token(model, tokens=64) -> float:
    """Bytes autograd keeps for one decoder layer's forward, per token (unique storages, parameters excluded)."""
    base = base_causal_lm(model)
    model.train()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 500, (1, tokens), generator=torch.Generator().manual_seed(0))
    hidden = base.model.embed_tokens(ids).detach().requires_grad_(True)
    positions = torch.arange(tokens)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base.model.layers[0](hidden, position_embeddings=base.model.rotary_emb(hidden, positions),
                             attention_mask=None, position_ids=positions)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params) / tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_plan_counts_what_the_fused_node_keeps(dtype):
    overrides = ["training.gradient_checkpointing=false", f"model.compute_dtype={dtype}"]
    fused = saved_bytes_per_token(load_tiny(*overrides))
    plain = saved_bytes_per_token(load_tiny(*overrides, "training.fused_lora=false"))
    recipe = load_recipe(TINY, overrides)
    shape, b = recipe_shape(recipe), 4 if dtype == "float32" else 2
    planned = {fused_lora: saved_per_token_per_layer(shape, b, recipe.lora.r, 4, fused_lora)
               for fused_lora in (True, False)}
    # bf16: the adapters' inputs kept in bf16 instead of peft's fp32 copies (measured 3,032 vs 3,672 bytes per
    # token); fp32: no copies either way. The plan's difference is the measured one, byte for byte.
    assert plain - fused == planned[False] - planned[True] == (640 if dtype == "bfloat16" else 0)
