"""Compare an onnxruntime-genai export with the PyTorch model it came from, position by position.

For each prompt:
  * the prompt pass: logits of every prompt position, onnxruntime-genai vs PyTorch;
  * the decode pass: onnxruntime-genai generates greedily token by token through its KV cache; the logits
    of each step are compared with PyTorch's logits at the same position of the same sequence
    (one teacher-forced forward over prompt + the generated tokens);
  * greedy agreement: PyTorch's own greedy continuation vs onnxruntime-genai's (identical tokens,
    first divergence).

Pitfall this code handles: `generator.get_output("logits")` holds the logits of the last *computed*
step. `append_tokens` runs the prompt; the first `generate_next_token()` only picks a token from those
prompt logits; every later `generate_next_token()` first runs the model on the previous token. So after
call k >= 2 the logits belong to input token k-1 (position prompt_len + k - 2), the ones token k was
chosen from. The code checks that alignment (argmax of each logits row == the token chosen from it).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from phi3local.export.tokenizer_files import load_hf_tokenizer
from phi3local.serve.chat import longrope_switch, reprefill_at_switch
from phi3local.serve.json_files import as_id_list, read_json, write_json

DEFAULT_PROMPTS = (
    "Once upon a time",
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
)


# Repeated to make the LongRoPE prompts as long as needed.
_FILLER = ("Once upon a time a little cat played in the sun, and the quick brown fox jumped over the lazy dog. ")


def longrope_prompts(tokenizer, switch: int, new_tokens: int) -> list[str]:
    """Two prompts for a LongRoPE model: one a few tokens past the switch (its prompt runs on the long factors)
    and one ending a few tokens before it, so that a decode of new_tokens crosses the switch through the cache."""
    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    words = (_FILLER * (2 + 2 * switch // max(tokens(_FILLER), 1))).split(" ")
    text, prompts = "", []
    short_target = switch - max(2, min(8, new_tokens // 4))
    for word in words:
        text = f"{text} {word}" if text else word
        n = tokens(text)
        if not prompts and n >= short_target:
            prompts.append(text)  # n in [switch - 8, switch - 8 + one word]: the decode crosses
        if n > switch + 4:
            return prompts + [text]
    raise ValueError(f"could not build a prompt of {switch + 4} tokens")


# What `--parity` checks: full = the prompts and, for a LongRoPE model, prompts past and across its switch;
# short = the prompts only; none = nothing.
PARITY_LEVELS = ("full", "short", "none")
SHORT_PARITY_NOTE = "not compared (--parity short): the long rotary factors past the switch went unchecked"

# Logit rows made at a time from the final hidden states: at Phi-4-mini's 200,064-row vocabulary all logits of a
# 4,100-token LongRoPE prompt are 3.3 GB in float32, and holding every position's at once (two forwards, their
# concatenation, the differences) killed a real-size int4 export's parity check at 24.6 GB. A block is 32 MB.
_BLOCK_BYTES = 32 * 1024**2


class ReferenceLogits:
    """PyTorch's logits for every position of ids = prompt_ids + generated tokens, computed as a user gets them, made
    a block of rows at a time from the final hidden states (`rows`), never for every position at once.

    The prompt positions come from one forward of the prompt. Each decode position i comes from a fresh
    forward of ids[:i+1]. Without LongRoPE one forward of ids gives both. With it the factor set follows
    the length of each forward: prefixes of up to `switch` tokens run on the short factors, longer ones on the
    long factors (a long prompt runs all of its positions on the long factors). A causal model's position i
    depends only on tokens <= i, so two forwards (the first `switch` tokens, then all) give them all.
    """

    def __init__(self, model, prompt_ids: list[int], ids: list[int], switch: int | None):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's LoRA
        self._head = causal_lm.get_output_embeddings()  # layers sit inside the decoder and the head it wraps
        decoder = causal_lm.get_decoder()

        def final_hidden(tokens: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return decoder(input_ids=torch.tensor([tokens])).last_hidden_state[0]

        whole = final_hidden(ids)
        if not (switch is None or len(ids) <= switch or len(prompt_ids) > switch):
            whole = torch.cat([final_hidden(ids[:switch]), whole[switch:]])
        self._hidden = whole  # [len(ids), hidden]: small next to the logits
        self.block = max(1, _BLOCK_BYTES // (4 * self._head.weight.shape[0]))

    def __len__(self) -> int:
        return self._hidden.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Logits of positions [start, stop) as float32 [stop - start, vocab]."""
        with torch.no_grad():
            return self._head(self._hidden[start:stop]).float().numpy()

    def blocks(self, start: int, stop: int):
        """(first position, logits rows) for [start, stop), a block at a time."""
        for a in range(start, stop, self.block):
            yield a, self.rows(a, min(a + self.block, stop))


