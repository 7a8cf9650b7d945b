"""Does rounding batch widths up to a multiple pay on this machine? (decides data.pad_to_multiple_of: auto on CPU)

Times QLoRA training steps (the loop's forward_loss, backward, AdamW step; 4-bit NF4 base, LoRA r16 on all
linear layers) of a Phi-3-shaped small model (hidden 768, 12 heads, 4 layers, vocabulary 32064, as in issue
17) on micro-batches of 4 rows whose widths differ by a few tokens from step to step (each step a width not seen before),
collated
as they are (pad_to_multiple_of=1) and rounded up (default 64). The two kinds alternate step by step, in
swapped order every other step, after one warm-up step of each; prints the median seconds per step of each,
wall clock and this process's CPU time (less disturbed when other processes share the cores).

    .venv/bin/python -m kernels_bench.pad_widths [--multiple 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multiple", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="steps of each kind")
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args()

    from transformers import Phi3Config, Phi3ForCausalLM

    from phi3local.config import load_recipe
    from phi3local.model.load import load_model, resolve_model_path
    from phi3local.model.tokenizer import load_tokenizer
    from phi3local.quiet import silence_known_noise
    from phi3local.train import recipe as loop
    from phi3local.train.batching import collate

    silence_known_noise()
    folder = tempfile.mkdtemp(prefix="phi3-shaped-")
    # Phi3Config's defaults are Phi-3-mini's (vocabulary, positions, RoPE, special tokens): only the size shrinks.
    config = Phi3Config(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                        num_key_value_heads=12)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(folder)
    recipe = load_recipe(None, [f"model.name_or_path={folder}", "lora.modules_to_save=[]", "lora.dropout=0",
                                "training.gradient_checkpointing=false", "data.max_seq_len=1024",
                                f"training.micro_batch_size={args.rows}", "training.optimizer=adamw"])
    loaded = load_model(recipe, load_tokenizer(resolve_model_path("tiny")), torch.device("cpu"))
    loaded.model.train()
    optimizer = loop.make_optimizer(loaded.model, recipe, loaded.device)
    g = torch.Generator().manual_seed(1)

    def step_seconds(width: int, multiple: int) -> float:
        # Rows of `width` - 0..15 tokens: the longest sets the width, as in a length-grouped micro-batch.
        ids = [torch.randint(3, 32000, (width - (i * 5) % 16,), generator=g).tolist() for i in range(args.rows)]
        batch = collate([[i] for i in range(args.rows)], ids, [list(x) for x in ids], 32000,
                        pad_to_multiple_of=multiple)
        start, cpu = time.perf_counter(), time.process_time()
        loss_sum, _, _ = loop.forward_loss(recipe, loaded.model, batch)  # what train_step does for one micro-batch
        (loss_sum / batch.trained_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    step_seconds(300, 1), step_seconds(300, args.multiple)  # warm-up
    # Widths spread over a window of `multiple` tokens, shifted by 1-3 tokens each step: always new shapes.
    widths = [193 + (i * 23) % 63 for i in range(args.steps)]
    times: dict[int, list[tuple[float, float]]] = {1: [], args.multiple: []}
    for i, width in enumerate(widths):
        order = (1, args.multiple) if i % 2 == 0 else (args.multiple, 1)
        for multiple in order:
            times[multiple].append(step_seconds(width, multiple))
    print(f"widths {widths} (rounded: {sorted({-(-w // args.multiple) * args.multiple for w in widths})})")
    medians = {}
    for multiple, samples in times.items():
        wall, cpu = (statistics.median(s[k] for s in samples) for k in (0, 1))
        medians[multiple] = wall, cpu
        print(f"pad_to_multiple_of={multiple}: median {wall:.3f} s/step wall, {cpu:.3f} s/step process CPU; "
              f"wall {[round(s[0], 2) for s in samples]}")
    (wall1, cpu1), (wall_m, cpu_m) = medians[1], medians[args.multiple]
    print(f"rounded / exact: wall {wall_m / wall1:.3f}, process CPU {cpu_m / cpu1:.3f}")


if __name__ == "__main__":
    main()
