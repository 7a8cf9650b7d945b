"""export --format gguf/ollama: llama.cpp's converter and quantizer, parity through llama-cpp-python, the Modelfile.

Models: the tiny merged Phi-3 (tests/export_helpers.py), stories260K tuned on a task (tests/stories_models.py),
and the LongRoPE and Phi-4-mini stand-ins (phi3local/model/family.py). Each GGUF is built once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import export_helpers as H
import llama_cpp  # noqa: F401  (`make install-gguf`, a prerequisite of `make test`)
import pytest

from phi3local.export.gguf import GGUFExportError, export_gguf
from phi3local.export.gguf_convert import (
    find_converter,
    gguf_model_name,
    pre_tokenizer_name,
    rstrips_chat_tokens,
    vocab_kind,
    write_sentencepiece_model,
)
from phi3local.export.gguf_parity import TOLERANCES
from phi3local.export.ollama import (
    MODELFILE,
    check_template,
    derive_turn_format,
    go_template,
    render_go_template,
)
from phi3local.export.tokenizer_files import load_hf_tokenizer
from phi3local.folders import OutputExistsError

NEW_TOKENS = 24


def _export(tmp_path_factory, model: Path, quant: str, fmt: str = "gguf") -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gguf") / f"{model.name}-{quant}"
    return out, export_gguf(model, out, quant, fmt, new_tokens=NEW_TOKENS, show=False)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return H.tiny_merged(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_f16(merged, tmp_path_factory):
    return _export(tmp_path_factory, merged, "f16")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from stories_models import tuned_stories

    return tuned_stories(tmp_path_factory) / "merged"


def _parity(out: Path) -> dict:
    return json.loads((out / "parity.json").read_text())


def _assert_passes_with_identical_greedy(out: Path, report: dict, quant: str, near_ties: bool = False) -> dict:
    """Parity within the type's tolerance, greedy identical; near_ties (untrained stand-ins): a divergence is
    allowed only where PyTorch's own two choices are closer than the measured logit error."""
    parity = _parity(out)
    tol = TOLERANCES[quant]
    assert parity["passed"] and parity["tolerance_relative"] == tol
    for p in parity["prompts"]:
        assert p["max_abs_diff"] <= tol * p["logit_scale"], p["prompt"]
        assert len(p["prompt_max_abs_diff_per_position"]) == p["prompt_tokens"]
        if near_ties and p["greedy_first_divergence"] is not None:
            assert 0 <= p["greedy_divergence_torch_margin"] <= p["max_abs_diff"], p
            continue
        assert p["greedy_first_divergence"] is None, (p["prompt"], p["greedy_tokens_torch"], p["greedy_tokens_gguf"])
        assert p["tokenizer_match"], (p["prompt"], p.get("tokens_torch_tokenizer"), p.get("tokens_gguf_tokenizer"))
    assert parity["stop_ids_in_gguf"] and parity["chat_template_in_gguf"]
    assert report["parity"]["passed"]
    return parity


# ----------------------------------------------------------------------------------------- the tiny Phi-3


def test_tiny_f16_parity_greedy_and_metadata(tiny_f16, merged):
    out, report = tiny_f16
    parity = _assert_passes_with_identical_greedy(out, report, "f16")
    assert len(parity["prompts"]) == 3 and all(p["decode_max_abs_diff_per_position"] for p in parity["prompts"])
    assert parity["greedy_compared"] == 3 * NEW_TOKENS  # its stop tokens never win (export_helpers)
    assert (out / "model-f16.gguf").is_file() and report["file"]["tensor_types"].keys() == {"F16", "F32"}
    meta = report["file"]["metadata"]
    assert meta["general.architecture"] == "phi3" and "phi3" in meta["general.name"]  # llama.cpp's rstrip rule
    assert report["file"]["chat_template"] and report["file"]["output_weight"]  # untied: its own lm_head
    assert report["conversion"]["tokenizer_model"].startswith("written from tokenizer.json")
    assert not [p for p in out.iterdir() if p.name.startswith("_")]
    assert json.loads((out / "export_report.json").read_text())["quant"] == "f16"


