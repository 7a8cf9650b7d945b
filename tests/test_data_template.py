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


# ------------------------------------------------------------------------------------ Phi-4 and reasoning
# Phi-4's tokenizer files are not available here (no Hub; no package ships them): its stand-in (family member
# "phi4") has a byte-level vocabulary with Phi-4's 96 added tokens (lstrip/rstrip as there) and Phi-4's template.


@pytest.fixture(scope="module")
def phi4(tmp_path_factory):
    import export_helpers as H

    from phi3local.model.tokenizer import load_tokenizer

    return load_tokenizer(H.family_member(tmp_path_factory, "phi4"))


@pytest.fixture(scope="module")
def phi4_mini_reasoning(tmp_path_factory):
    """Phi-4-mini's stand-in tokenizer with Phi-4-mini-reasoning's template (its fixed system turn)."""
    import export_helpers as H

    from phi3local.model.tokenizer import PHI4_MINI_REASONING_CHAT_TEMPLATE, load_tokenizer

    tok = load_tokenizer(H.family_member(tmp_path_factory, "phi4mini"))
    tok.chat_template = PHI4_MINI_REASONING_CHAT_TEMPLATE
    return tok


def decoded_runs(tok, enc) -> list[str]:
    return [tok.decode(r) for r in trained_runs(enc.input_ids, enc.labels)]


THOUGHT = "Two and two make four; nothing else to check."
TRACE = f"<think>\n{THOUGHT}\n</think>\n\n"


def test_phi4_im_format_trains_the_answer_and_its_im_end(phi4):
    messages = [msg("system", "Be brief."), msg("user", "Hello there!"), msg("assistant", "Hi, how can I help?")]
    enc = encode_conversation(phi4, messages, 512)
    assert phi4.decode(enc.input_ids) == (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hello there!<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hi, how can I help?<|im_end|>")
    assert end_suffix(phi4) == ""  # nothing follows the last turn: its <|im_end|> ends the row
    assert decoded_runs(phi4, enc) == ["Hi, how can I help?<|im_end|>"]
    tags = {phi4.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_sep|>")}
    assert all(lab == IGNORE for i, lab in zip(enc.input_ids, enc.labels) if i in tags)
    assert enc.labels[-1] == phi4.convert_tokens_to_ids("<|im_end|>") == phi4.eos_token_id
    assert phi4.pad_token_id not in enc.input_ids and phi4.pad_token_id != phi4.eos_token_id


def test_phi4_multi_turn_every_assistant_turn_and_im_end_trained(phi4):
    messages = [msg("system", "Be brief."), msg("user", "What is 2 plus 2?"), msg("assistant", "2 plus 2 is 4."),
                msg("user", "Spell cat backwards."), msg("assistant", "  tac"),  # the tag swallows the spaces
                msg("user", "Thanks!"), msg("assistant", "You are welcome.")]
    enc = encode_conversation(phi4, messages, 512)
    assert decoded_runs(phi4, enc) == ["2 plus 2 is 4.<|im_end|>", "tac<|im_end|>", "You are welcome.<|im_end|>"]
    sep = phi4.convert_tokens_to_ids("<|im_sep|>")
    for r in trained_runs(enc.input_ids, enc.labels):  # each run starts right after an assistant tag's <|im_sep|>
        start = next(i for i in range(len(enc.input_ids)) if enc.input_ids[i: i + len(r)] == r)
        assert enc.input_ids[start - 1] == sep
        assert phi4.decode(enc.input_ids[:start]).endswith("<|im_start|>assistant<|im_sep|>")
    # Truncation keeps the system turn and drops whole exchanges, as for Phi-3.
    last = encode_conversation(phi4, [messages[0]] + messages[-2:], 512)
    cut = encode_conversation(phi4, messages, len(last.input_ids))
    assert cut.truncated_turns == 2 and cut.input_ids == last.input_ids and cut.labels == last.labels


@pytest.mark.parametrize("how", ["field", "content"])
def test_reasoning_trace_trained_or_masked(phi4, how):
    """A `reasoning` field is written as `<think>...</think>` before the answer, exactly as content that opens
    with it: on, the trace is trained with the answer; off, only the answer and <|im_end|> are."""
    answer = msg("assistant", "Four.")
    answer = {**answer, "reasoning": THOUGHT} if how == "field" else msg("assistant", TRACE + "Four.")
    messages = [msg("user", "What is 2 plus 2?"), answer]
    on = encode_conversation(phi4, messages, 512)
    off = encode_conversation(phi4, messages, 512, train_on_reasoning=False)
    assert on.input_ids == off.input_ids  # the model reads the same text either way
    assert phi4.decode(on.input_ids).endswith(f"<|im_sep|>{TRACE}Four.<|im_end|>")
    assert decoded_runs(phi4, on) == [f"{TRACE}Four.<|im_end|>"]
    assert decoded_runs(phi4, off) == ["Four.<|im_end|>"]
    trace_tokens = len(phi4(TRACE, add_special_tokens=False)["input_ids"])
    assert on.n_trained - off.n_trained == trace_tokens > 10


def test_reasoning_masked_in_every_turn_with_system(phi4):
    messages = [msg("system", "Think first."), msg("user", "2 plus 2?"),
                {**msg("assistant", "4."), "reasoning": "Add them."}, msg("user", "And 3 plus 3?"),
                msg("assistant", "<think>Add again.</think>6."), msg("user", "Thanks!"), msg("assistant", "Welcome.")]
    assert decoded_runs(phi4, encode_conversation(phi4, messages, 512)) == [
        "<think>\nAdd them.\n</think>\n\n4.<|im_end|>", "<think>Add again.</think>6.<|im_end|>", "Welcome.<|im_end|>"]
    assert decoded_runs(phi4, encode_conversation(phi4, messages, 512, train_on_reasoning=False)) == [
        "4.<|im_end|>", "6.<|im_end|>", "Welcome.<|im_end|>"]


def test_reasoning_with_think_as_special_tokens(phi4):
    """The same masks when `<think>` and `</think>` are added tokens that swallow the whitespace around them."""
    from tokenizers import AddedToken

    tok = phi4.__class__(tokenizer_object=phi4.backend_tokenizer.__class__.from_str(phi4.backend_tokenizer.to_str()),
                         chat_template=phi4.chat_template, eos_token=phi4.eos_token, pad_token=phi4.pad_token)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True) for t in ("<think>", "</think>")]})
    messages = [msg("user", "2 plus 2?"), {**msg("assistant", "Four."), "reasoning": THOUGHT}]
    on, off = (encode_conversation(tok, messages, 512, train_on_reasoning=flag) for flag in (True, False))
    close = tok.convert_tokens_to_ids("</think>")
    assert close in [x for x in on.labels if x != IGNORE] and close not in off.labels
    assert decoded_runs(tok, off) == ["Four.<|im_end|>"]


