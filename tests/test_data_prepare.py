"""The prepare stage end to end on the shared sample data, with the real Phi-3-mini tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import ALPACA, CHAT, DISTILL, make_recipe, phi3_tokenizer, quiet

from phi3local.data.prepare import load_prepared, prepare, split_indices
from phi3local.data.template import IGNORE

USER, ASSISTANT, SYSTEM, END, EOS = 32010, 32001, 32006, 32007, 32000




@pytest.fixture(scope="module")
def tok():
    return phi3_tokenizer()




def norm(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def runs_of(ids, labels):
    runs, current, starts = [], [], []
    for pos, (i, lab) in enumerate(zip(ids, labels)):
        if lab != IGNORE:
            assert lab == i
            if not current:
                starts.append(pos)
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs, starts


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_assistant_only(tok, ids, labels, messages):
    """Every assistant turn trained (content + <|end|>), everything else masked."""
    runs, starts = runs_of(ids, labels)
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [norm(c) + "<|end|>" for c in assistants]
    assert all(ids[s - 1] == ASSISTANT for s in starts)
    masked = [i for i, lab in zip(ids, labels) if lab == IGNORE]
    assert masked.count(USER) == sum(m["role"] == "user" for m in messages)
    assert masked.count(SYSTEM) == sum(m["role"] == "system" for m in messages)
    assert masked.count(ASSISTANT) == len(assistants) and masked[-1] == EOS and ids[-1] == EOS


@pytest.fixture(scope="module")
def chat_prepared(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    recipe = make_recipe(out / "run", train_file=str(CHAT / "train.jsonl"),
                         validation_file=str(CHAT / "validation.jsonl"))
    console = quiet()
    return prepare(recipe, tok, console=console), console, recipe


def test_azure_chat_rows_schema_and_mask(tok, chat_prepared):
    res, _, recipe = chat_prepared
    assert res.out_dir == Path(recipe.output_dir) / "prepared"
    assert (len(res.train), len(res.validation)) == (79, 21)
    feats = res.train.features
    assert str(feats["input_ids"].feature.dtype) == "int32" and str(feats["labels"].feature.dtype) == "int32"
    assert feats["doc_id"].dtype == "int64" and feats["source"].dtype == "string"
    assert set(res.train.column_names) == {"input_ids", "labels", "doc_id", "source"}
    assert list(res.train["doc_id"]) == list(range(79)) and list(res.validation["doc_id"]) == list(range(79, 100))
    rows = jsonl_rows(CHAT / "train.jsonl")
    assert res.train["source"][0] == f"{CHAT / 'train.jsonl'}:1"
    for i, row in enumerate(res.train):
        check_assistant_only(tok, row["input_ids"], row["labels"], rows[i]["messages"])
    # One row decoded by hand: exactly the assistant text + <|end|>, with \r\n normalised away.
    first = res.train[0]
    trained = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != IGNORE]
    assert tok.decode(trained) == "Denny has an appointment at 10. He'll call Wilma afterwards.<|end|>"
    assert "\r" not in tok.decode(first["input_ids"])
    val_rows = jsonl_rows(CHAT / "validation.jsonl")
    assert len(val_rows) == 21  # the last line has no trailing newline
    for i, row in enumerate(res.validation):
        check_assistant_only(tok, row["input_ids"], row["labels"], val_rows[i]["messages"])


def test_azure_chat_stats(chat_prepared):
    res, console, _ = chat_prepared
    stats = json.loads((res.out_dir / "stats.json").read_text())
    assert set(stats) == {"version", "task", "cache_key", "inputs", "steps", "split", "skipped_rows",
                          "filtered_rows", "tokens", "histogram", "truncated", "seconds"}
    assert stats["steps"]["train"] == {"read": 79, "invalid": 0, "whitespace_normalized": 79,
                                       "system_prompt_added": 0, "duplicates": 0, "over_length": 0,
                                       "too_short": 0, "too_long": 0, "truncated": 0, "kept": 79}
    assert stats["steps"]["validation"]["kept"] == 21
    assert stats["split"] == {"method": "file", "validation_rows_also_in_train": 0, "train_rows": 79,
                              "validation_rows": 21}
    assert stats["inputs"]["train"]["format"] == "messages"
    t = stats["tokens"]["train"]
    lengths = sorted(len(x) for x in res.train["input_ids"])
    trained = sum(sum(1 for lab in labs if lab != IGNORE) for labs in res.train["labels"])
    assert t["rows"] == 79 and t["tokens"] == sum(lengths) and t["trained_tokens"] == trained
    assert t["max"] == lengths[-1] and t["min"] == lengths[0] and t["p50"] == lengths[39]
    assert t["p50"] <= t["p90"] <= t["p99"] <= t["max"]
    assert 0.1 < t["trained_share"] < 0.2
    assert lengths[-1] <= 696  # SOURCE.md: 62-696 tokens; stripping and \r\n -> \n make rows shorter
    assert sum(stats["histogram"]["counts"]) == 100 and len(stats["histogram"]["edges"]) == len(stats["histogram"]["counts"]) + 1
    assert stats["truncated"]["rows"] == 0
    out = console.file.getvalue()
    assert "Rows per step" in out and "Token lengths" in out and "█" in out


def test_distillation_every_turn_trained(tok, tmp_path):
    res = prepare(make_recipe(tmp_path / "run", train_file=str(DISTILL), val_fraction=0.0), tok, console=quiet())
    assert (len(res.train), len(res.validation)) == (100, 0)
    rows = jsonl_rows(DISTILL)
    n_assistant = 0
    for i, row in enumerate(res.train):
        messages = rows[i]["messages"]
        assert messages[0]["role"] == "system"
        check_assistant_only(tok, row["input_ids"], row["labels"], messages)
        n_assistant += sum(m["role"] == "assistant" for m in messages)
    assert n_assistant == 461
    assert res.stats["tokens"]["all"]["max"] <= 1538


def test_distillation_truncation_keeps_whole_turns(tok, tmp_path):
    res = prepare(make_recipe(tmp_path / "run", train_file=str(DISTILL), val_fraction=0.0, max_seq_len=512),
                  tok, console=quiet())
    assert len(res.train) == 100
    assert max(len(x) for x in res.train["input_ids"]) <= 512
    trunc = res.stats["truncated"]
    assert trunc["rows"] == res.stats["steps"]["train"]["truncated"] > 0
    rows = jsonl_rows(DISTILL)
    for item in trunc["list"]:
        index = int(item["where"].rsplit(":", 1)[1]) - 1
        messages = rows[index]["messages"]
        kept = [messages[0]] + messages[1 + 2 * item["truncated_turns"]:]
        row = res.train[index]
        assert len(row["input_ids"]) == item["tokens_after"] <= 512 < item["tokens_before"]
        check_assistant_only(tok, row["input_ids"], row["labels"], kept)
        assert tok.decode(row["input_ids"]).startswith("<|system|> " + norm(messages[0]["content"]))


def test_alpaca_999_rows(tok, tmp_path):
    res = prepare(make_recipe(tmp_path / "run", train_file=str(ALPACA), val_fraction=0.0, dedupe=False),
                  tok, console=quiet())
    assert len(res.train) == 999
    assert res.stats["inputs"]["train"]["format"] == "alpaca"
    rows = json.loads(ALPACA.read_text())
    with_input = next(i for i, r in enumerate(rows) if r["input"].strip())
    row = res.train[with_input]
    user = norm(rows[with_input]["instruction"] + "\n\n" + rows[with_input]["input"])
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|user|> " + user + "<|end|><|assistant|>")
    check_assistant_only(tok, row["input_ids"], row["labels"],
                         [{"role": "user", "content": user}, {"role": "assistant", "content": rows[with_input]["output"]}])
    assert res.train["source"][1] == f"{ALPACA}:7"  # the second object of the array starts on line 7


def test_alpaca_duplicates_are_counted_and_listed(tok, tmp_path):
    res = prepare(make_recipe(tmp_path / "run", train_file=str(ALPACA), val_fraction=0.1), tok, console=quiet())
    steps = res.stats["steps"]["train"]
    # The demo file really holds 14 exact repeats.
    assert (steps["read"], steps["duplicates"], steps["kept"]) == (999, 14, 985)
    dups = [f for f in res.stats["filtered_rows"] if f["step"] == "duplicates"]
    assert len(dups) == 14 and all("exact duplicate of" in f["reason"] for f in dups)
    assert (len(res.train), len(res.validation)) == (886, 99)


def test_duplicates_after_whitespace_normalisation(tok, tmp_path):
    path = tmp_path / "dups.jsonl"
    base = {"messages": [{"role": "user", "content": "a\r\nb"}, {"role": "assistant", "content": "c"}]}
    same = {"messages": [{"role": "user", "content": "a\nb  "}, {"role": "assistant", "content": " c"}]}
    other = {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]}
    path.write_text("\n".join(json.dumps(r) for r in (base, other, same, base)) + "\n")
    res = prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0), tok, console=quiet())
    assert list(res.train["source"]) == [f"{path}:1", f"{path}:2"]
    assert res.stats["steps"]["train"]["duplicates"] == 2
    assert [(f["where"], f["reason"]) for f in res.stats["filtered_rows"]] == [
        (f"{path}:3", f"exact duplicate of {path}:1"), (f"{path}:4", f"exact duplicate of {path}:1")]
    res = prepare(make_recipe(tmp_path / "run2", train_file=str(path), val_fraction=0.0, dedupe=False,
                              normalize_whitespace=False), tok, console=quiet())
    assert len(res.train) == 4 and res.stats["steps"]["train"]["whitespace_normalized"] == 0


def test_split_is_deterministic(tok, tmp_path):
    def run(name, seed):
        recipe = make_recipe(tmp_path / name, train_file=str(CHAT / "train.jsonl"), val_fraction=0.2, split_seed=seed)
        return prepare(recipe, tok, console=quiet())

    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    assert (len(a.train), len(a.validation)) == (63, 16)
    a_val, a_train = list(a.validation["doc_id"]), list(a.train["doc_id"])
    assert a_val == list(b.validation["doc_id"]) and list(a.train["input_ids"]) == list(b.train["input_ids"])
    assert a_val != list(c.validation["doc_id"])
    assert sorted(a_train + a_val) == list(range(79))
    assert a_val == sorted(a_val)
    tr, va = split_indices(79, 0.2, 7)
    assert va == a_val and tr == a_train
    assert split_indices(1, 0.5, 0) == ([0], []) and split_indices(10, 0.01, 0)[1] != []


def test_cache_reuse_and_invalidation(tok, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_bytes((CHAT / "validation.jsonl").read_bytes())
    out = tmp_path / "prepared"
    recipe = make_recipe(tmp_path / "run", train_file=str(data), val_fraction=0.25, prepared_dir=str(out))
    first = prepare(recipe, tok, console=quiet())
    assert not first.reused and first.out_dir == out
    console = quiet()
    again = prepare(recipe, tok, console=console)
    assert again.reused and "reused" in console.file.getvalue()
    assert list(again.train["input_ids"]) == list(first.train["input_ids"])
    assert again.stats["cache_key"] == first.stats["cache_key"]
    # A data setting that changes the output, an edited file, or another out_dir: prepared again.
    longer = make_recipe(tmp_path / "run", train_file=str(data), val_fraction=0.25, prepared_dir=str(out),
                         max_seq_len=1000)
    assert not prepare(longer, tok, console=quiet()).reused
    assert prepare(longer, tok, console=quiet()).reused
    data.write_bytes(data.read_bytes() + b"\n")
    assert not prepare(longer, tok, console=quiet()).reused
    # No temporary or backup folders are left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "prepared"]
    assert list(load_prepared(out)[0]["doc_id"]) == list(first.train["doc_id"])


def test_refuses_to_replace_a_foreign_folder(tok, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    recipe = make_recipe(tmp_path / "run", train_file=str(CHAT / "validation.jsonl"), prepared_dir=str(out))
    with pytest.raises(FileExistsError):
        prepare(recipe, tok, console=quiet())
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_token_filters_are_counted(tok, tmp_path):
    recipe = make_recipe(tmp_path / "run", train_file=str(CHAT / "train.jsonl"), val_fraction=0.0,
                         min_tokens=100, max_tokens=400)
    res = prepare(recipe, tok, console=quiet())
    steps = res.stats["steps"]["train"]
    lengths = [len(x) for x in res.train["input_ids"]]
    assert min(lengths) >= 100 and max(lengths) <= 400
    assert steps["too_short"] > 0 and steps["too_long"] > 0
    assert steps["too_short"] + steps["too_long"] + steps["kept"] == 79
    reasons = [f["reason"] for f in res.stats["filtered_rows"]]
    assert len(reasons) == steps["too_short"] + steps["too_long"]
    assert any("min_tokens 100" in r for r in reasons) and any("max_tokens 400" in r for r in reasons)


def test_system_prompt_added(tok, tmp_path):
    recipe = make_recipe(tmp_path / "run", train_file=str(CHAT / "validation.jsonl"), val_fraction=0.0,
                         system_prompt="You summarise dialogs.")
    res = prepare(recipe, tok, console=quiet())
    assert res.stats["steps"]["train"]["system_prompt_added"] == 21
    ids = res.train[0]["input_ids"]
    assert ids[0] == SYSTEM and tok.decode(ids).startswith("<|system|> You summarise dialogs.<|end|><|user|>")


def test_plain_text_format_trains_everything(tok, tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "Once upon a time there was a cat."}\n{"text": "The end."}\n')
    res = prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0), tok, console=quiet())
    assert res.stats["inputs"]["train"]["format"] == "text"
    row = res.train[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == EOS
    assert tok.decode(row["input_ids"]) == "Once upon a time there was a cat.<|endoftext|>"


def test_percentiles_and_histogram():
    from phi3local.data.report import histogram, length_summary, percentile, text_histogram

    values = list(range(1, 101))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([], 50) == 0
    s = length_summary([10, 30, 20], [5, 0, 5])
    assert (s["rows"], s["tokens"], s["trained_share"], s["p50"], s["max"], s["min"]) == (3, 60, 0.1667, 20, 30, 10)
    h = histogram([17, 22, 44])
    assert h == {"edges": [15, 20, 25, 30, 35, 40, 45], "counts": [1, 1, 0, 0, 0, 1]}
    assert text_histogram(h)[0] == "15-19 │" + "█" * 40 + " 1"


def test_crash_leftovers_are_cleaned(tok, tmp_path):
    out = tmp_path / "prepared"
    recipe = make_recipe(tmp_path / "run", train_file=str(CHAT / "validation.jsonl"), prepared_dir=str(out))
    prepare(recipe, tok, console=quiet())
    # A crash between the two renames: only the old folder is left; a dead process's half-written tmp folder.
    out.rename(tmp_path / ".prepared.old-1234abcd")
    (tmp_path / ".prepared.tmp-999999999-deadbeef" / "train").mkdir(parents=True)
    res = prepare(recipe, tok, console=quiet())
    assert res.reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
