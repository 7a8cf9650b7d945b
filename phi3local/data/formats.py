"""Readers: turn a user's data file into raw records, guess its format, and convert records to examples.

Supported inputs:
- JSON Lines (`.jsonl`, or `.json` whose first character is `{`) and JSON arrays (`.json` starting with `[`).
  These are read here, not by `datasets`, so that malformed JSON is reported with its exact line number
  and the rest of a JSONL file is still read.
- CSV/TSV (`.csv`, `.tsv`), Parquet (`.parquet`) and folders written by `datasets` `save_to_disk`,
  loaded through `datasets`. CSV columns are read as strings (no type guessing turns "42" into an int).

Row formats (`data.format`, or guessed from the first row's keys):
- `messages`: Azure AI Studio / OpenAI chat `{"messages": [{"role", "content"}, ...]}`
- `alpaca`: `instruction`, optional `input`, `output` (optional `system`, `history` as in LLaMA-Factory)
- `prompt_completion`: `prompt`, `completion`
- `text`: `text`, all of it trained (task causal_lm)
- `classification`: `text`, `label` (task classification)

`data.columns` maps our names to the user's: `{prompt: question, completion: answer}`.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from phi3local.data.records import (
    Conversation,
    DataError,
    Example,
    FormatError,
    Location,
    RawRecord,
    RowProblem,
    TextExample,
)

FORMATS = ("messages", "alpaca", "prompt_completion", "text", "classification")
CHAT_FORMATS = ("messages", "alpaca", "prompt_completion")
# Fields each format needs in its rows (our names, after data.columns is applied).
REQUIRED_FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
}
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")


def file_kind(path: Path) -> str:
    """'json', 'csv', 'parquet' or 'datasets' (a save_to_disk folder), from the path alone."""
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise FormatError(
        f"{path}: unknown file type '{suffix or '(no extension)'}'; use .jsonl, .json, .csv, .tsv, .parquet "
        "or a folder written by datasets' save_to_disk"
    )


def map_columns(data: Any, columns: dict[str, str]) -> Any:
    """Rename the user's columns to ours: columns is {our_name: their_column}."""
    if not columns or not isinstance(data, dict):
        return data
    out = dict(data)
    for ours, theirs in columns.items():
        if theirs in data:
            value = out.pop(theirs)
            out[ours] = value
    return out


# ----------------------------------------------------------------------------------------------- JSON


def _read_jsonl(path: Path, shown: str, raw: bytes) -> tuple[list[RawRecord], list[RowProblem]]:
    records, problems = [], []
    lines = raw.split(b"\n")
    for number, line_bytes in enumerate(lines, start=1):
        loc = Location(shown, line=number)
        if number == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):
            line_bytes = line_bytes[3:]
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(RowProblem(loc, "row", f"not valid UTF-8 (byte {e.start})"))
            continue
        if not line.strip():
            continue  # blank lines (and the newline at the end of the file) are not rows
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(RowProblem(loc, "row", f"malformed JSON: {e.msg} (column {e.colno})"))
            continue
        records.append(RawRecord(data, loc))
    return records, problems


