"""stories260K converted to Phi3ForCausalLM against a float64 re-implementation of llama2.c's run.c."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phi3local.model.llama2c import (
    STORIES_CHAT_TEMPLATE,
    ensure_stories260k,
    phi3_state_dict,
    read_llama2c,
)
from phi3local.model.tiny import STAMP_FILE
from phi3local.model.tokenizer import load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LEGACY = SHARED_DATA / "stories260k" / "checkpoint_legacy.bin"
V1 = SHARED_DATA / "stories260k" / "checkpoint_v1.bin"
SP_MODEL = SHARED_DATA / "stories260k-tok512" / "tok512.model"



# ---------------------------------------------------------------- an independent llama2.c reference


def read_legacy_checkpoint(path: Path) -> tuple[dict, dict]:
    """Parse the legacy file on its own (the converter reads checkpoint_v1.bin, a different layout)."""
    raw = path.read_bytes()
    names = ("dim", "hidden", "layers", "heads", "kv_heads", "vocab", "seq_len")
    p = {name: int(v) for name, v in zip(names, np.frombuffer(raw, "<i4", 7))}
    dim, hidden, layers, vocab = p["dim"], p["hidden"], p["layers"], p["vocab"]
    hs = p["dim"] // p["heads"]
    kv_dim = p["kv_heads"] * hs
    shapes = [("emb", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("rms_final", (dim,))]
    floats = np.frombuffer(raw, "<f4", offset=28).astype(np.float64)
    w, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = floats[at : at + n].reshape(shape)
        at += n
    return p, w


def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weight


def rope_interleaved(x: np.ndarray, head_size: int) -> np.ndarray:
    """run.c: rotate pairs (x[i], x[i+1]) by pos * 10000^(-(i % head_size) / head_size)."""
    t, width = x.shape
    i = np.arange(0, width, 2)
    freq = 1.0 / 10000.0 ** ((i % head_size) / head_size)
    angle = np.arange(t)[:, None] * freq[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    out = x.copy()
    out[:, 0::2] = x[:, 0::2] * cos - x[:, 1::2] * sin
    out[:, 1::2] = x[:, 0::2] * sin + x[:, 1::2] * cos
    return out


def reference_logits(p: dict, w: dict, tokens: list[int]) -> np.ndarray:
    hs = p["dim"] // p["heads"]
    group = p["heads"] // p["kv_heads"]
    t = len(tokens)
    causal = np.triu(np.full((t, t), -np.inf), 1)
    x = w["emb"][tokens]
    for layer in range(p["layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = rope_interleaved(xb @ w["wq"][layer].T, hs)
        k = rope_interleaved(xb @ w["wk"][layer].T, hs)
        v = xb @ w["wv"][layer].T
        heads = []
        for h in range(p["heads"]):
            kv = h // group  # GQA: consecutive query heads share one key/value head
            qh, kh, vh = q[:, h * hs : (h + 1) * hs], k[:, kv * hs : (kv + 1) * hs], v[:, kv * hs : (kv + 1) * hs]
            scores = qh @ kh.T / np.sqrt(hs) + causal
            att = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((att / att.sum(-1, keepdims=True)) @ vh)
        x = x + np.concatenate(heads, -1) @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        h1, h3 = xb @ w["w1"][layer].T, xb @ w["w3"][layer].T
        x = x + ((h1 / (1 + np.exp(-h1))) * h3) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["emb"].T  # shared classifier


def reference_greedy(p: dict, w: dict, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(reference_logits(p, w, tokens)[-1].argmax()))
    return tokens[len(prompt):]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return ensure_stories260k(tmp_path_factory.mktemp("stories") / "stories260k", shared_data=SHARED_DATA)


@pytest.fixture(scope="module")
def model(converted):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(converted):
    return load_tokenizer(converted)


@pytest.fixture(scope="module")
def reference():
    return read_legacy_checkpoint(LEGACY)


# ---------------------------------------------------------------- tests


def test_config_of_the_converted_model(converted, model):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (64, 172, 5, 8, 4, 512, 512)
    assert cfg["tie_word_embeddings"] is True and cfg["sliding_window"] is None
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 1, 0)
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_logits_match_llama2c_reference(model, tokenizer, reference):
    text = "Once upon a time, there was a little girl named Lily. She liked to play with her red ball."
    tokens = tokenizer(text)["input_ids"]
    assert tokens[0] == 1  # plain encoding starts with BOS, as llama2.c's did
    assert tokens[1:16] == [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    expected = reference_logits(*reference, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_greedy_generation_matches_reference_and_reads_as_a_story(model, tokenizer, reference):
    want = reference_greedy(*reference, [1], 30)
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=30, min_new_tokens=30)
    assert out[0, 1:].tolist() == want
    text = tokenizer.decode(want, skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text  # llama2.c's test_all.py


def test_both_llama2c_formats_give_the_same_weights():
    c1, w1 = read_llama2c(V1)
    c0, w0 = read_llama2c(LEGACY)
    assert c1 == c0 and c1.shared_classifier
    sd1, sd0 = phi3_state_dict(c1, w1), phi3_state_dict(c0, w0)
    assert sd1.keys() == sd0.keys() and all(torch.equal(sd1[k], sd0[k]) for k in sd1)


def test_chat_template_ends_every_turn_with_eos(tokenizer):
    assert tokenizer.chat_template == STORIES_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Lily saw a big dog."},
                {"role": "assistant", "content": "Who: Lily. What: dog."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s>User: Lily saw a big dog.<s>Assistant: Who: Lily. What: dog.<s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>User: Lily saw a big dog.<s>Assistant:" and text.startswith(prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 0
    assert ids.count(1) == 3 and ids[-1] == 1  # `<s>` in rendered text is the single token 1
    # The answer is tokenised exactly as SentencePiece tokenises it on its own (dummy-prefix `▁` included).
    answer = tokenizer("Who: Lily. What: dog.", add_special_tokens=False)["input_ids"]
    assert ids[-1 - len(answer) : -1] == answer
    assert answer == [410, 448, 415, 414, 467, 317, 426, 410, 448, 415, 294, 467, 400, 428, 426]  # sentencepiece


def test_assistant_mask_trains_the_answer_and_its_eos(tokenizer):
    from phi3local.data.template import IGNORE, encode_conversation

    messages = [{"role": "user", "content": "Tom found a red ball."},
                {"role": "assistant", "content": "Who: Tom. What: ball."}]
    enc = encode_conversation(tokenizer, messages, max_seq_len=512)
    trained = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    answer = tokenizer("Who: Tom. What: ball.", add_special_tokens=False)["input_ids"]
    assert trained == answer + [1]


def test_auto_tokenizer_agrees_and_cache_is_reused(converted, tokenizer):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(converted)
    text = "<s>User: Hi there.</s>Assistant: Hello!</s>"
    assert auto(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    stamp = (converted / STAMP_FILE).stat().st_mtime_ns
    assert ensure_stories260k(converted, shared_data=SHARED_DATA) == converted
    assert (converted / STAMP_FILE).stat().st_mtime_ns == stamp
