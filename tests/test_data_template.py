"""Chat-template encoding and the assistant-only loss mask, with the real Phi-3-mini tokenizer."""

from __future__ import annotations

import pytest
from data_helpers import phi3_tokenizer

from phi3local.data.template import (
    IGNORE,
    ChatTemplateError,
    OverLength,
    encode_conversation,
    encode_text,
    end_suffix,
)

USER, ASSISTANT, SYSTEM, END, EOS = 32010, 32001, 32006, 32007, 32000




@pytest.fixture(scope="module")
def tok():
    return phi3_tokenizer()


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous stretches of trained tokens."""
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def msg(role, content):
    return {"role": role, "content": content}


def test_documented_example_ids_and_mask(tok):
    # The example in phi3-mini-tokenizer/SOURCE.md.
    messages = [msg("system", "You are a helpful assistant."), msg("user", "Hello world"), msg("assistant", "Hi!")]
    enc = encode_conversation(tok, messages, 4096)
    assert enc.input_ids[:1] == [SYSTEM]
    # "Hi" after the tag is "▁Hi" (6324), as sentencepiece/llama.cpp encode it. SOURCE.md's example shows 18567
    # ("Hi" without "▁"): that came from AutoTokenizer, which transformers 5 rebuilds with a different
    # pre-tokenizer (FACTS.md: it fails 15 of 47 llama.cpp vectors); the ids of the system and user turns agree.
    assert tok.convert_ids_to_tokens([6324, 18567]) == ["▁Hi", "Hi"]
    assert enc.input_ids[-9:] == [USER, 15043, 3186, END, ASSISTANT, 6324, 29991, END, EOS]
    assert enc.labels[-9:] == [IGNORE] * 5 + [6324, 29991, END, IGNORE]
    assert all(lab == IGNORE for lab in enc.labels[:-4])
    assert end_suffix(tok) == "<|endoftext|>"
    assert (enc.truncated_turns, enc.full_length) == (0, len(enc.input_ids))


def test_multi_turn_every_assistant_turn_trained(tok):
    messages = [msg("system", "Be brief."), msg("user", "What is 2 plus 2?"), msg("assistant", "2 plus 2 is 4."),
                msg("user", "Spell cat backwards."), msg("assistant", "tac"),
                msg("user", "Thanks!"), msg("assistant", "You are welcome.")]
    enc = encode_conversation(tok, messages, 4096)
    runs = trained_runs(enc.input_ids, enc.labels)
    assert [tok.decode(r) for r in runs] == ["2 plus 2 is 4.<|end|>", "tac<|end|>", "You are welcome.<|end|>"]
    # Each run starts right after an <|assistant|> tag; tags, system, user turns and the final eos are masked.
    for r in runs:
        start = next(i for i in range(len(enc.input_ids)) if enc.input_ids[i : i + len(r)] == r)
        assert enc.input_ids[start - 1] == ASSISTANT
    for i, lab in zip(enc.input_ids, enc.labels):
        if i in (USER, ASSISTANT, SYSTEM, EOS):
            assert lab == IGNORE


def test_weight_zero_turn_is_not_trained(tok):
    messages = [msg("user", "a?"), {**msg("assistant", "Wrong answer."), "weight": 0},
                msg("user", "b?"), msg("assistant", "Right answer.")]
    enc = encode_conversation(tok, messages, 4096)
    assert [tok.decode(r) for r in trained_runs(enc.input_ids, enc.labels)] == ["Right answer.<|end|>"]


def test_leading_space_swallowed_by_tag_is_not_trained(tok):
    # <|assistant|> has rstrip=True: it absorbs "\n " here, and must not become a target itself.
    enc = encode_conversation(tok, [msg("user", "Hi"), msg("assistant", " Hello there")], 4096)
    assert [tok.decode(r) for r in trained_runs(enc.input_ids, enc.labels)] == ["Hello there<|end|>"]


def long_conversation():
    messages = [msg("system", "You count things.")]
    for k in range(5):
        messages += [msg("user", f"Question number {k}: " + "word " * 20), msg("assistant", f"Answer number {k}.")]
    return messages


def test_truncation_drops_whole_oldest_exchanges_and_keeps_system(tok):
    messages = long_conversation()
    full = encode_conversation(tok, messages, 4096)
    two_pairs = encode_conversation(tok, [messages[0]] + messages[-4:], 4096)
    enc = encode_conversation(tok, messages, len(two_pairs.input_ids))
    assert enc.truncated_turns == 3
    assert enc.input_ids == two_pairs.input_ids and enc.labels == two_pairs.labels
    assert enc.full_length == len(full.input_ids) and enc.truncated
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|system|> You count things.<|end|><|user|> Question number 3:")
    for k in range(3):
        assert f"number {k}" not in text
    runs = trained_runs(enc.input_ids, enc.labels)
    assert [tok.decode(r) for r in runs] == ["Answer number 3.<|end|>", "Answer number 4.<|end|>"]
    # One token less than two exchanges: only the last exchange is kept.
    enc = encode_conversation(tok, messages, len(two_pairs.input_ids) - 1)
    assert enc.truncated_turns == 4
    assert "Question number 3" not in tok.decode(enc.input_ids)


def test_over_length(tok):
    messages = long_conversation()
    with pytest.raises(OverLength, match="data.truncation=error"):
        encode_conversation(tok, messages, 50, truncation="error")
    with pytest.raises(OverLength, match="even its last exchange alone"):
        encode_conversation(tok, messages, 20)
    with pytest.raises(OverLength, match="single exchange"):
        encode_conversation(tok, [msg("user", "word " * 50), msg("assistant", "ok")], 20)


def test_template_without_eos_suffix_trains_its_end_marker():
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    tok = phi3_tokenizer(template)
    assert end_suffix(tok) == ""
    enc = encode_conversation(tok, [msg("user", "Hi"), msg("assistant", "Hello")], 4096)
    assert enc.input_ids[-1] == END
    assert [tok.decode(r) for r in trained_runs(enc.input_ids, enc.labels)] == ["Hello<|end|>"]


def test_template_that_breaks_the_prefix_property_is_refused():
    # Writes the number of messages first, so a shorter render is not a prefix of the longer one.
    template = ("{{ messages|length }}\n{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
                "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    tok = phi3_tokenizer(template)
    with pytest.raises(ChatTemplateError, match="prefix"):
        encode_conversation(tok, [msg("user", "Hi"), msg("assistant", "Hello")], 4096)


def test_template_that_drops_system_messages_is_refused():
    # Phi-3's original April-2024 template: user and assistant only.
    template = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
                "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
                "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
                "{% endif %}{% endfor %}")
    tok = phi3_tokenizer(template)
    enc = encode_conversation(tok, [msg("user", "Hi"), msg("assistant", "Hello")], 4096)
    assert enc.input_ids[0] == 1  # the template's own BOS, not a second one
    assert [tok.decode(r) for r in trained_runs(enc.input_ids, enc.labels)] == ["Hello<|end|>"]
    with pytest.raises(ChatTemplateError, match="system"):
        encode_conversation(tok, [msg("system", "S"), msg("user", "Hi"), msg("assistant", "Hello")], 4096)


def test_encode_text(tok):
    cls = encode_text(tok, "I love this lamp.", 64, label=2)
    assert cls.label == 2 and cls.labels == [IGNORE] * len(cls.input_ids)
    assert tok.decode(cls.input_ids) == "I love this lamp."
    lm = encode_text(tok, "Once upon a time.", 64, train_all=True)
    assert lm.input_ids[-1] == EOS and lm.labels == lm.input_ids
    cut = encode_text(tok, "word " * 100, 10, train_all=True)
    # 100 x "▁word", the trailing space as "▁", then eos.
    assert len(cut.input_ids) == 10 and cut.input_ids[-1] != EOS and cut.full_length == 102 and cut.truncated
    with pytest.raises(OverLength):
        encode_text(tok, "word " * 100, 10, truncation="error")
