"""Readers and format detection: JSONL/JSON line numbers, CSV/Parquet with column mapping, datasets folders."""

from __future__ import annotations

import json

import pytest
from data_helpers import ALPACA, CHAT, make_recipe, phi3_tokenizer, quiet

from phi3local.data.formats import detect_format, read_json_records, read_records, to_example
from phi3local.data.records import Conversation, FormatError, Location, RawRecord, TextExample
from phi3local.data.template import IGNORE


@pytest.fixture(scope="module")
def tok():
    return phi3_tokenizer()




def trained_text(tok, row) -> str:
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])


QA = [
    {"question": "What is 2 plus 2?", "answer": "42", "topic": "maths"},
    {"question": "Spell cat backwards.", "answer": "tac", "topic": "words"},
    {"question": "What is 1 plus 1?", "answer": "", "topic": "maths"},  # empty answer: a row problem
]


def test_jsonl_and_array_line_numbers():
    records, problems = read_json_records(CHAT / "validation.jsonl")
    assert len(records) == 21 and problems == []  # last line without "\n" still read
    assert [r.loc.line for r in records[:3]] == [1, 2, 3]
    records, problems = read_json_records(ALPACA)
    assert len(records) == 999 and problems == []
    assert records[0].loc == Location(str(ALPACA), line=2)
    text = ALPACA.read_text().splitlines()
    for rec in (records[1], records[500], records[998]):
        assert text[rec.loc.line - 1].strip() == "{"


def test_jsonl_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n[1, 2]\r\n{"text": \xff}\n')
    records, problems = read_json_records(path)
    assert [(r.loc.line, r.data) for r in records] == [(1, {"text": "a"}), (3, {"text": "b"}), (4, [1, 2])]
    assert [(p.line, p.reason) for p in problems] == [(5, "not valid UTF-8 (byte 9)")]


def rec(data):
    return [RawRecord(data, Location("f.jsonl", line=1))]


def test_detection(tmp_path):
    assert detect_format(rec({"messages": []}), "causal_lm") == "messages"
    assert detect_format(rec({"instruction": "i", "input": "", "output": "o"}), "causal_lm") == "alpaca"
    assert detect_format(rec({"prompt": "p", "completion": "c"}), "causal_lm") == "prompt_completion"
    assert detect_format(rec({"text": "t"}), "causal_lm") == "text"
    assert detect_format(rec({"text": "t", "label": "x"}), "classification") == "classification"
    with pytest.raises(FormatError, match="fits several formats .*messages, prompt_completion.*data.format"):
        detect_format(rec({"messages": [], "prompt": "p", "completion": "c"}), "causal_lm")
    with pytest.raises(FormatError, match="data.columns"):
        detect_format(rec({"question": "q", "answer": "a"}), "causal_lm")
    with pytest.raises(FormatError, match="needs 'text' and 'label'"):
        detect_format(rec({"messages": []}), "classification")
    with pytest.raises(FormatError, match="task=classification"):
        detect_format(rec({"text": "t"}), "causal_lm", "classification")
    # An explicit format wins over the keys.
    assert detect_format(rec({"messages": [], "prompt": "p", "completion": "c"}), "causal_lm", "messages") == "messages"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match="unknown file type '.txt'"):
        read_records(tmp_path / "notes.txt")
    with pytest.raises(FormatError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


def test_conversion():
    loc = Location("f.json", line=3)
    conv = to_example(RawRecord({"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be exact.",
                                 "history": [["Hi", "Hello"]]}, loc), "alpaca")
    assert isinstance(conv, Conversation) and conv.source == "f.json:3"
    assert conv.messages == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Add.\n\n2 and 3"},
                             {"role": "assistant", "content": "5"}]
    conv = to_example(RawRecord({"instruction": "Add.", "input": "", "output": "5"}, loc), "alpaca")
    assert conv.messages[0] == {"role": "user", "content": "Add."}
    conv = to_example(RawRecord({"prompt": "p", "completion": "c"}, loc), "prompt_completion")
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    ex = to_example(RawRecord({"text": "t", "label": "pos"}, loc), "classification")
    assert isinstance(ex, TextExample) and (ex.text, ex.label) == ("t", "pos")


