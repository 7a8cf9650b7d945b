"""LongRoPE across the switch: what onnxruntime-genai does by itself, and what `chat` and `serve` add.

transformers picks the factor set per forward from the sequence length: a fresh forward of more than
`original_max_position_embeddings` tokens runs every position on the long factors. A KV-cache decode that
starts short keeps the short-factor keys of its first tokens, so after the switch it drifts from a fresh
forward unless it re-prefills. Measured here on a tiny LongRoPE model with sharp attention (weights of std
0.2, so a drift changes greedy tokens): onnxruntime-genai 0.18 re-prefills by itself only at sequence length
4097 and only at batch 1; `chat`/`serve` re-prefill once at any other switch point.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import export_helpers as H
import numpy as np
import onnxruntime_genai as og
import pytest
import torch

from phi3local.export.onnx import export_onnx
from phi3local.export.parity import load_reference_model, reference_logits
from phi3local.serve import chat as chat_mod
from phi3local.serve.chat import OnnxChatModel, longrope_switch
from phi3local.serve.engine import OnnxEngine, Prompt

NEW_TOKENS = 40


def sharp_variant(src: Path, dst: Path, switch: int) -> Path:
    """src's tokenizer and architecture with the switch at `switch`, weights re-drawn with std 0.2, and the stop
    tokens' output rows zeroed (a random model then never ends its turn, so every run is NEW_TOKENS long)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["original_max_position_embeddings"] = switch
    config["max_position_embeddings"] = 4 * switch
    config["rope_parameters"]["original_max_position_embeddings"] = switch
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    torch.manual_seed(0)
    stops = json.loads((dst / "generation_config.json").read_text())["eos_token_id"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed" in name else 0.2)
        model.lm_head.weight[stops] = 0.0
    model.save_pretrained(dst)
    return dst


def _build(tmp_path_factory, switch: int):
    base = H.family_member(tmp_path_factory, "longrope")
    folder = tmp_path_factory.mktemp(f"sharp{switch}")
    hf = sharp_variant(base, folder / "hf", switch)
    onnx = folder / "onnx"
    # With parity at 64: its LongRoPE prompts (past the switch; a decode across it) must pass on this model
    # too. At 4096 the tests below compare the decode themselves (parity's 4100-token prompts cost ~20 s).
    report = export_onnx(hf, onnx, precision="fp32", new_tokens=16, show=False,
                         parity="full" if switch < 4096 else "none")
    return hf, onnx, report, load_reference_model(hf)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    return _build(tmp_path_factory, 64)


@pytest.fixture(scope="module")
def sharp4096(tmp_path_factory):
    return _build(tmp_path_factory, 4096)


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(300, 500, length)]  # ordinary pieces


@torch.no_grad()
def fresh_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, each from a fresh full forward (no cache)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def raw_og_decode(onnx: Path, prompts: list[list[int]], n: int):
    """onnxruntime-genai's own greedy loop (no re-prefill of ours): per row, the decode logits and tokens."""
    model = og.Model(str(onnx))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompts[0]) + n, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompts, dtype=np.int32))
    steps, first = [], True
    while not gen.is_done():
        gen.generate_next_token()
        if not first:  # the logits of the token picked one step before
            steps.append(np.asarray(gen.get_output("logits")).reshape(len(prompts), -1, gen_vocab(onnx))[:, -1])
        first = False
    return [(np.stack([s[b] for s in steps]), [int(t) for t in gen.get_sequence(b)]) for b in range(len(prompts))]


def gen_vocab(onnx: Path) -> int:
    return json.loads((onnx / "genai_config.json").read_text())["model"]["vocab_size"]


def decode_drift(reference, onnx: Path, switch: int, batch: int) -> list[tuple[float, float]]:
    """Per row: the largest relative logit error of the decode steps before and after the switch."""
    p = switch - 6
    prompts = [prompt_ids(p, seed=b) for b in range(batch)]
    out = []
    for (steps, seq), prompt in zip(raw_og_decode(onnx, prompts, 16), prompts):
        ref = reference_logits(reference, prompt, seq, switch)[p:p + len(steps)]
        rel = np.abs(steps - ref).max(axis=-1) / np.abs(ref).max()
        positions = np.arange(p, p + len(steps))
        out.append((float(rel[positions < switch].max()), float(rel[positions >= switch].max())))
    return out


