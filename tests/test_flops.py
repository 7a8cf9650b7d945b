"""The MFU numerator: the matmul FLOPs a LoRA step needs, checked against what torch's profiler counts."""

import io
from pathlib import Path

import pytest
from rich.console import Console
from torch.profiler import ProfilerActivity, profile

from phi3local.config import load_recipe
from phi3local.model.flops import lora_step_flops
from phi3local.model.load import base_causal_lm
from phi3local.train import recipe as loop

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"


def six_n_flops_per_token(config, seq_len: int) -> float:
    """The full-fine-tuning convention (PaLM): 6 x matmul weights (output projection included) + 12 x L x d x s."""
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = d * head_dim * (heads + 2 * kv_heads) + heads * head_dim * d + 3 * d * config.intermediate_size
    return 6.0 * (layers * per_layer + d * config.vocab_size) + 12.0 * layers * heads * head_dim * seq_len


@pytest.fixture(scope="module")
def profiled_step(tmp_path_factory):
    """One QLoRA step on one unpacked document (eager attention, no checkpointing), FLOPs counted by the profiler."""
    recipe = load_recipe(TINY, [f"output_dir={tmp_path_factory.mktemp('flops') / 'run'}",
                                "model.attn_implementation=eager", "training.gradient_checkpointing=false",
                                "data.packing=false", "training.micro_batch_size=1", "lora.modules_to_save=[]",
                                "training.max_steps=2", "eval.every=0", "training.display=none"])
    run = loop.setup(recipe, overwrite=True, console=Console(file=io.StringIO()))
    try:
        run.model.train()
        docs = run.train_docs
        batch = loop.collate(loop.epoch_plan(run.recipe, docs.lengths, 0)[3], docs.input_ids, docs.labels,
                             run.tokenizer.pad_token_id)
        loop.train_step(run, [batch])  # warm-up
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            loop.train_step(run, [batch])
        counted = {}
        for e in prof.key_averages():
            counted[e.key] = counted.get(e.key, 0) + (getattr(e, "flops", 0) or 0)
        return recipe, base_causal_lm(run.model).config, batch, counted
    finally:
        loop.cleanup(run)


def test_the_count_equals_the_matmuls_torch_runs_for_a_lora_step(profiled_step):
    recipe, config, batch, executed = profiled_step
    assert batch.padded_tokens == batch.real_tokens and 0 < batch.trained_tokens < batch.real_tokens
    length = batch.real_tokens
    flops = lora_step_flops(config, length, recipe.lora.target_modules, recipe.lora.r, [])
    linear_only = lora_step_flops(config, 0, recipe.lora.target_modules, recipe.lora.r, [])
    attention = flops.total(length, batch.trained_tokens) - linear_only.total(length, batch.trained_tokens)
    # Linear layers, LoRA and the loss head on trained tokens: exactly torch's matrix multiplies (the fused LoRA
    # node, phi3local.model.fused_lora, runs some of them as addmm).
    assert linear_only.total(length, batch.trained_tokens) == executed["aten::mm"] + executed.get("aten::addmm", 0)
    # Eager attention multiplies the whole L x L square and masks it: twice the causal half counted here.
    assert executed["aten::bmm"] == 2 * attention
    # The full-fine-tuning 6N convention counts 1.3x this tiny step's need (weight gradients of frozen
    # layers, the output projection on every token): an MFU on it can pass 100% for LoRA.
    six_n = six_n_flops_per_token(config, length) * length
    assert six_n > 1.3 * flops.total(length, batch.trained_tokens)


def test_phi3_mini_counts_from_its_real_shapes():
    from phi3local.model.shapes import known_shape

    mini = known_shape("microsoft/Phi-3-mini-4k-instruct")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    d, inter, vocab, layers = 3072, 8192, 32064, 32
    linear = d * 3 * d + d * d + d * 2 * inter + inter * d  # 113.2M weights per layer
    lora = 16 * ((d + 3 * d) + (d + d) + (d + 2 * inter) + (inter + d))
    first_input_grad = 2 * d * 3 * d + 2 * 16 * d
    flops = lora_step_flops(mini, 0, targets, 16)
    assert flops.per_token == layers * (4 * linear + 6 * lora) - first_input_grad
    assert flops.per_trained_token == 4 * d * vocab
    # Attention: 6 x heads x head_dim x (document length) per token and layer.
    assert lora_step_flops(mini, 2048, targets, 16).per_token - flops.per_token == layers * 6 * 3072 * 2048
    # A fully trained lm_head adds its weight gradient; trained embeddings need the first input gradient.
    trained = lora_step_flops(mini, 0, targets, 16, ["embed_tokens", "lm_head"])
    assert trained.per_trained_token == 6 * d * vocab and trained.per_token == flops.per_token + first_input_grad
    assert lora_step_flops(mini, 0, targets, 16, task="classification").per_trained_token == 0
    # Against the 6N convention at 2048 tokens with 20% of them trained: about two thirds of it (0.64).
    need = lora_step_flops(mini, 2048, targets, 16).total(1.0, 0.2)
    assert 0.6 < need / six_n_flops_per_token(mini, 2048) < 0.7
