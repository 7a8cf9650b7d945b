"""The tokenizer loader against independent references: llama.cpp's vectors and onnxruntime-extensions' ids."""

import json
from pathlib import Path

import pytest

from phi3local.model.tokenizer import (
    PHI3_CHAT_TEMPLATE,
    PHI3_SPECIAL_TOKENS,
    TokenizerLoadError,
    load_tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHI3_DIR = SHARED_DATA / "phi3-mini-tokenizer"
VOCAB = SHARED_DATA / "llamacpp-phi3-vocab" / "ggml-vocab-phi-3.gguf"
SEP = "\n__ggml_vocab_test__\n"



@pytest.fixture(scope="module")
def phi3():
    return load_tokenizer(PHI3_DIR)


def llama_cpp_vectors() -> list[tuple[str, list[int]]]:
    """Parse the .inp/.out pair as llama.cpp's tests/test-tokenizer-0.cpp does.

    Each input is followed by SEP (also the last one), so the text after the final SEP is not a test;
    the .out file has one line of ids per input. Bytes are decoded without newline translation.
    """
    raw = Path(str(VOCAB) + ".inp").read_bytes().decode("utf-8")
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = Path(str(VOCAB) + ".out").read_bytes().decode("utf-8").splitlines()
    assert len(inputs) == len(lines), (len(inputs), len(lines))
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, lines)]


def test_all_llama_cpp_reference_encodings(phi3):
    vectors = llama_cpp_vectors()
    # 46 strings (the "47" of a Python str.split counts the empty piece after the final separator).
    assert len(vectors) == 46
    assert sum(1 for _, ids in vectors if not ids) == 1  # the empty string is one real test
    failed = [text for text, ids in vectors if phi3.encode(text, add_special_tokens=False) != ids]
    assert failed == [], f"{len(failed)} of {len(vectors)} failed: {failed[:5]!r}"


def test_config_fields_and_own_chat_template(phi3):
    config = json.loads((PHI3_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == PHI3_CHAT_TEMPLATE
    assert phi3.chat_template == PHI3_CHAT_TEMPLATE
    assert (phi3.bos_token, phi3.eos_token, phi3.pad_token, phi3.unk_token) == (
        "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>")
    assert phi3.padding_side == "left" and phi3.model_max_length == 4096
    assert phi3.add_bos_token is False and phi3.encode("Hi") == [6324]  # no BOS, as the file says
    assert phi3.convert_tokens_to_ids(PHI3_SPECIAL_TOKENS) == [32000, 32001, 32006, 32007, 32010]


def test_chat_template_ids_match_onnxruntime_extensions(phi3):
    # microsoft/onnxruntime-extensions test/pp_api_test/test_tokenizer_chat.cc, Phi3MiniChatTemplate,
    # which tokenises with these same files ("From HuggingFace Python output").
    messages = [
        {"role": "system", "content": "System message"},
        {"role": "user", "content": "Hello, can you call some tools for me?"},
        {"role": "assistant", "content": "Sure, I can calculate the sum for you!"},
    ]
    text = phi3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|system|>\nSystem message<|end|>\n<|user|>\nHello, can you call some tools for me?<|end|>\n"
                    "<|assistant|>\nSure, I can calculate the sum for you!<|end|>\n<|assistant|>\n")
    ids = phi3.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == [32006, 2184, 2643, 32007, 32010, 15043, 29892, 508, 366, 1246, 777, 8492, 363, 592, 29973,
                   32007, 32001, 18585, 29892, 306, 508, 8147, 278, 2533, 363, 366, 29991, 32007, 32001]


def test_chat_template_short_example(phi3):
    # The `\n` after each chat token is absorbed (rstrip) and each segment keeps its leading `▁`
    # (`▁You`, `▁Hello`, `▁Hi`). transformers 5's AutoTokenizer gives 3492/10994/18567 (no `▁`) here instead.
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello world"},
                {"role": "assistant", "content": "Hi!"}]
    ids = phi3.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == [32006, 887, 526, 8444, 29889, 32007, 32010, 15043, 3186, 32007, 32001, 6324, 29991, 32007, 32000]
    assert phi3.decode(ids, skip_special_tokens=True) == "You are helpful. Hello world Hi!"


def test_saved_copy_loads_the_same(phi3, tmp_path):
    phi3.save_pretrained(tmp_path)  # transformers 5 writes the template to chat_template.jinja
    again = load_tokenizer(tmp_path)
    assert again.chat_template == PHI3_CHAT_TEMPLATE
    for text, ids in llama_cpp_vectors()[:20]:
        assert again.encode(text, add_special_tokens=False) == ids


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(TokenizerLoadError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