def _read_json_array(path: Path, shown: str, text: str) -> tuple[list[RawRecord], list[RowProblem]]:
    """Read a JSON array element by element, so that each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    records: list[RawRecord] = []
    n = len(text)
    line, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def skip_ws(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fatal(pos: int, reason: str) -> DataError:
        problem = RowProblem(Location(shown, line=line_at(pos)), "row", reason)
        return DataError([problem], header=f"{shown}: malformed JSON array; the rows after this point cannot be read")

    pos = skip_ws(0)
    if pos >= n or text[pos] != "[":
        raise fatal(pos, "expected '[' at the start of a JSON array")
    pos = skip_ws(pos + 1)
    if pos < n and text[pos] == "]":
        return records, []
    while True:
        start = skip_ws(pos)
        try:
            data, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise fatal(e.pos, f"malformed JSON: {e.msg}") from None
        records.append(RawRecord(data, Location(shown, line=line_at(start))))
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            break
        raise fatal(pos, "expected ',' or ']' after an array element")
    if skip_ws(pos + 1) != n:
        raise fatal(skip_ws(pos + 1), "extra data after the closing ']'")
    return records, []


def read_json_records(path: Path, shown: str | None = None) -> tuple[list[RawRecord], list[RowProblem]]:
    """Rows of a JSONL file or a JSON array, each with its line number, and the malformed lines."""
    shown = shown or str(path)
    raw = path.read_bytes()
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError([RowProblem(Location(shown, line=line), "row", "not valid UTF-8")]) from None
        return _read_json_array(path, shown, text)
    return _read_jsonl(path, shown, raw)


# ------------------------------------------------------------------------------------ tables (datasets)


def _load_table(path: Path, kind: str):
    """Load a CSV/Parquet file or a save_to_disk folder as a `datasets.Dataset` (cache in a temp dir)."""
    import datasets

    if kind == "datasets":
        try:
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as e:
            raise FormatError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from e
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if "train" in loaded:
                return loaded["train"]
            if len(splits) == 1:
                return loaded[splits[0]]
            raise FormatError(
                f"{path}: holds the splits {splits} and none is called 'train'; point data.train_file "
                f"(and data.validation_file) at one split's folder, e.g. {path / splits[0]}"
            )
        return loaded
    with tempfile.TemporaryDirectory(prefix="phi3local-ds-") as cache:
        was_enabled = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            if kind == "csv":
                delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
                with path.open(newline="", encoding="utf-8-sig") as f:
                    header = next(csv.reader(f, delimiter=delimiter), None)
                if not header:
                    raise FormatError(f"{path}: empty CSV file (no header row)")
                features = datasets.Features({name: datasets.Value("string") for name in header})
                return datasets.Dataset.from_csv(str(path), features=features, cache_dir=cache,
                                                 keep_in_memory=True, delimiter=delimiter)
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        finally:
            if was_enabled:
                datasets.enable_progress_bars()


def read_table_records(path: Path, kind: str, columns: dict[str, str], shown: str | None = None
                       ) -> list[RawRecord]:
    """Rows of a CSV/Parquet/save_to_disk table, each with its 0-based row index."""
    shown = shown or str(path)
    table = _load_table(path, kind)
    missing = [f"{ours} -> {theirs}" for ours, theirs in columns.items() if theirs not in table.column_names]
    if missing:
        raise FormatError(
            f"{shown}: data.columns names columns that are not in the file: {', '.join(missing)}; "
            f"the file has {table.column_names}"
        )
    records = []
    for index, row in enumerate(table):
        data = map_columns(row, columns)
        if isinstance(data.get("messages"), str):  # chat stored as a JSON string in a CSV cell
            try:
                data["messages"] = json.loads(data["messages"])
            except json.JSONDecodeError:
                pass  # validation reports it as "not a list"
        records.append(RawRecord(data, Location(shown, row=index)))
    return records


def read_records(path: Path, columns: dict[str, str] | None = None, shown: str | None = None
                 ) -> tuple[list[RawRecord], list[RowProblem], str]:
    """Read any supported file: (records with our column names, unreadable rows, file kind)."""
    columns = columns or {}
    if not path.exists():
        raise FormatError(f"{shown or path}: data file not found")
    kind = file_kind(path)
    if kind == "json":
        records, problems = read_json_records(path, shown)
        for rec in records:
            rec.data = map_columns(rec.data, columns)
        return records, problems, kind
    return read_table_records(path, kind, columns, shown), [], kind


# ------------------------------------------------------------------------------------------ detection


def detect_format(records: list[RawRecord], task: str, requested: str = "auto", shown: str = "") -> str:
    """The row format: `requested` if not auto (checked against the task), else guessed from the first row."""
    if requested != "auto":
        if requested not in FORMATS:
            raise FormatError(f"{shown}: unknown data.format {requested!r} (known: {', '.join(FORMATS)})")
        if task == "classification" and requested != "classification":
            raise FormatError(f"{shown}: task=classification needs data.format=classification (text, label)")
        if task == "causal_lm" and requested == "classification":
            raise FormatError(f"{shown}: data.format=classification needs task=classification")
        return requested
    first = next((r for r in records if isinstance(r.data, dict)), None)
    if first is None:
        raise FormatError(f"{shown}: no readable rows to guess the format from; set data.format")
    keys = set(first.data)
    if task == "classification":
        if {"text", "label"} <= keys:
            return "classification"
        raise FormatError(
            f"{shown}: task=classification needs 'text' and 'label' fields; the first row "
            f"({first.loc}) has {sorted(keys)}. Map yours with data.columns, e.g. "
            "data.columns={text: review, label: sentiment}"
        )
    candidates = [fmt for fmt in CHAT_FORMATS + ("text",) if set(REQUIRED_FIELDS[fmt]) <= keys]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FormatError(
            f"{shown}: cannot tell the format from the first row ({first.loc}), which has the fields "
            f"{sorted(keys)}. Expected one of: messages; instruction+output (alpaca); prompt+completion; "
            "text. Map your column names with data.columns, e.g. data.columns={prompt: question, "
            "completion: answer}, or set data.format"
        )
    raise FormatError(
        f"{shown}: the first row ({first.loc}) fits several formats ({', '.join(candidates)}); "
        f"set data.format to one of them"
    )


# ----------------------------------------------------------------------------------------- conversion


def alpaca_user_text(instruction: str, input_text: str | None) -> str:
    """Alpaca's user turn: the instruction, then a blank line and the input when there is one."""
    if input_text is not None and input_text.strip():
        return instruction + "\n\n" + input_text
    return instruction


def to_example(record: RawRecord, fmt: str) -> Example:
    """Convert a record that passed `validate.check_record` into a Conversation or TextExample."""
    data, loc = record.data, record.loc
    source = str(loc)
    if fmt == "messages":
        messages = []
        for m in data["messages"]:
            msg = {"role": m["role"], "content": m["content"]}
            if m.get("weight") is not None:
                msg["weight"] = int(m["weight"])
            messages.append(msg)
        return Conversation(messages, source, loc)
    if fmt == "alpaca":
        messages = []
        if isinstance(data.get("system"), str) and data["system"].strip():
            messages.append({"role": "system", "content": data["system"]})
        for turn in data.get("history") or []:
            messages.append({"role": "user", "content": turn[0]})
            messages.append({"role": "assistant", "content": turn[1]})
        messages.append({"role": "user", "content": alpaca_user_text(data["instruction"], data.get("input"))})
        messages.append({"role": "assistant", "content": data["output"]})
        return Conversation(messages, source, loc)
    if fmt == "prompt_completion":
        messages = []
        if isinstance(data.get("system"), str) and data["system"].strip():
            messages.append({"role": "system", "content": data["system"]})
        messages.append({"role": "user", "content": data["prompt"]})
        messages.append({"role": "assistant", "content": data["completion"]})
        return Conversation(messages, source, loc)
    if fmt == "text":
        return TextExample(data["text"], source, None, loc)
    if fmt == "classification":
        return TextExample(data["text"], source, data["label"], loc)
    raise FormatError(f"unknown format {fmt!r}")