def test_tiny_q8_0_within_its_tolerance(merged, tmp_path_factory):
    out, report = _export(tmp_path_factory, merged, "q8_0")
    parity = _parity(out)
    assert parity["passed"] and parity["tolerance_relative"] == TOLERANCES["q8_0"]
    assert "Q8_0" in report["file"]["tensor_types"]


def test_tiny_q4_k_m_written_and_its_error_reported(merged, tmp_path_factory):
    out, report = _export(tmp_path_factory, merged, "q4_k_m")
    parity = _parity(out)
    assert (out / "model-q4_k_m.gguf").is_file() and not (out / "_model-f16.gguf").exists()
    assert "passed" not in parity and parity["relative_error"] > 0  # reported, not bounded
    assert report["conversion"]["quantize_seconds"] > 0
    # 64-wide rows cannot hold 256-wide K-quant blocks: llama.cpp falls back, and the report says to what.
    assert set(report["file"]["tensor_types"]) - {"F32"}


def test_refusals(merged, tmp_path, tiny_f16):
    with pytest.raises(GGUFExportError, match="--quant 'q9'"):
        export_gguf(merged, tmp_path / "a", "q9", show=False)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(GGUFExportError, match="merge it first"):
        export_gguf(adapter, tmp_path / "b", show=False)
    out, _ = tiny_f16
    with pytest.raises(OutputExistsError):
        export_gguf(merged, out, "f16", show=False)


# ----------------------------------------------------------------------------------------- stories260K, tuned


def test_stories_tuned_f16_parity_and_greedy(stories, tmp_path_factory):
    out, report = _export(tmp_path_factory, stories, "f16")
    parity = _assert_passes_with_identical_greedy(out, report, "f16")
    # Its turns end with <s> (id 1) and text with </s> (id 2): both end generation in llama.cpp.
    assert {1, 2} <= set(parity["eog_token_ids_gguf"])
    assert report["file"]["metadata"]["tokenizer.ggml.add_bos_token"] is True


def test_stories_tuned_q4_k_m_error_reported_and_ollama_modelfile(stories, tmp_path_factory):
    out, report = _export(tmp_path_factory, stories, "q4_k_m", fmt="ollama")
    assert "relative_error" in _parity(out) and (out / "model-q4_k_m.gguf").is_file()
    modelfile = (out / MODELFILE).read_text()
    assert modelfile.startswith("FROM ./model-q4_k_m.gguf\n")
    assert 'PARAMETER stop "<s>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    # llama.cpp adds its BOS itself (add_bos_token): the template leaves it out.
    assert report["ollama"]["bos_added_by_runtime"] == "<s>"
    assert report["ollama"]["create"].startswith("ollama create merged -f ")


# ----------------------------------------------------------------------------------------- family stand-ins


