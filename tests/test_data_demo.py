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


def test_chat_demo_is_regular_and_correct():
    rows = [json.loads(line) for line in demo.CHAT_FILE.read_text().splitlines()]
    assert len(rows) == 400 and len({json.dumps(r) for r in rows}) == 400
    with_system = sum(r["messages"][0]["role"] == "system" for r in rows)
    multi = sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows)
    assert 60 <= with_system <= 160 and 60 <= multi <= 160
    checked = Counter()
    for r in rows:
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            assert (q["role"], a["role"]) == ("user", "assistant")
            if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", q["content"]):
                x, y = int(m[1]), int(m[2])
                assert a["content"] == f"{x} plus {y} is {x + y}."
                checked["plus"] += 1
            elif m := re.fullmatch(r"What is (\d+) minus (\d+)\?", q["content"]):
                x, y = int(m[1]), int(m[2])
                assert a["content"] == f"{x} minus {y} is {x - y}." and x >= y
                checked["minus"] += 1
            elif m := re.fullmatch(r"Spell (\w+) backwards\.", q["content"]):
                assert a["content"] == m[1][::-1]
                checked["backwards"] += 1
            elif m := re.fullmatch(r"Write (\w+) in capital letters\.", q["content"]):
                assert a["content"] == m[1].upper()
                checked["capitals"] += 1
    assert checked["plus"] > 100 and min(checked.values()) > 20
    texts = demo.demo_texts()
    assert "What is 2 plus 18?" in texts and "tac" in texts
    assert len(texts) == sum(len(r["messages"]) for r in rows) + 300


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