def test_phi4_mini_reasoning_template(phi4_mini_reasoning):
    """Phi-4-mini-reasoning's template writes its own system turn (masked), any system message inside it, and
    <|endoftext|> after the last turn (masked); the trace is plain text there."""
    tok = phi4_mini_reasoning
    messages = [msg("system", "Show your steps."), msg("user", "2 plus 2?"),
                {**msg("assistant", "Four."), "reasoning": THOUGHT}]
    on = encode_conversation(tok, messages, 512)
    assert tok.decode(on.input_ids).startswith(
        "<|system|>Your name is Phi, an AI math expert developed by Microsoft. Show your steps.<|end|><|user|>")
    assert end_suffix(tok) == "<|endoftext|>" and on.labels[-1] == IGNORE
    assert decoded_runs(tok, on) == [f"{TRACE}Four.<|end|>"]
    assert decoded_runs(tok, encode_conversation(tok, messages, 512, train_on_reasoning=False)) == ["Four.<|end|>"]
    no_system = encode_conversation(tok, messages[1:], 512, train_on_reasoning=False)
    assert tok.decode(no_system.input_ids).startswith("<|system|>Your name is Phi") and decoded_runs(
        tok, no_system) == ["Four.<|end|>"]


@pytest.mark.parametrize("messages, match", [
    ([msg("user", "q"), {**msg("assistant", "a"), "reasoning": ["steps"]}], r"messages\[1\]\.reasoning must be a string"),
    ([{**msg("user", "q"), "reasoning": "r"}, msg("assistant", "a")], "only assistant turns"),
    ([msg("user", "q"), {**msg("assistant", "a"), "reasoning": "r", "reasoning_content": "r"}], "keep one"),
    ([msg("user", "q"), {**msg("assistant", "<think>x</think>a"), "reasoning": "r"}], "already opens a trace"),
])
def test_bad_reasoning_is_the_rows_problem(phi4, messages, match):
    from phi3local.data.template import TemplateRejected

    with pytest.raises(TemplateRejected, match=match):
        encode_conversation(phi4, messages, 512)


