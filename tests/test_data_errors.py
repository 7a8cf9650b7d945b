"""Bad input ends as a row problem or a file problem naming the file and line (or row), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_helpers import CHAT, DISTILL, make_recipe, phi3_tokenizer, quiet

from phi3local.config import RecipeError, load_recipe
from phi3local.data.formats import read_records
from phi3local.data.prepare import prepare
from phi3local.data.records import DataError, FormatError
from phi3local.data.template import IGNORE, OverLength, encode_conversation, min_chat_tokens
from phi3local.errors import Phi3LocalError

ASSISTANT = 32001


@pytest.fixture(scope="module")
def tok():
    return phi3_tokenizer()


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_text(tok, ids, labels) -> list[str]:
    """The decoded runs of trained tokens, each checked to start right after an <|assistant|> tag."""
    runs, current, start = [], [], 0
    for pos, (i, lab) in enumerate(zip(ids + [None], labels + [IGNORE])):
        if lab != IGNORE:
            assert lab == i
            if not current:
                start = pos
            current.append(i)
        elif current:
            assert ids[start - 1] == ASSISTANT
            runs.append(tok.decode(current))
            current = []
    return runs


def short_row(k: int) -> dict:
    return {"messages": [msg("user", f"Short question {k}?"), msg("assistant", f"Short answer {k}.")]}


def no_system_conversation(turns: int = 5) -> list[dict]:
    messages = []
    for k in range(turns):
        messages += [msg("user", f"Question number {k}: " + "word " * 20), msg("assistant", f"Answer number {k}.")]
    return messages


# ------------------------------------------------------------------------ 1. truncation without system


def test_turn_truncation_without_system_message(tok):
    messages = no_system_conversation()
    two_pairs = encode_conversation(tok, messages[-4:], 4096)
    enc = encode_conversation(tok, messages, len(two_pairs.input_ids))
    assert enc.truncated and enc.truncated_turns == 3
    assert (enc.input_ids, enc.labels) == (two_pairs.input_ids, two_pairs.labels)
    assert tok.decode(enc.input_ids).startswith("<|user|> Question number 3:")
    assert trained_text(tok, enc.input_ids, enc.labels) == ["Answer number 3.<|end|>", "Answer number 4.<|end|>"]
    # One token less than two exchanges: only the newest is kept; one more: still the fewest drops.
    assert encode_conversation(tok, messages, len(two_pairs.input_ids) - 1).truncated_turns == 4
    assert encode_conversation(tok, messages, len(two_pairs.input_ids) + 1).truncated_turns == 3


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_prepare_truncates_real_conversations_without_system_message(tok, tmp_path, on_error):
    # Real multi-turn rows (the distillation sample) with their system message taken out.
    rows = [json.loads(line) for line in DISTILL.read_text(encoding="utf-8").splitlines()[:8]]
    conversations = [r["messages"][1:] for r in rows]
    assert all(c[0]["role"] == "user" for c in conversations)
    path = write_jsonl(tmp_path / "no_system.jsonl", [{"messages": c} for c in conversations])
    res = prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0, max_seq_len=256,
                              on_error=on_error), tok, console=quiet())
    assert len(res.train) == 8 and res.stats["skipped_rows"] == []
    truncated = res.stats["truncated"]["list"]
    assert len(truncated) >= 4
    for item in truncated:
        index = int(item["where"].rsplit(":", 1)[1]) - 1
        messages = [{**m, "content": m["content"].replace("\r\n", "\n").strip()} for m in conversations[index]]
        kept = messages[2 * item["truncated_turns"]:]
        row = res.train[index]
        expected = encode_conversation(tok, kept, 4096)
        assert (row["input_ids"], row["labels"]) == (expected.input_ids, expected.labels)
        assert len(row["input_ids"]) <= 256 < item["tokens_before"]
        # The fewest exchanges were dropped, and every kept assistant turn (only those) is trained.
        assert len(encode_conversation(tok, messages[2 * item["truncated_turns"] - 2:], 4096).input_ids) > 256
        assert trained_text(tok, row["input_ids"], row["labels"]) == [
            m["content"] + "<|end|>" for m in kept if m["role"] == "assistant"]


# ------------------------------------------------------------------- 2. nothing fits, nothing to train


def test_conversation_that_cannot_fit_is_an_over_length_row_problem(tok, tmp_path):
    long_last = no_system_conversation(3) + [msg("user", "word " * 300), msg("assistant", "Done.")]
    newest_untrained = no_system_conversation(3)
    newest_untrained[-1] = {**newest_untrained[-1], "weight": 0}
    path = write_jsonl(tmp_path / "long.jsonl", [short_row(0), {"messages": long_last},
                                                 {"messages": newest_untrained}])
    cap = len(encode_conversation(tok, newest_untrained[-2:], 4096).input_ids)
    with pytest.raises(OverLength, match="nothing to train"):
        encode_conversation(tok, newest_untrained, cap)
    with pytest.raises(DataError) as info:
        prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0, max_seq_len=cap),
                tok, console=quiet())
    first, second = info.value.problems
    assert (first.file, first.line, first.field) == (str(path), 2, "messages")
    assert "over-length" in first.reason and "even its last exchange alone has" in first.reason
    assert (second.line, second.field) == (3, "messages")
    assert "over-length" in second.reason and "only weight-0 assistant turns: nothing to train" in second.reason
    assert f"{path}:2: messages: over-length" in str(info.value)
    res = prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0, max_seq_len=cap,
                              on_error="skip"), tok, console=quiet())
    assert res.train["source"] == [f"{path}:1"]
    assert res.stats["steps"]["train"]["over_length"] == 2
    assert [s["line"] for s in res.stats["skipped_rows"]] == [2, 3]


# --------------------------------------------------------------------------------- 3. lone surrogates


def test_lone_surrogate_is_a_row_problem(tok, tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text(
        json.dumps(short_row(0)) + "\n"
        + '{"messages": [{"role": "user", "content": "Hi \\ud800 there"}, {"role": "assistant", "content": "Yo"}]}\n'
        + '{"messages": [{"role": "user", "content": "A pair \\ud83d\\ude00 is fine"}, '
          '{"role": "assistant", "content": "Yes"}]}\n',
        encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0), tok, console=quiet())
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.field) == (str(path), 2, "messages[0].content")
    assert "lone surrogate \\ud800 at character 3" in problem.reason
    res = prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0, on_error="skip"),
                  tok, console=quiet())
    assert res.train["source"] == [f"{path}:1", f"{path}:3"]
    assert json.loads((res.out_dir / "stats.json").read_text(encoding="utf-8"))["skipped_rows"][0]["line"] == 2
    # The other formats check every text field the same way.
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text('[\n{"instruction": "Do it", "output": "Done"},\n'
                      '{"instruction": "Do it", "input": "x\\udfff", "output": "Done"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{alpaca}:3: input: not valid Unicode"):
        prepare(make_recipe(tmp_path / "run", train_file=str(alpaca), val_fraction=0.0), tok, console=quiet())
    # So is data.system_prompt, which would otherwise fail every row.
    with pytest.raises(RecipeError, match="^<dict>: data.system_prompt: not valid Unicode: a lone surrogate"):
        prepare(make_recipe(tmp_path / "run", train_file=str(path), system_prompt="Be \udc00 brief"), tok,
                console=quiet())


# --------------------------------------------------------------------------------------- 4./5. CSV


def test_csv_row_that_is_not_utf8_is_a_row_problem(tok, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_bytes(b'prompt,completion\nWhat is 2 plus 2?,4\n"Two\nlines",bad \xff byte\n\nSpell cat,tac\n')
    with pytest.raises(DataError) as info:
        prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0), tok, console=quiet())
    (problem,) = info.value.problems
    assert (problem.file, problem.row, problem.field) == (str(path), 1, "completion")
    assert problem.reason == "not valid UTF-8 (byte 0xff, line 3)"
    assert f"{path}:row 1: completion: not valid UTF-8" in str(info.value)
    res = prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0, on_error="skip"),
                  tok, console=quiet())
    assert res.train["source"] == [f"{path}:row 0", f"{path}:row 2"]


def test_csv_rows_that_cannot_be_read_name_their_line(tmp_path):
    path = tmp_path / "cells.tsv"
    path.write_text("prompt\tcompletion\nok\tfine\ntoo\tmany\tcells\nNA\t\n", encoding="utf-8")
    records, problems, kind = read_records(path)
    assert kind == "csv"
    assert [str(p) for p in problems] == [f"{path}:row 1: row: 3 cells but the header has 2 (line 3); "
                                          "quote cells that contain '\\t'"]
    # Cells are strings as written ("NA" stays "NA"); an empty cell is missing.
    assert [(str(r.loc), r.data) for r in records] == [(f"{path}:row 0", {"prompt": "ok", "completion": "fine"}),
                                                       (f"{path}:row 2", {"prompt": "NA", "completion": None})]


def test_files_without_rows(tmp_path):
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,completion\n", encoding="utf-8")
    with pytest.raises(FormatError, match=f"^{header_only}: no rows: the CSV file has a header \\(prompt,completion\\)"):
        read_records(header_only)
    for name, text in (("empty.jsonl", "\n\n"), ("empty.json", " [ ] ")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(FormatError, match=f"^{tmp_path / name}: no rows"):
            read_records(tmp_path / name)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(json.dumps(short_row(0)).encode("utf-16"))
    with pytest.raises(FormatError, match=f"^{utf16}: the file is UTF-16 encoded; save it as UTF-8"):
        read_records(utf16)


def test_unreadable_rows_only_are_listed_not_a_format_guess(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"messages": [\n{"text": 1' + "0" * 5000 + "}\n" + "[" * 50000 + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(make_recipe(tmp_path / "run", train_file=str(path)), tok, console=quiet())
    assert str(info.value).startswith(f"{path}: no row can be read, so its format cannot be guessed")
    assert [(p.line, p.reason.split(":")[0]) for p in info.value.problems] == [
        (1, "malformed JSON"), (2, "unreadable JSON"), (3, "unreadable JSON")]


# --------------------------------------------------------------------------------- 6./7. whole files


def test_file_named_parquet_that_is_not_parquet(tok, tmp_path):
    fake = tmp_path / "data.parquet"
    fake.write_text('{"text": "I am JSON"}\n', encoding="utf-8")
    with pytest.raises(FormatError, match=f"^{fake}: not a Parquet file"):
        prepare(make_recipe(tmp_path / "run", train_file=str(fake)), tok, console=quiet())
    # A real Parquet file cut short: the markers check out at the start only.
    import datasets

    real = tmp_path / "real.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(real))
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(real.read_bytes()[:-20] + b"PAR1")
    with pytest.raises(FormatError, match=f"^{damaged}: a damaged Parquet file"):
        read_records(damaged)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.parquet"])
def test_file_that_cannot_be_opened(tok, tmp_path, monkeypatch, name):
    # Tests run as root, where chmod 000 does not stop reading: refuse the open itself.
    path = tmp_path / name
    path.write_bytes(b"PAR1" * 4)
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    with pytest.raises(FormatError, match=f"^{path}: cannot read the data file: Permission denied$"):
        read_records(path)
    with pytest.raises(FormatError, match=f"^{path}: cannot read the data file: Permission denied$"):
        prepare(make_recipe(tmp_path / "run", train_file=str(path)), tok, console=quiet())


def test_folder_named_like_a_file_and_broken_link(tok, tmp_path):
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    with pytest.raises(FormatError, match=f"^{folder}: a folder, not a .jsonl file, and not a folder written by"):
        prepare(make_recipe(tmp_path / "run", train_file=str(folder)), tok, console=quiet())
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(FormatError, match="a symbolic link to a missing target") as info:
        prepare(make_recipe(tmp_path / "run", train_file=str(link)), tok, console=quiet())
    assert str(link) in str(info.value)
    with pytest.raises(FormatError, match=f"^{link}: data file not found \\(a symbolic link"):
        read_records(link)


def test_file_in_a_folder_that_cannot_be_searched(tok, tmp_path, monkeypatch):
    import os

    path = tmp_path / "locked" / "rows.jsonl"
    real_stat = os.stat

    def refusing_stat(target, *args, **kwargs):
        if Path(target) == path:
            raise PermissionError(13, "Permission denied", str(target))
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refusing_stat)
    with pytest.raises(FormatError, match=f"^{path}: cannot read the data file: Permission denied$"):
        read_records(path)
    with pytest.raises(FormatError, match=f"^data.train_file: {path}: cannot read the data file: Permission denied$"):
        prepare(make_recipe(tmp_path / "run", train_file=str(path)), tok, console=quiet())


def test_tokenizer_failure_on_a_row_is_a_row_problem(tok, tmp_path, monkeypatch):
    import phi3local.data.prepare as prepare_module

    real = prepare_module.encode_conversation

    def picky(tokenizer, messages, *args, **kwargs):
        if "poison" in messages[0]["content"]:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real(tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "encode_conversation", picky)
    path = write_jsonl(tmp_path / "rows.jsonl", [short_row(0), {"messages": [msg("user", "poison"),
                                                                            msg("assistant", "x")]}])
    with pytest.raises(DataError, match=f"{path}:2: messages: cannot be tokenised: TypeError: TextEncodeInput"):
        prepare(make_recipe(tmp_path / "run", train_file=str(path), val_fraction=0.0), tok, console=quiet())


# ----------------------------------------------------------------------- 8. validation overlaps train


def test_validation_file_overlapping_train_is_a_visible_warning(tok, tmp_path):
    train = CHAT / "validation.jsonl"  # 21 rows, read in place
    console = quiet()
    prepare(make_recipe(tmp_path / "same", train_file=str(train), validation_file=str(train)), tok, console=console)
    out = console.file.getvalue()
    assert (f"warning: 21 of 21 validation rows are also in the training data (data.validation_file={train}, "
            f"data.train_file={train}): they are the very same file") in out
    lines = train.read_text(encoding="utf-8").splitlines()
    partial = write_jsonl(tmp_path / "val.jsonl", [json.loads(line) for line in lines[:3]] + [short_row(1)])
    console = quiet()
    res = prepare(make_recipe(tmp_path / "partial", train_file=str(train), validation_file=str(partial)), tok,
                  console=console)
    assert res.stats["split"]["validation_rows_also_in_train"] == 3
    out = console.file.getvalue()
    assert f"warning: 3 of 4 validation rows are also in the training data (data.validation_file={partial}" in out
    assert "very same file" not in out
    copy = tmp_path / "copy.jsonl"
    shutil.copyfile(train, copy)
    console = quiet()
    prepare(make_recipe(tmp_path / "copy", train_file=str(train), validation_file=str(copy)), tok, console=console)
    assert "they are files with identical contents" in console.file.getvalue()
    # Separate files without shared rows: no warning.
    console = quiet()
    prepare(make_recipe(tmp_path / "apart", train_file=str(train), validation_file=str(write_jsonl(
        tmp_path / "other.jsonl", [short_row(2)]))), tok, console=console)
    assert "warning" not in console.file.getvalue()


# --------------------------------------------------------------------- 9. max_seq_len below the template


def test_max_seq_len_too_small_for_the_chat_template(tmp_path):
    # A template with wordy tags: its shortest conversation takes more than the recipe's floor of 16 tokens.
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\nThe ' + m['role'] + ' of this conversation "
                "writes the following message:\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\nThe assistant of this conversation writes the "
                "following message:\n' }}{% else %}{{ eos_token }}{% endif %}")
    tok = phi3_tokenizer(template)
    minimum = min_chat_tokens(tok)
    assert minimum > 16
    # The rows are bad too: the recipe error comes first, before any row is looked at.
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [msg("user", "")]}])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"output_dir: {tmp_path / 'run'}\ndata:\n  train_file: {data}\n  max_seq_len: 16\n",
                           encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        prepare(load_recipe(recipe_file), tok, console=quiet())
    assert str(info.value) == (f"{recipe_file}: data.max_seq_len: 16 is too small for this chat template; the "
                               f"minimum is {minimum} (the template's own tags around a one-token user turn and reply)")
    assert isinstance(info.value, Phi3LocalError)
    recipe_file.write_text(recipe_file.read_text().replace("max_seq_len: 16", f"max_seq_len: {minimum}"))
    with pytest.raises(DataError, match=f"{data}:1: messages\\[0\\].content: empty content"):
        prepare(load_recipe(recipe_file), tok, console=quiet())
