"""Row validation: every bad row is reported once with its line and field, in both on_error modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import phi3_tokenizer, quiet

from phi3local.config import recipe_from_dict
from phi3local.data.formats import read_json_records
from phi3local.data.records import DataError, Location
from phi3local.data.validate import check_messages, check_record, resolve_label

FIXTURES = Path(__file__).resolve().parent / "data_fixtures"

# Line -> (field, words in the reason) for tests/data_fixtures/bad_rows.jsonl.
BAD_ROWS = {
    2: ("row", "malformed JSON"),
    3: ("messages[1].role", "unknown role 'bot'"),
    4: ("messages[0].content", "empty content"),
    6: ("messages", "no assistant turn"),
    7: ("messages[2].role", "must end with an assistant turn"),
    8: ("messages[0].content", "must be a string, got int"),
}
GOOD_LINES = [1, 5, 9]




@pytest.fixture(scope="module")
def tok():
    return phi3_tokenizer()



def recipe(tmp_path, **data):
    return recipe_from_dict({"output_dir": str(tmp_path / "run"), "data": data})


def test_fail_mode_reports_every_bad_row_once(tmp_path, tok):
    from phi3local.data.prepare import prepare

    path = FIXTURES / "bad_rows.jsonl"
    with pytest.raises(DataError) as info:
        prepare(recipe(tmp_path, train_file=str(path), val_fraction=0.0), tok, console=quiet())
    err = info.value
    assert err.total == 6
    assert [p.line for p in err.problems] == sorted(BAD_ROWS)
    for p in err.problems:
        field, reason = BAD_ROWS[p.line]
        assert p.file == str(path)
        assert p.field == field
        assert reason in p.reason
    text = str(err)
    assert text.startswith(f"6 bad rows in {path}")
    for line in BAD_ROWS:
        assert f"{path}:{line}: " in text
    assert "data.on_error=skip" in text
    # Nothing was written.
    assert not (tmp_path / "run" / "prepared").exists()


def test_fail_mode_shows_first_n_and_total(tmp_path, tok):
    from phi3local.data.prepare import prepare

    path = FIXTURES / "bad_rows.jsonl"
    with pytest.raises(DataError) as info:
        prepare(recipe(tmp_path, train_file=str(path), val_fraction=0.0, max_errors_shown=2), tok, console=quiet())
    text = str(info.value)
    assert "(showing the first 2)" in text
    assert f"{path}:2: row: malformed JSON" in text
    assert f"{path}:3: messages[1].role" in text
    assert f"{path}:4:" not in text
    assert "... and 4 more (6 in total)" in text


def test_skip_mode_keeps_exactly_the_good_rows(tmp_path, tok):
    from phi3local.data.prepare import prepare

    path = FIXTURES / "bad_rows.jsonl"
    console = quiet()
    res = prepare(recipe(tmp_path, train_file=str(path), val_fraction=0.0, on_error="skip"), tok, console=console)
    assert len(res.train) == 3 and len(res.validation) == 0
    assert res.train["source"] == [f"{path}:{n}" for n in GOOD_LINES]
    steps = res.stats["steps"]["train"]
    assert steps["read"] == 9 and steps["invalid"] == 6 and steps["kept"] == 3
    skipped = res.stats["skipped_rows"]
    assert [(s["line"], s["field"]) for s in skipped] == [(line, f) for line, (f, _) in sorted(BAD_ROWS.items())]
    assert all(s["split"] == "train" and s["file"] == str(path) for s in skipped)
    on_disk = json.loads((res.out_dir / "stats.json").read_text())
    assert on_disk["skipped_rows"] == skipped
    out = console.file.getvalue()
    assert "6 skipped" in out
    assert "unknown role 'bot'" in out


def test_over_length_with_truncation_error_is_a_row_problem(tmp_path, tok):
    from phi3local.data.prepare import prepare

    path = tmp_path / "long.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Short?"}, {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Long."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        prepare(recipe(tmp_path, train_file=str(path), val_fraction=0.0, max_seq_len=64, truncation="error"),
                tok, console=quiet())
    (problem,) = info.value.problems
    assert (problem.line, problem.field) == (2, "messages")
    assert "over-length" in problem.reason and "max_seq_len 64" in problem.reason
    res = prepare(recipe(tmp_path, train_file=str(path), val_fraction=0.0, max_seq_len=64, truncation="error",
                         on_error="skip"), tok, console=quiet())
    assert len(res.train) == 1
    assert res.stats["steps"]["train"]["over_length"] == 1


def test_alpaca_array_problems_name_the_element_line(tmp_path, tok):
    from phi3local.data.prepare import prepare

    path = FIXTURES / "bad_alpaca.json"
    with pytest.raises(DataError) as info:
        prepare(recipe(tmp_path, train_file=str(path), val_fraction=0.0), tok, console=quiet())
    got = [(p.line, p.field) for p in info.value.problems]
    assert got == [(5, "output"), (6, "instruction"), (7, "output")]
    assert "missing" in info.value.problems[0].reason
    assert "empty" in info.value.problems[1].reason
    assert "must be a string, got list" in info.value.problems[2].reason
    res = prepare(recipe(tmp_path, train_file=str(path), val_fraction=0.0, on_error="skip"), tok, console=quiet())
    assert res.train["source"] == [f"{path}:2", f"{path}:3", f"{path}:8"]


def test_broken_json_array_is_fatal_with_line(tmp_path):
    with pytest.raises(DataError) as info:
        read_json_records(FIXTURES / "broken_array.json")
    (problem,) = info.value.problems
    assert problem.line == 4
    assert "malformed JSON" in problem.reason
    assert "cannot be read" in str(info.value)


def test_message_rules():
    loc = Location("f.jsonl", line=1)
    u = {"role": "user", "content": "q"}
    a = {"role": "assistant", "content": "a"}
    s = {"role": "system", "content": "s"}
    assert check_messages([u, a], loc) is None
    assert check_messages([s, u, a, u, a], loc) is None
    assert check_messages([u, u, a], loc).field == "messages[1].role"
    assert "out of order" in check_messages([u, u, a], loc).reason
    assert check_messages([a, u, a], loc).field == "messages[0].role"
    assert "only come first" in check_messages([u, s, a], loc).reason
    assert check_messages([], loc).reason == "no messages"
    assert "must be a list" in check_messages("hi", loc).reason
    assert check_messages([u, {"role": "assistant"}], loc).field == "messages[1].content"
    assert check_messages([u, {"content": "x"}], loc).field == "messages[1].role"
    multi = check_messages([u, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}], loc)
    assert "multi-part" in multi.reason
    assert check_messages([u, {**a, "weight": 0}, u, {**a, "weight": 1}], loc) is None
    assert "weight 0" in check_messages([u, {**a, "weight": 0}], loc).reason
    assert check_messages([u, {**a, "weight": 2}], loc).field == "messages[1].weight"


def test_record_rules_and_labels():
    loc = Location("t.csv", row=3)
    assert str(loc) == "t.csv:row 3"
    assert check_record(["not", "a", "dict"], "messages", loc).field == "row"
    p = check_record({"prompt": "hi"}, "prompt_completion", loc)
    assert (p.field, str(p.where)) == ("completion", "t.csv:row 3")
    assert check_record({"text": "nice", "label": "positive"}, "classification", loc, ["negative", "positive"]) is None
    bad = check_record({"text": "nice", "label": "great"}, "classification", loc, ["negative", "positive"])
    assert bad.field == "label" and "unknown label 'great'" in bad.reason
    assert resolve_label("positive", ["negative", "positive"]) == 1
    assert resolve_label(0, ["negative", "positive"]) == 0
    assert resolve_label("1", ["negative", "positive"]) == 1
    assert resolve_label(2, ["negative", "positive"]) is None
    assert resolve_label(True, ["negative", "positive"]) is None
    assert check_record({"text": "  "}, "text", loc).reason == "empty"
    hist = check_record({"instruction": "i", "output": "o", "history": [["q"]]}, "alpaca", loc)
    assert hist.field == "history[0]"