def reference_logits(model, prompt_ids: list[int], ids: list[int], switch: int | None) -> np.ndarray:
    """Every position's logits of ReferenceLogits at once (for short sequences; see ReferenceLogits)."""
    return ReferenceLogits(model, prompt_ids, ids, switch).rows(0, len(ids))


def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def _to_f32(array) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return a


def _og_stop_ids(onnx_dir: Path) -> list[int]:
    cfg = read_json(Path(onnx_dir) / "genai_config.json")
    return as_id_list(cfg["model"].get("eos_token_id"))


def load_reference_model(hf_model_dir: Path, adapter_path: Path | None = None):
    """The float32 PyTorch model (with the LoRA adapter applied, unmerged, when one is given)."""
    from transformers import AutoModelForCausalLM

    from phi3local.model.pretrained import from_pretrained

    model = from_pretrained(AutoModelForCausalLM, str(hf_model_dir), dtype=torch.float32)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    return model.eval()


@torch.no_grad()
def fake_quantize_int4_(model: torch.nn.Module, block_size: int = 32) -> torch.nn.Module:
    """Round every nn.Linear weight the way the builder's int4 export does (in place), for a reference.

    onnxruntime's MatMulNBits quantizer, symmetric (the builder's default): blocks of `block_size` along
    the input dimension, scale = (the block's value of largest magnitude) / -8, q = clamp(round(w / scale),
    -8, 7). An int4 export built with accuracy_level=0 (float activations) matches a model rounded like
    this to float32 precision; the CPU default accuracy_level=4 also rounds activations to int8.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data.float()
            n, k = w.shape
            if k % block_size:
                raise ValueError(f"in_features {k} is not a multiple of block_size {block_size}")
            blocks = w.reshape(n, k // block_size, block_size)
            idx = blocks.abs().argmax(-1, keepdim=True)
            scale = torch.gather(blocks, -1, idx) / -8.0
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            q = torch.clamp(torch.round(blocks / scale), -8, 7)
            module.weight.data = (q * scale).reshape(n, k).to(module.weight.dtype)
    return model


@torch.no_grad()
def _hf_greedy(model, ids: list[int], n: int, stop_ids: list[int], through_stops: bool = False) -> list[int]:
    """Greedy decoding with transformers' KV cache; an explicit config, so no generation_config defaults
    (sampling, repetition penalty) of the model folder get in. through_stops: stop ids are never picked."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=stop_ids or None,
                              pad_token_id=stop_ids[0] if stop_ids else 0, min_new_tokens=n if through_stops else 0)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=config)
    return [int(t) for t in out[0, len(ids):]]


