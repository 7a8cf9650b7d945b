"""Compare a GGUF (run by llama.cpp through llama-cpp-python) with the PyTorch model it came from.

The same measurements as the ONNX parity report (phi3local/export/parity.py), on the same prompts:

  * prompt pass: llama.cpp's logits at every prompt position (transformers' token ids fed in, so both run the
    same sequence) against PyTorch's;
  * decode pass: llama.cpp generates greedily through its KV cache; each step's logits against PyTorch's at the
    same position of one teacher-forced forward;
  * greedy agreement: PyTorch's own greedy continuation (its stop ids) against llama.cpp's (stopping where
    llama.cpp's vocabulary says end-of-generation, i.e. on the stop ids the GGUF's metadata carries);
  * tokenizer: llama.cpp's own encoding of each prompt text against transformers'.

LongRoPE: llama.cpp picks the factor set once, from the context size it was loaded with (long factors when
n_ctx > original_max_position_embeddings), where transformers picks it per forward from the sequence length.
So the short prompts run with n_ctx = the switch (short factors, as PyTorch uses for them), the prompt past the
switch with the model's whole context (long factors, as PyTorch); a decode that crosses the switch cannot match
and is not compared; a short prompt at the long context is measured and reported as what a user of `-c` above
the switch gets.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from phi3local.export.parity import (
    DEFAULT_PROMPTS,
    SHORT_PARITY_NOTE,
    ReferenceLogits,
    _hf_greedy,
    _prompt_text,
    greedy_agreement,
    load_reference_model,
    logit_diffs,
    longrope_prompts,
    overall,
    within_tolerance,
)
from phi3local.export.tokenizer_files import load_hf_tokenizer
from phi3local.model.tokenizer import collect_stop_ids
from phi3local.serve.json_files import read_json, write_json

# Worst position's max |logit diff| as a fraction of the logit scale that each type must meet. f16/bf16: llama.cpp
# also rounds the activations to the weight type inside each matmul; q8_0: weights and activations in 8-bit blocks.
TOLERANCES = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2}
# llama.cpp rounds every context size up to a multiple of this (llama-context.cpp: GGML_PAD(n_ctx, 256)).
CONTEXT_PAD = 256


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs from C to fd 2 even with verbose=False on some paths; keep it off the user's terminal."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def load_gguf(path: Path, n_ctx: int):
    """A llama_cpp.Llama on path with logits for every position, on the CPU."""
    from llama_cpp import Llama

    threads = max(1, min(4, os.cpu_count() or 1))
    with _quiet_stderr():
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=max(n_ctx, 8), n_ubatch=max(n_ctx, 8),
                     logits_all=True, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False,
                     seed=0)


def eog_ids(llm) -> list[int]:
    """Every id llama.cpp ends generation on (from the GGUF's eos/eot ids and its end-of-turn tokens)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def _gguf_run(llm, ids: list[int], new_tokens: int, eog: set[int], through_stops: bool):
    """Prompt logits, per-step decode logits and greedy tokens from llama.cpp (its KV cache)."""
    llm.reset()
    llm.eval(ids)
    p = len(ids)
    prompt_logits = np.array(llm.scores[:p], dtype=np.float32)
    last = prompt_logits[-1]
    tokens: list[int] = []
    step_logits: list[np.ndarray] = []
    while len(tokens) < new_tokens:
        row = last.copy()
        if through_stops and eog:
            row[sorted(eog)] = -np.inf
        tok = int(np.argmax(row))
        tokens.append(tok)
        if tok in eog or llm.n_tokens >= llm.n_ctx():
            break
        llm.eval([tok])
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        step_logits.append(last)
    return prompt_logits, step_logits, tokens


def _compare(model, tokenizer, llm, text: str, new_tokens: int, stop_ids: list[int], eog: set[int],
             switch: int | None, through_stops: bool = False) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    gg_ids = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]
    budget = min(new_tokens, llm.n_ctx() - len(ids))
    prompt_logits, step_logits, gg_tokens = _gguf_run(llm, ids, budget, eog, through_stops)
    full = ids + gg_tokens
    ref = ReferenceLogits(model, ids, full, None if switch is None or len(ids) > switch else switch)
    p = len(ids)
    diffs = logit_diffs(ref, p, prompt_logits, step_logits, sorted(eog | set(stop_ids)) if through_stops else None)
    hf_tokens = _hf_greedy(model, ids, budget, stop_ids, through_stops)
    agreement = greedy_agreement(hf_tokens, gg_tokens)
    first_div = agreement["greedy_first_divergence"]
    margin = None
    if first_div is not None and first_div < min(len(hf_tokens), len(gg_tokens)):
        # How far apart PyTorch itself puts the two choices there: a near tie (margin below the measured error)
        # flips on any rounding.
        row = ref.rows(p - 1 + first_div, p + first_div)[0]
        margin = float(row[hf_tokens[first_div]] - row[gg_tokens[first_div]])
    entry = {
        "prompt": text,
        "prompt_tokens": p,
        "n_ctx": llm.n_ctx(),
        "tokenizer_match": gg_ids == ids,
        **diffs,
        "greedy_tokens_gguf": gg_tokens,
        "greedy_tokens_torch": hf_tokens,
        **agreement,
        "greedy_divergence_torch_margin": margin,
        "greedy_text_gguf": tokenizer.decode(gg_tokens),
    }
    if not entry["tokenizer_match"]:
        entry["tokens_gguf_tokenizer"] = gg_ids
        entry["tokens_torch_tokenizer"] = ids
    if through_stops:
        entry["decoded_through_stops"] = True
    if switch is not None:
        entry["longrope_switch"] = switch
        entry["prompt_on_long_factors"] = p > switch
    return entry


