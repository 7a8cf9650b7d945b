"""task=preference data: every input format, every bad-row class, truncation, stats, and the SFT-equal split.

Prepared with Phi-3-mini's real tokenizer (read in place from the shared artifacts).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from data_helpers import make_recipe, phi3_tokenizer, quiet

from phi3local.config import RecipeError, recipe_from_dict
from phi3local.data.prepare import prepare
from phi3local.data.records import DataError, FormatError
from phi3local.data.template import IGNORE, encode_conversation

ASSISTANT, END, SYSTEM, USER = 32001, 32007, 32006, 32010
SYS = "You answer in one sentence."
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "It is Lyon."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Six, like every insect."),
    ("What is 12 times 12?", "12 times 12 is 144.", "12 times 12 is 124."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "Charles Dickens."),
    ("Name a primary colour.", "Red is a primary colour.", "Green, everyone knows that."),
]


@pytest.fixture(scope="module")
def tok():
    return phi3_tokenizer()


def azure_row(q, good, bad, system=SYS):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    return {"input": {"messages": msgs}, "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tok, tmp_path, name="run", **data):
    data.setdefault("val_fraction", 0)
    recipe = make_recipe(tmp_path / name, task="preference", **data)
    console = quiet()
    return prepare(recipe, tok, console=console), console.file.getvalue()


def rows_of(res):
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in res.train]


@pytest.fixture(scope="module")
def azure(tok, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("azure")
    path = write_jsonl(tmp / "pref.jsonl", [azure_row(*p) for p in PAIRS])
    res, out = run(tok, tmp, train_file=str(path))
    return res, out


# ------------------------------------------------------------------------------------------------ formats


def test_azure_format_schema_and_ids(tok, azure):
    res, out = azure
    assert set(res.train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids", "doc_id", "source"}
    feats = res.train.features
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert str(feats[col].feature.dtype) == "int32"
    assert feats["doc_id"].dtype == "int64" and feats["source"].dtype == "string"
    assert len(res.train) == 5 and len(res.validation) == 0
    assert list(res.train["source"]) == [f"{res.stats['inputs']['train']['path']}:{i}" for i in range(1, 6)]
    assert res.stats["inputs"]["train"]["path"].endswith("pref.jsonl")
    for (p, c, r), (q, good, bad) in zip(rows_of(res), PAIRS):
        assert p[0] == SYSTEM and p[-1] == ASSISTANT and p.count(USER) == 1
        assert tok.decode(p) == f"<|system|> {SYS}<|end|><|user|> {q}<|end|><|assistant|>"
        assert tok.decode(c) == good + "<|end|>" and c[-1] == END
        assert tok.decode(r) == bad + "<|end|>" and r[-1] == END
    assert "Pairs: 5 train, 0 validation" in out and "Pair lengths in tokens" in out


def test_split_equals_the_sft_mask(tok, azure, tmp_path):
    """The same conversations (prompt + chosen) through the SFT prepare: its trained tokens are chosen_ids and
    everything before them is prompt_ids; rendering prompt+answer with the SFT encoder gives the same ids."""
    res, _ = azure
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": SYS},
                                                               {"role": "user", "content": q},
                                                               {"role": "assistant", "content": good}]}
                                                 for q, good, _ in PAIRS])
    sft = prepare(make_recipe(tmp_path / "sft", train_file=str(chat), val_fraction=0), tok, console=quiet()).train
    for (p, c, r), sft_row, (q, _, bad) in zip(rows_of(res), sft, PAIRS):
        ids, labels = sft_row["input_ids"], sft_row["labels"]
        start = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
        assert ids[:start] == p and trained == c and ids[: len(p) + len(c)] == p + c
        enc = encode_conversation(tok, [{"role": "system", "content": SYS}, {"role": "user", "content": q},
                                        {"role": "assistant", "content": bad}], 4096)
        assert enc.input_ids[: len(p) + len(r)] == p + r
        assert [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE] == r


def test_trl_strings_messages_implicit_and_csv_parquet_give_the_same_ids(tok, azure, tmp_path):
    expected = rows_of(azure[0])
    strings = write_jsonl(tmp_path / "strings.jsonl",
                          [{"system": SYS, "prompt": q, "chosen": g, "rejected": b} for q, g, b in PAIRS])
    lists = write_jsonl(tmp_path / "lists.jsonl", [
        {"prompt": [{"role": "system", "content": SYS}, {"role": "user", "content": q}],
         "chosen": [{"role": "assistant", "content": g}], "rejected": [{"role": "assistant", "content": b}]}
        for q, g, b in PAIRS])
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": [{"role": "system", "content": SYS}, {"role": "user", "content": q},
                    {"role": "assistant", "content": g}],
         "rejected": [{"role": "system", "content": SYS}, {"role": "user", "content": q},
                      {"role": "assistant", "content": b}]} for q, g, b in PAIRS])
    table = tmp_path / "pairs.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sys", "question", "good", "bad"])
        for q, g, b in PAIRS:
            w.writerow([SYS, q, g, b])
    columns = {"system": "sys", "prompt": "question", "chosen": "good", "rejected": "bad"}
    for name, path, extra in (("strings", strings, {}), ("lists", lists, {}), ("implicit", implicit, {}),
                              ("csv", table, {"columns": columns})):
        res, _ = run(tok, tmp_path, name=name, train_file=str(path), **extra)
        assert res.stats["inputs"]["train"]["format"] == "trl_preference", name
        assert rows_of(res) == expected, name

    import datasets

    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict({  # a message-list prompt stored as JSON text in its cell
        "q": [json.dumps([{"role": "system", "content": SYS}, {"role": "user", "content": q}]) for q, _, _ in PAIRS],
        "good": [g for _, g, _ in PAIRS], "bad": [b for _, _, b in PAIRS]}).to_parquet(str(parquet))
    res, _ = run(tok, tmp_path, name="parquet", train_file=str(parquet),
                 columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert rows_of(res) == expected
    assert list(res.train["source"]) == [f"{parquet}:row {i}" for i in range(5)]


def test_multi_turn_prompt_masks_only_the_final_answer(tok, tmp_path):
    row = {"input": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                  {"role": "user", "content": "And 2+2?"}]},
           "preferred_output": [{"role": "assistant", "content": "2+2 is 4."}],
           "non_preferred_output": [{"role": "assistant", "content": "5."}]}
    res, _ = run(tok, tmp_path, train_file=str(write_jsonl(tmp_path / "multi.jsonl", [row])))
    p, c, r = rows_of(res)[0]
    assert tok.decode(p) == "<|user|> Hi<|end|><|assistant|> Hello!<|end|><|user|> And 2+2?<|end|><|assistant|>"
    assert tok.decode(c) == "2+2 is 4.<|end|>" and tok.decode(r) == "5.<|end|>"


def test_format_errors(tok, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}]}])
    with pytest.raises(FormatError, match=r"task=preference needs preference pairs.*data\.columns"):
        run(tok, tmp_path, train_file=str(chat))
    pref = write_jsonl(tmp_path / "p.jsonl", [azure_row(*PAIRS[0])])
    with pytest.raises(FormatError, match="leave data.format at auto"):
        run(tok, tmp_path, train_file=str(pref), format="messages")


# ----------------------------------------------------------------------------------------------- bad rows


def test_every_bad_row_named_by_file_line_and_field(tok, tmp_path):
    q, g, b = PAIRS[0]
    side = lambda text, role="assistant": [{"role": role, "content": text}]  # noqa: E731
    rows = [
        azure_row(q, g, b),                                                              # 1 fine
        {"input": {"messages": [{"role": "user", "content": q}]}, "preferred_output": side(g)},  # 2 missing side
        azure_row(q, g, "  "),                                                           # 3 empty side
        azure_row(q, g, g + "  "),                                                       # 4 identical
        {**azure_row(q, g, b), "preferred_output": side(g) + side(b)},                    # 5 two messages
        {**azure_row(q, g, b), "non_preferred_output": side(b, "user")},                  # 6 not assistant
        {**azure_row(q, g, b), "input": {"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": g}]}},  # 7 ends w/ assistant
        azure_row(q, "word " * 300, b),                                                  # 8 answer over-length
        "{not json",                                                                     # 9 malformed
        {**azure_row(q, g, b), "input": {"messages": [{"role": "user", "content": q}],
                                         "tools": [{"type": "function"}]}},              # 10 tools
        {**azure_row(q, g, b), "preferred_output": {"role": "assistant", "content": g}},  # 11 object, not list
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        run(tok, tmp_path, train_file=str(path), max_seq_len=128)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("10 bad rows in ")
    f = str(path)
    expected = [
        f"{f}:2: non_preferred_output: missing",
        f"{f}:3: non_preferred_output[0].content: empty",
        f"{f}:4: non_preferred_output: identical to preferred_output: a pair needs two different answers",
        f"{f}:5: preferred_output: must be one assistant message, got 2 messages",
        f"{f}:6: non_preferred_output[0].role: must be assistant, got 'user'",
        f"{f}:7: input.messages[1].role: the prompt ends with an assistant turn; it must end with the user turn",
        f"{f}:8: preferred_output: over-length:",
        f"{f}:9: row: malformed JSON",
        f"{f}:10: input.tools: tool definitions are not supported",
        f"{f}:11: preferred_output: must be a list holding one assistant message, got an object",
    ]
    body = [line.strip() for line in lines[1:11]]
    for want, got in zip(expected, body, strict=True):
        assert got.startswith(want), (want, got)
    assert "answers are never truncated" in body[6]

    # skip: the good row is kept, every bad one is listed in stats.json
    res, out = run(tok, tmp_path, name="skip", train_file=str(path), max_seq_len=128, on_error="skip")
    assert len(res.train) == 1 and len(res.stats["skipped_rows"]) == 10
    assert res.stats["steps"]["train"]["over_length"] == 1


def test_trl_and_csv_bad_rows_name_the_users_fields(tok, tmp_path):
    rows = [{"prompt": "Q?", "chosen": "A.", "rejected": "B."},
            {"prompt": "Q?", "chosen": "", "rejected": "B."},
            {"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
             "chosen": "A.", "rejected": "B."},
            {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
             "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "B"}]},
            {"prompt": "Q?", "chosen": "Same", "rejected": "Same"}]
    path = write_jsonl(tmp_path / "trl.jsonl", rows)
    with pytest.raises(DataError) as e:
        run(tok, tmp_path, train_file=str(path))
    body = [line.strip() for line in str(e.value).splitlines()[1:]]
    assert body[0] == f"{path}:2: chosen: empty"
    assert body[1].startswith(f"{path}:3: prompt[1].role: the prompt ends with an assistant turn")
    assert body[2].startswith(f"{path}:4: rejected: without a prompt field, chosen and rejected must be whole")
    assert body[3] == f"{path}:5: rejected: identical to chosen: a pair needs two different answers"

    table = tmp_path / "bad.csv"
    table.write_text("question,good,bad\nQ?,A.,B.\nQ2?,,B.\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        run(tok, tmp_path, train_file=str(table), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert f"{table}:row 1: good: missing" in str(e.value)


# ---------------------------------------------------------------------------------------------- truncation


def test_over_length_prompt_loses_whole_oldest_turns_never_the_answers(tok, tmp_path):
    long = "This is an older turn of the conversation with quite a few words in it. " * 3
    messages = [{"role": "system", "content": SYS}]
    for i in range(4):
        messages += [{"role": "user", "content": f"Turn {i}. {long}"}, {"role": "assistant", "content": f"Reply {i}. {long}"}]
    messages.append({"role": "user", "content": "So what is 2+2?"})
    row = {"input": {"messages": messages}, "preferred_output": [{"role": "assistant", "content": "2+2 is 4."}],
           "non_preferred_output": [{"role": "assistant", "content": "It is 5, I think."}]}
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    full, _ = run(tok, tmp_path, name="full", train_file=str(path))
    p_full, c_full, r_full = rows_of(full)[0]
    per_exchange = 2 * len(tok(f"Turn 0. {long}", add_special_tokens=False)["input_ids"])
    limit = len(p_full) + len(r_full) - per_exchange - 5  # drops two exchanges

    res, out = run(tok, tmp_path, name="cut", train_file=str(path), max_seq_len=limit)
    p, c, r = rows_of(res)[0]
    assert (c, r) == (c_full, r_full)  # answers untouched
    text = tok.decode(p)
    assert text.startswith(f"<|system|> {SYS}<|end|><|user|> Turn 2.") and "Turn 1." not in text
    assert text.endswith("<|user|> So what is 2+2?<|end|><|assistant|>")
    assert len(p) + max(len(c), len(r)) <= limit
    trunc = res.stats["truncated"]
    assert trunc["rows"] == 1 and trunc["turns_dropped"] == 2 and res.stats["steps"]["train"]["truncated"] == 1
    assert trunc["list"][0]["tokens_before"] == len(p_full) + max(len(c_full), len(r_full))
    assert "1 rows truncated to max_seq_len" in out

    with pytest.raises(DataError, match=r"long\.jsonl:1: input\.messages: over-length: .*data\.truncation=error"):
        run(tok, tmp_path, name="err", train_file=str(path), max_seq_len=limit, truncation="error")
    with pytest.raises(DataError, match=r"long\.jsonl:1: input\.messages: over-length: .*last user turn"):
        run(tok, tmp_path, name="tiny", train_file=str(path), max_seq_len=24)


# --------------------------------------------------------------------------------------------------- stats


def test_stats_pairs_tokens_duplicates_histograms_and_reuse(tok, tmp_path):
    rows = [azure_row(*p) for p in PAIRS] + [azure_row(*PAIRS[1]), azure_row(PAIRS[0][0], "Paris.", "Nice.")]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    res, out = run(tok, tmp_path, train_file=str(path), val_fraction=0.3)
    s = res.stats
    pref = s["preference"]
    assert pref["duplicates"] == 1 and s["steps"]["train"]["duplicates"] == 1
    assert s["filtered_rows"][0]["where"].endswith("dups.jsonl:6")
    assert s["filtered_rows"][0]["reason"].endswith("dups.jsonl:2")
    assert pref["train"]["pairs"] == len(res.train) and pref["validation"]["pairs"] == len(res.validation)
    assert pref["all"]["pairs"] == 6 and pref["all"]["prompts"] == 5
    both = list(res.train) + list(res.validation)
    for part in ("prompt", "chosen", "rejected"):
        assert pref["all"]["tokens"][part] == sum(len(r[f"{part}_ids"]) for r in both)
        hist = pref["histograms"][part]
        assert sum(hist["counts"]) == 6 and len(hist["edges"]) == len(hist["counts"]) + 1
    assert s["tokens"]["all"]["tokens"] == sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                               for r in both)
    assert sum(s["histogram"]["counts"]) == 6
    assert pref["all"]["lengths"]["sequence"]["max"] == max(
        len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in both)
    assert sorted(list(res.train["doc_id"]) + list(res.validation["doc_id"])) == list(range(6))
    on_disk = json.loads((res.out_dir / "stats.json").read_text())
    assert on_disk["preference"] == pref and on_disk["task"] == "preference"
    assert "1 duplicate pairs dropped" in out

    again, out2 = run(tok, tmp_path, train_file=str(path), val_fraction=0.3)
    assert again.reused and "reused" in out2 and "Pairs: " in out2
    assert rows_of(again) == rows_of(res)


def test_demo_file_is_used_without_a_train_file(tok, tmp_path):
    res, out = run(tok, tmp_path, val_fraction=0.1)
    assert "demo_preference.jsonl" in out and len(res.train) + len(res.validation) == 12


# ------------------------------------------------------------------------------------------------- recipe


def test_preference_recipe_section():
    r = recipe_from_dict({"task": "preference", "preference": {"loss": "simpo", "beta": 2.0, "simpo_gamma": 1.0}})
    assert (r.preference.loss, r.preference.beta, r.preference.simpo_gamma) == ("simpo", 2.0, 1.0)
    assert r.preference.sft_weight is None and r.preference.precompute_reference is False
    with pytest.raises(RecipeError, match="preference.loss: 'kto' is not one of"):
        recipe_from_dict({"preference": {"loss": "kto"}})
    with pytest.raises(RecipeError, match=r"preference.beta: 0.0 is out of range \(must be > 0\)"):
        recipe_from_dict({"preference": {"beta": 0}})
    with pytest.raises(RecipeError, match="preference.sft_weight"):
        recipe_from_dict({"preference": {"sft_weight": -1}})


def test_a_csv_answer_that_looks_like_json_stays_text(tok, tmp_path):
    table = tmp_path / "lists.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["prompt", "chosen", "rejected"], ["Give three numbers as a list.", "[1, 2, 3]", "[]"]])
    res, _ = run(tok, tmp_path, train_file=str(table))
    _, c, r = rows_of(res)[0]
    assert tok.decode(c) == "[1, 2, 3]<|end|>" and tok.decode(r) == "[]<|end|>"
