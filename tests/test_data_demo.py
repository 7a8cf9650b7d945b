"""The embedded demo data: checked-in files match the generator, are small, regular and pass prepare."""

from __future__ import annotations

import io
import json
import re
from collections import Counter

from data_helpers import phi3_tokenizer
from rich.console import Console

from phi3local.config import recipe_from_dict
from phi3local.data import demo


def test_checked_in_files_match_the_generator():
    assert demo.CHAT_FILE.read_text(encoding="utf-8") == demo.to_jsonl(demo.generate_chat())
    assert demo.CLASSIFICATION_FILE.read_text(encoding="utf-8") == demo.to_jsonl(demo.generate_classification())
    assert demo.main(["--check"]) == 0
    for path in (demo.CHAT_FILE, demo.CLASSIFICATION_FILE):
        assert path.stat().st_size < 200_000


STORY = re.compile(r"(\w+) (\w+) a (\w+) (\w+) ([\w ]+)\.")
ASKS = {"who_what": demo.STORY_ASKS, "capital": demo.CAPITAL_ASKS, "opposite": demo.OPPOSITE_ASKS}


def parse(question: str, answer: str) -> tuple[str, tuple, str]:
    """(kind, what the question is about, phrasing) of a demo question, checking its answer is right."""
    for ask in demo.STORY_ASKS:
        m = re.fullmatch(re.escape(ask).replace(re.escape("{story}"), f"({STORY.pattern})"), question)
        if m:
            name, verb, adjective, thing, place = m.groups()[1:]
            assert (name in demo.NAMES and thing in demo.THINGS and verb in demo.VERBS
                    and adjective in demo.ADJECTIVES and place in demo.PLACES), question
            assert answer == f"Who: {name}. What: {thing}.", (question, answer)
            return "who_what", (demo.NAMES.index(name), demo.THINGS.index(thing)), ask
    for kind, facts, key, sentence in (("capital", demo.CAPITALS, "country", "The capital of {} is {}."),
                                       ("opposite", demo.OPPOSITES, "word", "The opposite of {} is {}.")):
        for i, (subject, fact) in enumerate(facts):
            for ask in ASKS[kind]:
                if question == ask.format(**{key: subject}):
                    assert answer == sentence.format(subject, fact), (question, answer)
                    return kind, (i,), ask
    raise AssertionError(f"not a demo question: {question!r}")


def test_chat_demo_is_regular_and_correct():
    rows = [json.loads(line) for line in demo.CHAT_FILE.read_text().splitlines()]
    assert len(rows) == 400 and len({json.dumps(r) for r in rows}) == 400
    with_system = sum(r["messages"][0]["role"] == "system" for r in rows)
    multi = sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows)
    assert 60 <= with_system <= 160 and 60 <= multi <= 160
    kinds, phrasings = Counter(), Counter()
    for r in rows:
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        in_row = []
        for q, a in zip(msgs[::2], msgs[1::2], strict=True):
            assert (q["role"], a["role"]) == ("user", "assistant")
            kind, about, ask = parse(q["content"], a["content"])
            # Nothing held out is trained on: no held-out pair, no fact in its held-out phrasing.
            if kind == "who_what":
                assert not demo._held_out_pair(*about), q["content"]
            else:
                assert ASKS[kind].index(ask) != demo._held_out_ask(about[0], len(ASKS[kind])), q["content"]
            kinds[kind] += 1
            phrasings[ask] += 1
            in_row.append(kind)
        assert len(in_row) == len(set(in_row)), r  # a longer chat asks each kind once
    assert kinds["who_what"] > 200 and min(kinds.values()) > 80, kinds
    assert len(phrasings) == sum(map(len, ASKS.values())) and min(phrasings.values()) > 20, phrasings
    texts = demo.demo_texts()
    assert "Who: Ben. What: toy." in texts and "Who: Tom. What: mug." not in texts and "The capital of France is Paris." in texts
    assert len(texts) == sum(len(r["messages"]) for r in rows) + 300


def test_held_out_chats_are_new_and_cover_every_fact():
    held_out = demo.generate_held_out()
    assert held_out == demo.generate_held_out()  # deterministic
    assert len(held_out) == 30 and len(demo.generate_held_out(stories=50)) == 70
    trained = {m["content"] for line in demo.CHAT_FILE.read_text().splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "user"}
    kinds = Counter()
    for r in held_out:
        *prompt, answer = r["messages"]
        assert [m["role"] for m in prompt][-1] == "user" and answer["role"] == "assistant"
        question = prompt[-1]["content"]
        assert question not in trained, question
        kind, about, ask = parse(question, answer["content"])
        if kind == "who_what":
            assert demo._held_out_pair(*about)
        else:
            assert ASKS[kind].index(ask) == demo._held_out_ask(about[0], len(ASKS[kind]))
        kinds[kind] += 1
    assert kinds == {"who_what": 10, "capital": len(demo.CAPITALS), "opposite": len(demo.OPPOSITES)}
    assert [parse(r["messages"][-2]["content"], r["messages"][-1]["content"])[0] for r in held_out[:3]] == list(
        demo.KINDS)  # the kinds take turns


def test_classification_demo_is_balanced_with_cues():
    rows = [json.loads(line) for line in demo.CLASSIFICATION_FILE.read_text().splitlines()]
    assert len(rows) == 300 and len({r["text"] for r in rows}) == 300
    assert Counter(r["label"] for r in rows) == {"negative": 100, "neutral": 100, "positive": 100}
    cue = {"positive": ("love", "great", "wonderful", "excellent", "happy", "Best"),
           "negative": ("hate", "terrible", "awful", "bad", "disappointed", "Worst")}
    for r in rows:
        hits = {label for label, words in cue.items() if any(w in r["text"] for w in words)}
        assert hits == ({r["label"]} if r["label"] != "neutral" else set())


def test_demo_data_prepares_cleanly(tmp_path):
    from phi3local.data.prepare import prepare

    tok = phi3_tokenizer()
    console = Console(file=io.StringIO(), width=160)
    # No train_file: the embedded demo is used.
    res = prepare(recipe_from_dict({"output_dir": str(tmp_path / "chat")}), tok, console=console)
    assert "demo_chat.jsonl" in console.file.getvalue()
    steps = res.stats["steps"]["train"]
    assert (steps["read"], steps["invalid"], steps["duplicates"], steps["kept"]) == (400, 0, 0, 400)
    assert (len(res.train), len(res.validation)) == (360, 40)
    assert res.stats["tokens"]["all"]["max"] < 128
    res = prepare(recipe_from_dict({"task": "classification", "output_dir": str(tmp_path / "cls"),
                                    "model": {"labels": demo.DEMO_LABELS}}), tok, console=console)
    assert (len(res.train), len(res.validation)) == (270, 30)
    assert set(res.train["label"]) == {0, 1, 2}
