"""The embedded tiny default: deterministic, Phi-3's special tokens and template, loads with transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from phi3local.data.demo import demo_texts
from phi3local.model.tiny import STAMP_FILE, build_tiny_model, build_tiny_tokenizer, ensure_tiny_default
from phi3local.model.tokenizer import PHI3_CHAT_TEMPLATE, PHI3_SPECIAL_TOKENS, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_default(tmp_path_factory.mktemp("tiny") / "tiny", demo_texts())


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def test_two_builds_are_identical(tiny, tmp_path):
    again = ensure_tiny_default(tmp_path / "tiny", demo_texts())
    assert (again / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert (again / "config.json").read_text() == (tiny / "config.json").read_text()
    a, b = load_file(tiny / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other_seed = build_tiny_model(tmp_path / "seed1", vocab_size=517, seed=1)
    assert not torch.equal(load_file(other_seed / "model.safetensors")["model.embed_tokens.weight"],
                           a["model.embed_tokens.weight"])


def test_cached_build_is_reused(tiny):
    stamp = (tiny / STAMP_FILE).stat().st_mtime_ns
    assert ensure_tiny_default(tiny, demo_texts()) == tiny
    assert (tiny / STAMP_FILE).stat().st_mtime_ns == stamp
    assert not [p.name for p in tiny.parent.iterdir() if p.name.startswith(".tmp-")]


def test_phi3_special_tokens_and_config(tok):
    ids = tok.convert_tokens_to_ids(PHI3_SPECIAL_TOKENS)
    assert ids == sorted(ids) and len(set(ids)) == 5 and ids[0] == 512  # after the 512 base pieces, Phi-3's order
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|endoftext|>",) * 2 + ("<s>", "<unk>")
    assert tok.chat_template == PHI3_CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]) == [0, 1, 2, 3, 258]


def test_chat_tokens_are_single_ids_and_absorb_the_newline(tok):
    user, assistant, end = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])
    ids = tok.encode("<|user|>\nHello<|end|>\n<|assistant|>\n", add_special_tokens=False)
    hello = tok.encode("Hello", add_special_tokens=False)
    assert ids == [user, *hello, end, assistant]  # no id for any '\n'
    assert tok.convert_ids_to_tokens(hello)[0].startswith("▁")  # each segment starts a word, as in Phi-3
    assert "\n" not in "".join(tok.convert_ids_to_tokens(ids))


def test_chat_template_round_trip(tok):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 2 plus 18?"},
                {"role": "assistant", "content": "2 plus 18 is 20."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nWhat is 2 plus 18?<|end|>\n"
                    "<|assistant|>\n2 plus 18 is 20.<|end|>\n<|endoftext|>")
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    # The '\n' after each tag was absorbed and each segment's `▁` decodes as a space, as with Phi-3's file.
    assert tok.decode(ids) == ("<|system|> You are a helpful assistant.<|end|><|user|> What is 2 plus 18?<|end|>"
                               "<|assistant|> 2 plus 18 is 20.<|end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "You are a helpful assistant. What is 2 plus 18? 2 plus 18 is 20."
    unseen = "Zoë's café: naïve ☕!"  # characters not in the training texts fall back to bytes
    assert tok.decode(tok.encode(unseen, add_special_tokens=False)) == unseen


def test_model_loads_and_gives_logits(tiny, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    cfg = model.config
    assert type(model).__name__ == "Phi3ForCausalLM" and cfg.vocab_size == len(tok) == 517
    assert cfg.sliding_window is None and cfg.tie_word_embeddings is False
    assert cfg.eos_token_id == cfg.pad_token_id == tok.eos_token_id
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(tok.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"]))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


def test_vocab_equal_to_a_layer_width_is_refused(tmp_path):
    # onnxruntime-genai's builder would take the Linear of that width for the LM head.
    with pytest.raises(ValueError, match="layer width"):
        build_tiny_model(tmp_path, vocab_size=256)  # = 2 * intermediate_size


def test_tokenizer_is_a_function_of_its_texts(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 20
    a = build_tiny_tokenizer(tmp_path / "a", texts, vocab_size=300)
    b = build_tiny_tokenizer(tmp_path / "b", texts, vocab_size=300)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = load_tokenizer(a)
    assert tok.decode(tok.encode("the cat sat on the log", add_special_tokens=False)) == "the cat sat on the log"