def logit_diffs(ref: ReferenceLogits, prompt_len: int, prompt_logits: np.ndarray, step_logits: list[np.ndarray],
                ignored_ids: list[int] | None = None) -> dict:
    """A prompt's logit measurements against PyTorch's (ref, every position of prompt + generated tokens): max |diff|
    per prompt position and per decode step, their maxima, the logit scale and the relative error.

    ignored_ids: ids left out of the decode steps' diffs (a runtime that may not pick them writes its own floor
    there, e.g. while decoding through stop tokens).
    """
    p, n = prompt_len, len(step_logits)
    prompt_diff, decode_diff, scale = [], [], 0.0
    for a, block in ref.blocks(0, p + n):
        scale = max(scale, float(np.abs(block).max()))
        in_prompt = block[:max(0, p - a)]
        if len(in_prompt):
            prompt_diff.append(np.abs(prompt_logits[a:a + len(in_prompt)] - in_prompt).max(axis=-1))
        decoded = block[len(in_prompt):]
        if len(decoded):
            first = a + len(in_prompt) - p
            delta = np.abs(np.stack(step_logits[first:first + len(decoded)]) - decoded)
            if ignored_ids:
                delta[:, ignored_ids] = 0.0
            decode_diff.append(delta.max(axis=-1))
    prompt_diff = np.concatenate(prompt_diff) if prompt_diff else np.zeros(0, dtype=np.float32)
    decode_diff = np.concatenate(decode_diff) if decode_diff else np.zeros(0, dtype=np.float32)
    max_diff = float(max(prompt_diff.max(initial=0.0), decode_diff.max(initial=0.0)))
    return {
        "prompt_max_abs_diff_per_position": [float(x) for x in prompt_diff],
        "decode_max_abs_diff_per_position": [float(x) for x in decode_diff],
        "prompt_max_abs_diff": float(prompt_diff.max(initial=0.0)),
        "decode_max_abs_diff": float(decode_diff.max(initial=0.0)),
        "max_abs_diff": max_diff,
        "logit_scale": scale,
        "relative_error": max_diff / scale if scale else 0.0,
    }


def greedy_agreement(torch_tokens: list[int], tokens: list[int]) -> dict:
    """How far a runtime's greedy tokens follow PyTorch's: tokens compared, identical, the first divergence
    (None when they agree; a shorter run diverges where it ends)."""
    first_div = next((i for i, (a, b) in enumerate(zip(torch_tokens, tokens)) if a != b), None)
    if first_div is None and len(torch_tokens) != len(tokens):
        first_div = min(len(torch_tokens), len(tokens))
    return {
        "greedy_compared": max(len(torch_tokens), len(tokens)),
        "greedy_identical": sum(a == b for a, b in zip(torch_tokens, tokens)),
        "greedy_first_divergence": first_div,
    }


def overall(results: list[dict]) -> dict:
    """A report's worst and summed measurements over its prompts (relative_error: the worst position relative to
    its own prompt's scale, the check export_onnx applies for fp32)."""
    return {
        "max_abs_diff": max((r["max_abs_diff"] for r in results), default=0.0),
        "logit_scale": max((r["logit_scale"] for r in results), default=0.0),
        "relative_error": max((r["relative_error"] for r in results), default=0.0),
        "greedy_identical": sum(r["greedy_identical"] for r in results),
        "greedy_compared": sum(r["greedy_compared"] for r in results),
        "greedy_all_agree": all(r["greedy_first_divergence"] is None for r in results),
        "tokenizer_match": all(r["tokenizer_match"] for r in results),
    }


def within_tolerance(results: list[dict], tolerance: float) -> bool:
    """Every prompt's worst position within tolerance x its logit scale (a NaN never is)."""
    return all(r["max_abs_diff"] <= tolerance * r["logit_scale"] and not math.isnan(r["max_abs_diff"]) for r in results)