def test_an_unclosed_trace_cannot_be_masked(phi4):
    from phi3local.data.template import TemplateRejected

    messages = [msg("user", "q"), msg("assistant", "<think>never closed, answer")]
    assert decoded_runs(phi4, encode_conversation(phi4, messages, 512)) == [
        "<think>never closed, answer<|im_end|>"]  # trained as written
    with pytest.raises(TemplateRejected, match="never closes it"):
        encode_conversation(phi4, messages, 512, train_on_reasoning=False)
    # Only a trace that opens the content is one: a <think> later in an answer is text like any other.
    later = [msg("user", "q"), msg("assistant", "Write <think> in XML.")]
    assert decoded_runs(phi4, encode_conversation(phi4, later, 512, train_on_reasoning=False)) == [
        "Write <think> in XML.<|im_end|>"]


def test_reasoning_fields_are_folded_into_the_content_when_read():
    """Cleaning, deduplication and the safety screen see the trace: it is in the content from the start."""
    from phi3local.data import clean
    from phi3local.data.formats import to_example
    from phi3local.data.records import Location, RawRecord

    def example(data, fmt="messages"):
        return to_example(RawRecord(data, Location("f.jsonl", line=1)), fmt)

    a = example({"messages": [msg("user", "q"), {**msg("assistant", "Four."), "reasoning": "Add."}]})
    b = example({"messages": [msg("user", "q"), {**msg("assistant", "Four."), "reasoning_content": "Count."}]})
    assert a.messages[1] == msg("assistant", "<think>\nAdd.\n</think>\n\nFour.")
    assert b.messages[1]["content"].startswith("<think>\nCount.") and clean.example_key(a) != clean.example_key(b)
    pc = example({"prompt": "q", "completion": "Four.", "reasoning": "Add."}, "prompt_completion")
    alpaca = example({"instruction": "q", "output": "Four.", "reasoning": "Add."}, "alpaca")
    assert pc.messages[-1] == alpaca.messages[-1] == a.messages[1]
    bad = example({"messages": [msg("user", "q"), {**msg("assistant", "a"), "reasoning": 3}]})
    assert bad.messages[1]["reasoning"] == 3  # left for encoding to report with the row's location


@pytest.mark.parametrize("text, opened, expected", [
    ("<think>\nAdd.\n</think>\n\nFour.", False, ("Add.", "Four.")),
    ("  <think>Add.</think>Four.", False, ("Add.", "Four.")),
    ("Four.", False, (None, "Four.")),
    ("Write <think> in XML.", False, (None, "Write <think> in XML.")),
    ("<think>Still thinking", False, ("Still thinking", "")),  # stopped inside the trace: no answer yet
    ("Add.</think>\nFour.", True, ("Add.", "Four.")),  # the prompt opened the trace
])
def test_split_reasoning(text, opened, expected):
    from phi3local.data.template import join_reasoning, split_reasoning

    assert split_reasoning(text, opened=opened) == expected
    assert split_reasoning(join_reasoning("Add.", "Four.")) == ("Add.", "Four.")


def test_a_template_that_drops_earlier_traces_is_refused_not_mismasked(phi4):
    """Some reasoning templates keep only the answer of earlier assistant turns: then a conversation is not a
    prefix of a longer one, and a multi-turn row is refused with the reason (a single exchange is fine)."""
    template = ("{% for m in messages %}{% set c = m['content'] %}"
                "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] | trim %}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + c + '<|im_end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
    tok = phi4.__class__(tokenizer_object=phi4.backend_tokenizer.__class__.from_str(phi4.backend_tokenizer.to_str()),
                         chat_template=template, eos_token=phi4.eos_token, pad_token=phi4.pad_token)
    one = [msg("user", "2 plus 2?"), {**msg("assistant", "4."), "reasoning": "Add."}]
    assert decoded_runs(tok, encode_conversation(tok, one, 512, train_on_reasoning=False)) == ["4.<|im_end|>"]
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        encode_conversation(tok, one + [msg("user", "3 plus 3?"), {**msg("assistant", "6."), "reasoning": "Add."}], 512)
