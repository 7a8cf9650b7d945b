"""Generation speed: onnxruntime-genai (int4 and fp32 exports) vs PyTorch `generate`, same model, one run.

    python -m kernels_bench.generate_speed [--hidden 768 --layers 4 --new-tokens 128]

Builds a Phi-3-shaped random model (real Phi-3 vocabulary size and tokenizer), exports it with the
project's `export_onnx`, then times greedy decoding of the same prompt with each engine; writes
kernels_bench/results/generate_speed.json. A random model rarely emits a stop token, so every engine
generates the full budget (checked and reported).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "phi3-mini-tokenizer"


def build_model(folder: Path, hidden: int, layers: int, heads: int, intermediate: int) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    from phi3local.model.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                        sliding_window=None, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    Phi3ForCausalLM(config).save_pretrained(folder)
    load_tokenizer(TOKENIZER).save_pretrained(folder)
    return folder


def torch_tokens_per_second(model_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=32000)
            times.append(time.perf_counter() - t0)
    generated = out.shape[1] - ids.shape[1]
    median = float(np.median(times[1:]))
    return {"engine": "pytorch generate (fp32)", "tokens": generated, "seconds": median,
            "tokens_per_second": generated / median, "spread": [min(times[1:]), max(times[1:])]}


def onnx_tokens_per_second(onnx_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int, label: str) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    times, counts = [], []
    for _ in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + new_tokens, min_length=len(prompt_ids) + new_tokens,
                                  do_sample=False)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        times.append(time.perf_counter() - t0)
        counts.append(n)
    median = float(np.median(times[1:]))
    return {"engine": f"onnxruntime-genai {label}", "tokens": counts[-1], "seconds": median,
            "tokens_per_second": counts[-1] / median, "spread": [min(times[1:]), max(times[1:])]}


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    from phi3local.export.onnx import export_onnx
    from phi3local.model.tokenizer import load_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "hf", args.hidden, args.layers, args.heads, args.intermediate)
        tok = load_tokenizer(model_dir)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Summarize this dialog: Anna: hi! Ben: hello"}],
                                         add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        exports = {}
        for precision in ("int4", "fp32"):
            report = export_onnx(model_dir, tmp / precision, precision=precision, target="cpu", parity="none", show=False)
            exports[precision] = {"seconds": report.get("seconds"), "size_bytes": report.get("size_bytes")}
        rows = []
        for _ in range(2):  # alternate engines so machine drift hits all of them
            rows.append(torch_tokens_per_second(model_dir, prompt_ids, args.new_tokens, args.repeats))
            for precision in ("int4", "fp32"):
                rows.append(onnx_tokens_per_second(tmp / precision, prompt_ids, args.new_tokens, args.repeats, precision))
    best = {}
    for r in rows:
        best.setdefault(r["engine"], []).append(r["tokens_per_second"])
    summary = {engine: float(np.median(v)) for engine, v in best.items()}
    torch_tps = summary["pytorch generate (fp32)"]
    result = {"config": vars(args), "prompt_tokens": len(prompt_ids), "exports": exports, "runs": rows,
              "tokens_per_second": summary, "ratio_to_pytorch": {k: v / torch_tps for k, v in summary.items()},
              "torch": torch.__version__}
    out = REPO / "kernels_bench" / "results" / "generate_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"greedy generation, {args.new_tokens} new tokens, Phi-3-shaped h{args.hidden} L{args.layers}")
    for col in ("engine", "tokens/s", "ratio to PyTorch"):
        table.add_column(col)
    for engine, tps in summary.items():
        table.add_row(engine, f"{tps:.1f}", f"{tps / torch_tps:.2f}x")
    Console().print(table)
    Console().print(f"exports: {exports}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