def _member_with_switch_256(tmp_path_factory, name: str) -> Path:
    """The family stand-in `name` with its LongRoPE switch at 256 (max 512 positions) instead of 64: llama.cpp
    rounds its context up to a multiple of 256, so it reaches the short factors only when the switch is >= 256
    (the real models' is 4096). Weights spread as export_helpers' (default init gives near-tied logits)."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from phi3local.data.demo import demo_texts
    from phi3local.model.family import MEMBERS, build_member_model, build_phi4_tokenizer, vocab_rows
    from phi3local.model.tiny import _vocab_of, build_tiny_tokenizer

    m = dataclasses.replace(MEMBERS[name], original_max_position_embeddings=256, max_position_embeddings=512)

    def build(folder: Path) -> None:
        texts = list(demo_texts())
        if m.tokenizer == "phi4":
            build_phi4_tokenizer(folder, texts, m.vocab_pieces)
        else:
            build_tiny_tokenizer(folder, texts, m.vocab_pieces, split_punctuation=True)
        build_member_model(folder, m, vocab_rows(len(_vocab_of(folder)), m))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.manual_seed(0)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 if "embed" in pname else 0.08)
        model.save_pretrained(folder)

    return H.cached(tmp_path_factory, f"gguf-{name}-switch256", build)


@pytest.mark.parametrize("name", ["longrope", "phi4mini"])
def test_family_stand_in_f16(name, tmp_path_factory):
    model = _member_with_switch_256(tmp_path_factory, name)
    out, report = _export(tmp_path_factory, model, "f16")
    parity = _assert_passes_with_identical_greedy(out, report, "f16", near_ties=True)
    assert report["file"]["rope_factors"]  # LongRoPE's short and long factors as tensors
    lr = parity["longrope"]
    assert [p["n_ctx"] for p in parity["prompts"]] == [256, 256, 256, 512]
    assert [p["prompt_on_long_factors"] for p in parity["prompts"]] == [False, False, False, True]
    # A context above the switch puts a short prompt on the long factors: PyTorch does not.
    assert lr["short_prompt_at_long_ctx_relative_error"] > TOLERANCES["f16"]
    meta = report["file"]["metadata"]
    if name == "phi4mini":
        assert meta["phi3.rope.dimension_count"] == 48  # 0.75 of the 64-dim head
        assert not report["file"]["output_weight"]  # tied: written once, token_embd is the LM head
        assert meta["tokenizer.ggml.model"] == "gpt2" and "phi3" not in meta["general.name"]
    else:
        assert meta["phi3.rope.dimension_count"] == 16


@pytest.mark.parametrize("name", ["longrope", "phi4mini"])
def test_family_stand_in_with_switch_64_is_refused(name, tmp_path_factory, tmp_path):
    with pytest.raises(GGUFExportError, match="multiple of 256"):
        export_gguf(H.family_member(tmp_path_factory, name), tmp_path / "out", show=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- units


def test_converter_comes_from_the_sdist():
    folder = find_converter()
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "conversion" / "phi.py").is_file()


def test_sentencepiece_model_from_tokenizer_json_encodes_like_it(merged, tmp_path):
    import sentencepiece as spm

    from phi3local.data.demo import demo_texts

    tok_json = json.loads((merged / "tokenizer.json").read_text())
    assert vocab_kind(tok_json) == "spm" and rstrips_chat_tokens(tok_json)
    n = write_sentencepiece_model(tok_json, tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.vocab_size() == n
    tokenizer = load_hf_tokenizer(merged)
    texts = list(demo_texts())[:200] + H.CORPUS
    same = sum(sp.encode(t) == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    assert same == len(texts)


def test_byte_level_vocab_and_names(tmp_path_factory):
    model = H.family_member(tmp_path_factory, "phi4mini")
    tok_json = json.loads((model / "tokenizer.json").read_text())
    assert vocab_kind(tok_json) == "gpt2" and pre_tokenizer_name(tok_json) == "gpt-2"
    assert not rstrips_chat_tokens(tok_json)
    assert gguf_model_name(Path("/x/phi-3-mini-merged"), False) == "phi-mini-merged"
    assert gguf_model_name(Path("/x/merged"), True) == "phi3 merged"


@pytest.mark.parametrize("template_name", ["PHI3_CHAT_TEMPLATE", "PHI4_CHAT_TEMPLATE", "PHI4_IM_CHAT_TEMPLATE",
                                           "STORIES_CHAT_TEMPLATE"])
def test_modelfile_template_renders_like_the_chat_template(merged, template_name):
    from phi3local.model import llama2c
    from phi3local.model import tokenizer as tokmod

    template = getattr(tokmod, template_name, None) or getattr(llama2c, template_name)
    tokenizer = load_hf_tokenizer(merged)
    tokenizer.chat_template = template
    go = go_template(derive_turn_format(tokenizer))
    checks = check_template(tokenizer, go)  # system, multi-turn and assistant-history chats
    assert len(checks) == 4 and all(c["same"] for c in checks)
    assert go.count("{{ .Content }}") == 3


def test_phi3_template_is_ollamas_own_shape(merged):
    tokenizer = load_hf_tokenizer(merged)
    go = go_template(derive_turn_format(tokenizer))
    # Ollama's phi3 template, as its library ships it, renders the same text for user/assistant/system chats.
    ollama_phi3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "V"}]
    assert render_go_template(go, chat) == render_go_template(ollama_phi3, chat)


def test_a_template_that_adds_a_default_system_turn_is_refused(merged):
    tokenizer = load_hf_tokenizer(merged)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|system|>\nYou are helpful.<|end|>\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{{ '<|assistant|>\n' }}")
    with pytest.raises(GGUFExportError, match="cannot be derived"):
        derive_turn_format(tokenizer)