def _og_run(og_model, ids: list[int], new_tokens: int, context_length: int, switch: int | None = None,
            stop_ids: list[int] | None = None):
    """Prompt logits, per-step decode logits and the greedy tokens from onnxruntime-genai.

    stop_ids: given, they are never picked (min_length), so the decode runs all new_tokens steps.
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    # One step more than new_tokens so that the last generated token's logits get computed too.
    max_length = min(len(ids) + new_tokens + 1, context_length)
    params.set_search_options(max_length=max_length, do_sample=False, min_length=max_length if stop_ids else 0)
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    prompt_logits = _to_f32(gen.get_output("logits"))[0]  # [P, V]
    tokens: list[int] = []
    step_logits: list[np.ndarray] = []  # step_logits[j]: logits for input tokens[j]
    chosen_from: list[np.ndarray] = [prompt_logits[-1]]
    while not gen.is_done() and len(tokens) < new_tokens + 1:
        gen.generate_next_token()
        if tokens:  # from the second call on, the model ran on the previous token first
            row = _to_f32(gen.get_output("logits")).reshape(-1, prompt_logits.shape[-1])[-1]
            step_logits.append(row)
            chosen_from.append(row)
        tokens.append(int(gen.get_next_tokens()[0]))
        reprefill_at_switch(gen, len(ids), switch)  # as `chat` and `serve` do
    del gen
    def pick(row: np.ndarray) -> int:
        if stop_ids:
            row = row.copy()
            row[stop_ids] = -np.inf
        return int(np.argmax(row))

    aligned = all(pick(row) == tok for row, tok in zip(chosen_from, tokens))
    # The extra step's token is only there to get the logits of the last kept token.
    return prompt_logits, step_logits[:new_tokens], tokens[:new_tokens], aligned


def _compare_prompt(model, tokenizer, og_model, og_tok, text: str, new_tokens: int, context_length: int,
                    switch: int | None, stop_ids: list[int], through_stops: bool) -> dict:
    """One prompt's report entry. Its own function so that the runtime's prompt logits ([prompt, vocab]: GBs at a
    long prompt and a 200k vocabulary) are freed before the next prompt runs."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    og_ids = [int(x) for x in og_tok.encode(text)]
    prompt_logits, step_logits, og_tokens, aligned = _og_run(og_model, ids, new_tokens, context_length, switch,
                                                             stop_ids if through_stops else None)
    ref = ReferenceLogits(model, ids, ids + og_tokens, switch)
    p = len(ids)
    # Through stop tokens, onnxruntime-genai's min_length writes the lowest float into their logits.
    diffs = logit_diffs(ref, p, prompt_logits, step_logits, stop_ids if through_stops else None)
    del prompt_logits, step_logits, ref
    hf_tokens = _hf_greedy(model, ids, new_tokens, stop_ids, through_stops)
    entry = {
        "prompt": text,
        "prompt_tokens": p,
        "tokenizer_match": og_ids == ids,
        **diffs,
        "greedy_tokens_onnx": og_tokens,
        "greedy_tokens_torch": hf_tokens,
        **greedy_agreement(hf_tokens, og_tokens),
        "greedy_text_onnx": og_tok.decode(np.asarray(og_tokens, dtype=np.int32)) if og_tokens else "",
        "logits_alignment_ok": aligned,
    }
    if through_stops:
        entry["decoded_through_stops"] = True
    if switch is not None:  # which LongRoPE factors this prompt compared
        entry["longrope_switch"] = switch
        entry["prompt_on_long_factors"] = p > switch
        entry["decode_crosses_switch"] = p <= switch < p + len(diffs["decode_max_abs_diff_per_position"])
    return entry