def check_gguf_parity(gguf_path: Path, hf_model_dir: Path, quant: str, prompts=None, new_tokens: int = 32, *,
                      tolerance: float | None = None, out_path: Path | None = None, reference_model=None,
                      long_context: bool = True, show: bool = False) -> dict:
    """Compare gguf_path (llama.cpp) with the PyTorch model in hf_model_dir; write parity.json beside the GGUF.

    prompts: texts or message lists (chat template); default: the ONNX parity prompts, and for a LongRoPE model
        one prompt past the switch (decoded through stop tokens).
    long_context: False leaves that prompt out (`--parity short`); the report says so.
    tolerance: given (default: TOLERANCES[quant] when the type has one), `passed` says whether every prompt's
        worst position is within tolerance x its logit scale.
    """
    from phi3local.model.shapes import longrope_switch_of

    gguf_path, hf_model_dir = Path(gguf_path), Path(hf_model_dir)
    t0 = time.perf_counter()
    tokenizer = load_hf_tokenizer(hf_model_dir)
    model = reference_model if reference_model is not None else load_reference_model(hf_model_dir)
    config = read_json(hf_model_dir / "config.json")
    switch = longrope_switch_of(config)
    max_ctx = int(config.get("max_position_embeddings") or 4096)
    stop_ids = collect_stop_ids(hf_model_dir)
    tolerance = TOLERANCES.get(quant) if tolerance is None else tolerance

    texts = [_prompt_text(tokenizer, p) for p in (prompts if prompts is not None else DEFAULT_PROMPTS)]
    # llama.cpp rounds n_ctx up to a multiple of CONTEXT_PAD; the short factors need n_ctx <= switch.
    short_ctx = (switch // CONTEXT_PAD) * CONTEXT_PAD if switch is not None else min(max_ctx, 4096)
    results = []
    llm = load_gguf(gguf_path, short_ctx)
    eog = set(eog_ids(llm))
    metadata = {k: v for k, v in llm.metadata.items() if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    for text in texts:
        results.append(_compare(model, tokenizer, llm, text, new_tokens, stop_ids, eog, switch))
    del llm
    longrope = None
    if switch is not None and prompts is None and not long_context:
        longrope = {"switch": switch, "skipped": SHORT_PARITY_NOTE}
    elif switch is not None and prompts is None:
        long_text = longrope_prompts(tokenizer, switch, new_tokens)[-1]
        llm = load_gguf(gguf_path, max_ctx)
        results.append(_compare(model, tokenizer, llm, long_text, new_tokens, stop_ids, eog, switch, through_stops=True))
        # What a user running with a context above the switch gets on a short prompt: the long factors.
        at_long = _compare(model, tokenizer, llm, texts[0], new_tokens, stop_ids, eog, switch)
        del llm
        longrope = {"switch": switch, "n_ctx_short": short_ctx, "n_ctx_long": max_ctx,
                    "short_prompt_at_long_ctx_relative_error": at_long["relative_error"],
                    "short_prompt_at_long_ctx_greedy": f"{at_long['greedy_identical']}/{at_long['greedy_compared']}",
                    "note": "llama.cpp picks the LongRoPE factors from n_ctx at load time, not per sequence"}

    report = {
        "gguf": str(gguf_path),
        "hf_model_dir": str(hf_model_dir),
        "quant": quant,
        "runtime": "llama.cpp via llama-cpp-python " + _llama_cpp_version(),
        "new_tokens": new_tokens,
        "stop_token_ids_torch": stop_ids,
        "eog_token_ids_gguf": sorted(eog),
        "stop_ids_in_gguf": set(stop_ids) <= eog,
        **overall(results),
        "gguf_metadata": {k: metadata[k] for k in sorted(metadata) if k != "tokenizer.chat_template"},
        "chat_template_in_gguf": metadata.get("tokenizer.chat_template") == _hf_chat_template(tokenizer),
        "seconds": 0.0,
        "prompts": results,
    }
    if longrope is not None:
        report["longrope"] = longrope
    if tolerance is not None:
        report["tolerance_relative"] = tolerance
        report["passed"] = within_tolerance(results, tolerance)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if out_path is not False:
        write_json(Path(out_path) if out_path else gguf_path.parent / "parity.json", report)
    if show:
        print_gguf_parity(report)
    return report


def _hf_chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def _llama_cpp_version() -> str:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except (ImportError, AttributeError):
        return "?"


def print_gguf_parity(report: dict, console=None) -> None:
    """A rich table of a GGUF parity report."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=f"parity ({report['quant']}): {report['gguf']}")
    for col in ("prompt", "tokens", "n_ctx", "max|Δ|", "logit scale", "rel. error", "greedy", "tokenizer"):
        table.add_column(col, justify="left" if col == "prompt" else "right")
    for r in report["prompts"]:
        prompt = r["prompt"].replace("\n", "⏎")
        table.add_row(prompt[:40] + ("…" if len(prompt) > 40 else ""), str(r["prompt_tokens"]), str(r["n_ctx"]),
                      f"{r['max_abs_diff']:.2e}", f"{r['logit_scale']:.3g}", f"{r['relative_error']:.2e}",
                      f"{r['greedy_identical']}/{r['greedy_compared']}", "same" if r["tokenizer_match"] else "DIFFERS")
    console.print(table)