def test_export_records_the_switch_and_parity_covers_both_sides(sharp):
    hf, onnx, report, _ = sharp
    assert longrope_switch(onnx) == 64 and report["parity"]["passed"]
    prompts = json.loads((onnx / "parity.json").read_text())["prompts"]
    assert any(p["prompt_on_long_factors"] for p in prompts) and any(p["decode_crosses_switch"] for p in prompts)
    assert all(p["greedy_first_divergence"] is None for p in prompts)


@pytest.mark.parametrize("batch", [1, 2])
def test_ort_genai_alone_drifts_after_a_switch_other_than_4096(sharp, batch):
    _, onnx, _, reference = sharp
    for before, after in decode_drift(reference, onnx, 64, batch):
        assert before < 1e-5 and after > 1e-3, (before, after)


def test_ort_genai_reprefills_by_itself_at_4097_only_at_batch_1(sharp4096):
    _, onnx, _, reference = sharp4096
    (before, after), = decode_drift(reference, onnx, 4096, 1)
    assert before < 1e-5 and after < 1e-5
    for before, after in decode_drift(reference, onnx, 4096, 2):
        assert before < 1e-5 and after > 1e-3, (before, after)


def _chat_tokens(onnx: Path, ids: list[int], n: int = NEW_TOKENS, **sampling) -> list[int]:
    model = OnnxChatModel(onnx)
    return [tok for tok, _ in model.iter_tokens(np.asarray(ids, dtype=np.int32), n, **sampling)]


def test_chat_greedy_across_the_switch_equals_fresh_forwards(sharp, monkeypatch):
    _, onnx, _, reference = sharp
    ids = prompt_ids(58)
    expected = fresh_greedy(reference, ids, NEW_TOKENS)
    assert _chat_tokens(onnx, ids) == expected
    # Without the re-prefill the same loop gives other tokens: the comparison above can fail.
    monkeypatch.setattr(chat_mod, "reprefill_at_switch", lambda *args: False)
    assert _chat_tokens(onnx, ids) != expected


def test_chat_reprefills_once_when_sampling_and_never_for_a_long_prompt(sharp, monkeypatch):
    _, onnx, _, _ = sharp
    done = []
    real = chat_mod.reprefill_at_switch
    monkeypatch.setattr(chat_mod, "reprefill_at_switch", lambda *a: done.append(real(*a)) or done[-1])
    assert len(_chat_tokens(onnx, prompt_ids(58), temperature=0.8, top_p=0.95, seed=1)) == NEW_TOKENS
    assert done.count(True) == 1
    done.clear()
    _chat_tokens(onnx, prompt_ids(70))  # past the switch from the start: the prompt ran on the long factors
    assert done.count(True) == 0


def test_serve_requests_across_the_switch_equal_fresh_forwards(sharp):
    _, onnx, _, reference = sharp
    engine = OnnxEngine(onnx)
    prompts = [prompt_ids(58, seed=s) for s in (3, 4)]
    expected = [engine.chat_model.detokenize(fresh_greedy(reference, p, NEW_TOKENS)) for p in prompts]
    texts = [None, None]

    def serve(i):  # one Generator per request, as the server runs them, concurrently
        generation = engine.generate(Prompt(ids=np.asarray(prompts[i], dtype=np.int32), max_new_tokens=NEW_TOKENS))
        texts[i] = "".join(generation)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == expected


def test_chat_at_the_real_switch_leaves_the_reprefill_to_ort_genai(sharp4096, monkeypatch):
    _, onnx, _, reference = sharp4096
    done = []
    real = chat_mod.reprefill_at_switch
    monkeypatch.setattr(chat_mod, "reprefill_at_switch", lambda *a: done.append(real(*a)) or done[-1])
    ids = prompt_ids(4090)
    tokens = _chat_tokens(onnx, ids, 12)  # crosses at the 7th
    # Each token is the argmax of a fresh forward of everything before it (teacher-forced: two forwards
    # instead of twelve of 4100 tokens), which is what greedy from fresh forwards gives.
    fresh = reference_logits(reference, ids, ids + tokens, 4096)[len(ids) - 1:-1]
    assert tokens == [int(row.argmax()) for row in fresh]
    assert True not in done