def test_csv_with_column_mapping(tok, tmp_path):
    import csv

    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "topic"])
        writer.writeheader()
        writer.writerows(QA)
    recipe = make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0, on_error="skip",
                         columns={"prompt": "question", "completion": "answer"})
    res = prepare_quiet(recipe, tok)
    assert res.stats["inputs"]["train"]["format"] == "prompt_completion"
    assert list(res.train["source"]) == [f"{path}:row 0", f"{path}:row 1"]
    # "42" stays the string "42" (CSV columns are read as strings).
    assert [trained_text(tok, r) for r in res.train] == ["42<|end|>", "tac<|end|>"]
    assert [(s["where"], s["field"]) for s in res.stats["skipped_rows"]] == [(f"{path}:row 2", "completion")]
    bad = make_recipe(tmp_path / "run2", train_file=str(path), columns={"prompt": "query", "completion": "answer"})
    with pytest.raises(FormatError, match="query.*the file has \\['question', 'answer', 'topic'\\]"):
        prepare_quiet(bad, tok)


def prepare_quiet(recipe, tok):
    from phi3local.data.prepare import prepare

    return prepare(recipe, tok, console=quiet())


def test_parquet_with_column_mapping_classification(tok, tmp_path):
    import datasets

    path = tmp_path / "reviews.parquet"
    rows = {"review": ["I love it.", "Awful.", "It is blue.", "Meh?"], "stars": ["pos", "neg", "neu", "bad"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    recipe = make_recipe(tmp_path / "run", task="classification", labels=["neg", "neu", "pos"], train_file=str(path),
                         val_fraction=0.0, on_error="skip", columns={"text": "review", "label": "stars"})
    res = prepare_quiet(recipe, tok)
    assert res.stats["inputs"]["train"]["format"] == "classification"
    assert list(res.train["label"]) == [2, 0, 1]
    assert res.train.features["label"].dtype == "int64"
    assert all(all(x == IGNORE for x in labs) for labs in res.train["labels"])
    assert tok.decode(res.train[0]["input_ids"]) == "I love it."
    (skipped,) = res.stats["skipped_rows"]
    assert (skipped["where"], skipped["field"]) == (f"{path}:row 3", "label")
    assert "unknown label 'bad'" in skipped["reason"]
    assert res.stats["labels"]["train"] == {"neg": 1, "neu": 1, "pos": 1}
    no_labels = make_recipe(tmp_path / "run2", task="classification", train_file=str(path),
                            columns={"text": "review", "label": "stars"})
    with pytest.raises(FormatError, match="model.labels.*'bad', 'neg', 'neu', 'pos'"):
        prepare_quiet(no_labels, tok)


def test_datasets_folder(tok, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (CHAT / "validation.jsonl").read_text().splitlines() if line.strip()]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows[:5]).save_to_disk(str(folder))
    res = prepare_quiet(make_recipe(tmp_path / "run", train_file=str(folder), val_fraction=0.0), tok)
    assert len(res.train) == 5 and res.train[4]["source"] == f"{folder}:row 4"
    assert trained_text(tok, res.train[0]) == rows[0]["messages"][1]["content"].strip() + "<|end|>"
    # A DatasetDict folder: its train split is used; without one, the error names the splits.
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:4])}).save_to_disk(str(dd))
    assert len(prepare_quiet(make_recipe(tmp_path / "run2", train_file=str(dd), val_fraction=0.0), tok).train) == 3
    dd2 = tmp_path / "dd2"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows[:3]),
                          "b": datasets.Dataset.from_list(rows[3:4])}).save_to_disk(str(dd2))
    with pytest.raises(FormatError, match="splits \\['a', 'b'\\]"):
        prepare_quiet(make_recipe(tmp_path / "run3", train_file=str(dd2)), tok)


def test_jsonl_column_mapping_and_relative_path(tok, tmp_path):
    data = tmp_path / "recipes" / "qa.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n" for r in QA[:2]))
    recipe_file = tmp_path / "recipes" / "r.yaml"
    recipe_file.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        "data:\n  train_file: qa.jsonl\n  val_fraction: 0.0\n  columns: {prompt: q, completion: a}\n"
    )
    from phi3local.config import load_recipe

    res = prepare_quiet(load_recipe(recipe_file), tok)  # qa.jsonl is found next to the recipe
    assert list(res.train["source"]) == ["qa.jsonl:1", "qa.jsonl:2"]
    assert trained_text(tok, res.train[1]) == "tac<|end|>"
