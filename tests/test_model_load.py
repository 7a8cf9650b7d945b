"""The loaded QLoRA model keeps its frozen floating weights in the compute dtype, and trains as the fp32-upcast one."""

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from phi3local.config import load_recipe
from phi3local.model.load import base_causal_lm, load_model
from phi3local.model.tokenizer import load_tokenizer
from phi3local.train.loss import chunked_cross_entropy

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"


def load_tiny(*overrides):
    recipe = load_recipe(TINY, ["model.compute_dtype=bfloat16", "lora.modules_to_save=[]", *overrides])
    from phi3local.model.load import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("tiny"))
    torch.manual_seed(0)
    return load_model(recipe, tokenizer, torch.device("cpu"))


def upcast_frozen_to_fp32(model):
    """What peft's prepare_model_for_kbit_training did: every non-4-bit frozen float parameter in fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.float()


def two_step_losses(model, input_ids):
    base = base_causal_lm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    losses = []
    for _ in range(2):
        hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
        loss, _ = chunked_cross_entropy(hidden, targets, base.get_output_embeddings(), 16)
        loss = loss / int((targets != -100).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_bf16_compute_leaves_no_fp32_copies_and_trains_like_the_upcast_path():
    loaded = load_tiny()
    model = loaded.model
    frozen = {n: p.dtype for n, p in model.named_parameters()
              if not p.requires_grad and p.is_floating_point() and not isinstance(p, bnb.nn.Params4bit)}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, {n: d for n, d in frozen.items() if d != torch.bfloat16}
    assert "base_model.model.lm_head.weight" in frozen and "base_model.model.model.embed_tokens.weight" in frozen
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}  # LoRA weights and their AdamW state stay fp32

    input_ids = torch.randint(3, base_causal_lm(model).config.vocab_size, (2, 24),
                              generator=torch.Generator().manual_seed(5))
    lean = two_step_losses(model, input_ids)
    upcast_model = load_tiny().model
    upcast_frozen_to_fp32(upcast_model)
    upcast = two_step_losses(upcast_model, input_ids)
    # bf16 activations against fp32 ones: both losses agree to 0.1% (measured: 2e-5 relative).
    for a, b in zip(lean, upcast):
        assert abs(a - b) <= 1e-3 * b, (lean, upcast)
    assert lean[1] < lean[0]


def test_trained_modules_to_save_are_fp32_and_fed_in_their_dtype():
    loaded = load_tiny("lora.modules_to_save=[embed_tokens, lm_head]")
    copies = {n: p.dtype for n, p in loaded.model.named_parameters() if "modules_to_save" in n}
    assert copies and set(copies.values()) == {torch.float32}
    input_ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(6))
    losses = two_step_losses(loaded.model, input_ids)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_activation_offload_moves_saved_tensors_only_for_a_cuda_device():
    import contextlib

    from phi3local.model.load import activation_offload

    assert isinstance(activation_offload(True, torch.device("cuda")), torch.autograd.graph.save_on_cpu)
    for enabled, device in ((False, "cuda"), (True, "cpu")):
        assert isinstance(activation_offload(enabled, torch.device(device)), contextlib.nullcontext)
    # save_on_cpu itself keeps the gradient exact (here on CPU, where pinning is skipped).
    x = torch.randn(5, 3, requires_grad=True)
    with torch.autograd.graph.save_on_cpu(pin_memory=False):
        y = (x.sin() * x).sum()
    y.backward()
    assert torch.allclose(x.grad, x.detach().cos() * x.detach() + x.detach().sin())


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")  # the control's lost gradient
def test_an_evaluation_pass_leaves_gradients_through_the_4bit_weights_intact():
    """bitsandbytes 0.50 repacks NF4 weights on AVX512-BF16 CPUs on a no-grad pass; its kernel then drops the
    input gradient of every 4-bit layer. After our loader, evaluating first changes no gradient at all."""
    from bitsandbytes.functional import has_avx512bf16

    loaded = load_tiny("model.compute_dtype=float32")
    model = loaded.model
    layer = base_causal_lm(model).model.layers[0].mlp.down_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    x = torch.randn(2, 8, layer.in_features, generator=torch.Generator().manual_seed(1))
    weights = torch.linspace(-1, 1, layer.out_features)

    def input_grad():
        xx = x.clone().requires_grad_(True)
        layer.train()
        (layer(xx) * weights).sum().backward()
        return xx.grad

    before = input_grad()
    assert before is not None and float(before.abs().sum()) > 0
    model.eval()
    with torch.no_grad():
        base_causal_lm(model)(input_ids=torch.tensor([[1, 5, 9, 13]]), use_cache=False)
    model.train()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = input_grad()
    assert after is not None and torch.equal(after, before)

    if has_avx512bf16():  # the control: an unprotected layer on this CPU loses its input gradient
        bare = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        bare.weight = bnb.nn.Params4bit(torch.randn(96, 64) * 0.05, requires_grad=False, quant_type="nf4")
        bare = bare.to("cpu")  # quantizes
        bare.eval()
        with torch.no_grad():
            bare(torch.randn(1, 64))
        xx = torch.randn(3, 64, requires_grad=True)
        bare.train()
        out = bare(xx).sum()
        lost = not out.requires_grad or torch.autograd.grad(out, xx, allow_unused=True)[0] is None
        assert getattr(bare.weight.quant_state, "packing_format_for_cpu", False) and lost