def check_parity(
    onnx_dir: Path,
    hf_model_dir: Path,
    prompts=None,
    new_tokens: int = 64,
    *,
    adapter_path: Path | None = None,
    tolerance: float | None = None,
    out_path: Path | None = None,
    reference_model=None,
    execution_provider: str | None = None,
    long_context: bool = True,
    show: bool = False,
) -> dict:
    """Compare the ONNX model in onnx_dir with the PyTorch model in hf_model_dir; write parity.json.

    prompts: texts (used as they are) or message lists (rendered with the chat template); default: three,
        and for a LongRoPE export (longrope.json) two more: one past the switch and one whose decode crosses it
        (both decoded through stop tokens, so that every step is compared).
    new_tokens: greedy tokens generated per prompt (each also compared through the KV cache).
    adapter_path: a peft adapter the export applied (builder adapter_path); the reference applies it too.
    tolerance: when given, `passed` says whether every position's max |diff| <= tolerance x logit scale.
    out_path: where to write the report (default onnx_dir/parity.json; pass False to skip writing).
    reference_model: an already loaded PyTorch model to compare with (e.g. fake_quantize_int4_'s result).
    execution_provider: None runs with genai_config.json's providers; "cpu" forces the CPU EP.
    long_context: False leaves out a LongRoPE export's two long prompts (`--parity short`: at 3.8B on a CPU their
        forwards of switch + 4 tokens take most of an hour); the report then says the long factors went unchecked.
    Returns the report: per prompt, max |logit diff| per prompt position and per decode step, logit
    scale (max |logit| of PyTorch), relative error, greedy agreement and first divergence; and overall.
    """
    import onnxruntime_genai as og

    onnx_dir, hf_model_dir = Path(onnx_dir), Path(hf_model_dir)
    t0 = time.perf_counter()
    tok_dir = onnx_dir if (onnx_dir / "tokenizer.json").is_file() else hf_model_dir
    tokenizer = load_hf_tokenizer(tok_dir)
    model = reference_model if reference_model is not None else load_reference_model(hf_model_dir, adapter_path)
    genai_cfg = read_json(onnx_dir / "genai_config.json")
    context_length = int(genai_cfg["model"].get("context_length", 4096))
    stop_ids = _og_stop_ids(onnx_dir)
    if execution_provider == "cpu":
        # Run a model exported for another target on the CPU EP (fp16 and int4 CUDA graphs run there;
        # bf16 does not): the numbers then show the graph's precision, not that target's kernels.
        og_config = og.Config(str(onnx_dir))
        og_config.clear_providers()
        og_model = og.Model(og_config)
    else:
        og_model = og.Model(str(onnx_dir))
    og_tok = og.Tokenizer(og_model)
    switch = longrope_switch(onnx_dir)

    results = []
    runs = [(prompt, False) for prompt in (prompts if prompts is not None else DEFAULT_PROMPTS)]
    if prompts is None and switch is not None and long_context:
        # Past the switch, so the long factors are compared too, and one decode that crosses it (through
        # stop tokens: a trained model may end its turn before the switch).
        runs += [(prompt, True) for prompt in longrope_prompts(tokenizer, switch, new_tokens)]
    for prompt, through_stops in runs:
        results.append(_compare_prompt(model, tokenizer, og_model, og_tok, _prompt_text(tokenizer, prompt),
                                       new_tokens, context_length, switch, stop_ids, through_stops))
    del og_model

    report = {
        "onnx_dir": str(onnx_dir),
        "hf_model_dir": str(hf_model_dir),
        "adapter_path": str(adapter_path) if adapter_path else None,
        "execution_provider": execution_provider or "as configured",
        "new_tokens": new_tokens,
        "stop_token_ids": stop_ids,
        **overall(results),
        "logits_alignment_ok": all(r["logits_alignment_ok"] for r in results),
        "seconds": round(time.perf_counter() - t0, 3),
        "prompts": results,
    }
    if switch is not None and not long_context:
        report["long_context"] = SHORT_PARITY_NOTE
    if tolerance is not None:
        report["tolerance_relative"] = tolerance
        report["passed"] = within_tolerance(results, tolerance)
    if out_path is not False:
        write_json(Path(out_path) if out_path else onnx_dir / "parity.json", report)
    if show:
        print_parity(report)
    return report


def print_parity(report: dict, console=None) -> None:
    """A rich table of a parity report."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=f"parity: {report['onnx_dir']}")
    for col in ("prompt", "tokens", "prompt max|Δ|", "decode max|Δ|", "logit scale", "rel. error", "greedy",
                "tokenizer"):
        table.add_column(col, justify="left" if col == "prompt" else "right")
    for r in report["prompts"]:
        prompt = r["prompt"].replace("\n", "⏎")
        table.add_row(
            prompt[:40] + ("…" if len(prompt) > 40 else ""),
            str(r["prompt_tokens"]),
            f"{r['prompt_max_abs_diff']:.2e}",
            f"{r['decode_max_abs_diff']:.2e}",
            f"{r['logit_scale']:.3g}",
            f"{r['relative_error']:.2e}",
            f"{r['greedy_identical']}/{r['greedy_compared']}"
            + ("" if r["greedy_first_divergence"] is None else f" (≠ at {r['greedy_first_divergence']})"),
            "same" if r["tokenizer_match"] else "DIFFERS",
        )
    console.print(table)
    verdict = ""
    if "passed" in report:
        verdict = f"  tolerance {report['tolerance_relative']:g} x scale: " + (
            "[green]passed[/green]" if report["passed"] else "[red]FAILED[/red]")
    console.print(f"max |Δ| {report['max_abs_diff']:.3g}, relative {report['relative_error']:.3g}, greedy "
                  f"{report['greedy_identical']}/{report['greedy_compared']}{verdict}")
