"""Readers: turn a user's data file into raw records, guess its format, and convert records to examples.

Supported inputs:
- JSON Lines (`.jsonl`, or `.json` whose first character is `{`) and JSON arrays (`.json` starting with `[`).
  These are read here, not by `datasets`, so that malformed JSON is reported with its exact line number
  and the rest of a JSONL file is still read.
- CSV/TSV (`.csv`, `.tsv`), also read here with the `csv` module: every cell is a string (no type guessing
  turns "42" into an int or "NA" into a missing value), an empty cell is missing, and a row that is not
  valid UTF-8 or has more cells than the header is a row problem naming its line.
- Parquet (`.parquet`) and folders written by `datasets` `save_to_disk`, loaded through `datasets`.
A file that cannot be read at all (missing, unreadable, not the format its name says, no rows) is a
FormatError naming it; a row that cannot be read is a RowProblem naming its line (or row index).

Row formats (`data.format`, or guessed from the first row's keys):
- `messages`: Azure AI Studio / OpenAI chat `{"messages": [{"role", "content"}, ...]}`; an assistant turn may
  carry its reasoning trace in `reasoning` (or `reasoning_content`)
- `alpaca`: `instruction`, optional `input`, `output` (optional `system`, `history` as in LLaMA-Factory,
  `reasoning` for the output's trace)
- `prompt_completion`: `prompt`, `completion` (optional `system`, `reasoning` for the completion's trace)
- `text`: `text`, all of it trained (task causal_lm)
- `classification`: `text`, `label` (task classification)

`data.columns` maps our names to the user's: `{prompt: question, completion: answer}`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
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


# ----------------------------------------------------------------------------------------------- bytes


def _unreadable(shown: str, e: OSError) -> FormatError:
    return FormatError(f"{shown}: cannot read the data file: {e.strerror or e}")


def require_file(path: Path, shown: str) -> None:
    """A FormatError naming the file when it is missing (or a broken link) or cannot even be looked up."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        broken = " (a symbolic link to a missing target)" if os.path.islink(path) else ""
        raise FormatError(f"{shown}: data file not found{broken}") from None
    except OSError as e:  # e.g. a folder on the way that may not be searched
        raise _unreadable(shown, e) from e


def read_bytes(path: Path, shown: str) -> bytes:
    """The file's bytes; a file that cannot be opened (permissions, a folder, a broken link) is a FormatError."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise _unreadable(shown, e) from e


def _refuse_utf16(raw: bytes, shown: str) -> None:
    # Windows tools often save UTF-16 with a BOM; each of its lines would otherwise be "not valid UTF-8".
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FormatError(f"{shown}: the file is UTF-16 encoded; save it as UTF-8")


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
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, nesting too deep
            problems.append(RowProblem(loc, "row", f"unreadable JSON: {e}"))
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
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, nesting too deep
            raise fatal(start, f"unreadable JSON: {e}") from None
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
    raw = read_bytes(path, shown)
    _refuse_utf16(raw, shown)
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError([RowProblem(Location(shown, line=line), "row", "not valid UTF-8")]) from None
        return _read_json_array(path, shown, text)
    return _read_jsonl(path, shown, raw)


# ------------------------------------------------------------------------------------------------ CSV

# A cell may hold a whole conversation as JSON, far past the csv module's default limit of 128 KiB.
_CSV_FIELD_LIMIT = 2**31 - 1
# Bytes that are not UTF-8, as `errors="surrogateescape"` decodes them.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _check_header(header: list[str], shown: str, line: int, escaped: re.Pattern | None) -> None:
    if escaped and any(escaped.search(name) for name in header):
        raise FormatError(f"{shown}:{line}: the CSV header row is not valid UTF-8")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise FormatError(f"{shown}: the CSV header names the columns {duplicates} more than once")


def _csv_row(cells: list[str], header: list[str], loc: Location, line: int, escaped: re.Pattern | None,
             delimiter: str) -> RawRecord | RowProblem:
    """One data row as a record keyed by the header (an empty cell is missing), or why it cannot be one."""
    if len(cells) > len(header):
        return RowProblem(loc, "row", f"{len(cells)} cells but the header has {len(header)} (line {line}); "
                                      f"quote cells that contain {delimiter!r}")
    if escaped:
        for name, cell in zip(header, cells):
            bad = escaped.search(cell)
            if bad:
                return RowProblem(loc, name, f"not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x}, line {line})")
    data = {name: (cells[i] or None) if i < len(cells) else None for i, name in enumerate(header)}
    return RawRecord(data, loc)


def read_csv_records(path: Path, shown: str | None = None) -> tuple[list[RawRecord], list[RowProblem], list[str]]:
    """Rows of a CSV/TSV file, each with its 0-based row index (blank lines are not rows), the rows that
    cannot be read, and the header."""
    shown = shown or str(path)
    raw = read_bytes(path, shown)
    _refuse_utf16(raw, shown)
    try:
        text, escaped = raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        # Decode anyway so that only the rows holding the bad bytes are lost, each reported with its line.
        text, escaped = raw.decode("utf-8-sig", errors="surrogateescape"), _ESCAPED_BYTE
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    records: list[RawRecord] = []
    problems: list[RowProblem] = []
    old_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        while True:
            line = reader.line_num + 1  # where the next row starts (a quoted cell may span lines)
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the reader starts afresh on the next line
                if header is None:
                    raise FormatError(f"{shown}:{line}: the CSV header row cannot be read: {e}") from None
                problems.append(RowProblem(Location(shown, row=len(records) + len(problems)), "row",
                                           f"not readable as CSV: {e} (line {line})"))
                continue
            if not cells:
                continue  # a blank line
            if header is None:
                _check_header(cells, shown, line, escaped)
                header = cells
                continue
            loc = Location(shown, row=len(records) + len(problems))
            row = _csv_row(cells, header, loc, line, escaped, delimiter)
            (problems if isinstance(row, RowProblem) else records).append(row)
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        raise FormatError(f"{shown}: empty CSV file (no header row)")
    if not records and not problems:
        raise FormatError(f"{shown}: no rows: the CSV file has a header ({delimiter.join(header)}) and nothing under it")
    return records, problems, header


# ------------------------------------------------------------------------------ tables (datasets)


@contextlib.contextmanager
def _datasets_quiet():
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _is_parquet(path: Path, shown: str) -> bool:
    """Whether the file starts and ends with Parquet's marker `PAR1`."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 4))
            tail = f.read(4)
    except OSError as e:
        raise _unreadable(shown, e) from e
    return size >= 12 and head == tail == b"PAR1"


def _load_parquet(path: Path, shown: str):
    import datasets

    # Checked first: pyarrow's own error for a file that is no Parquet at all is cryptic (and logged).
    if not _is_parquet(path, shown):
        raise FormatError(f"{shown}: not a Parquet file (it does not start and end with the marker PAR1); "
                          "give the file the extension of its real format")
    with tempfile.TemporaryDirectory(prefix="phi3local-ds-") as cache, _datasets_quiet():
        try:
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as e:  # pyarrow and datasets raise many types for a damaged file
            raise FormatError(f"{shown}: a damaged Parquet file: {type(e).__name__}: {e}") from e


def _load_saved(path: Path, shown: str):
    """A folder written by `save_to_disk`: the Dataset, or the 'train' (or only) split of a DatasetDict."""
    import datasets

    try:
        with _datasets_quiet():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:  # datasets raises many types for a folder it cannot read
        named_like_a_file = path.suffix.lower() in JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
        what = f"a folder, not a {path.suffix} file, and " if named_like_a_file else ""
        raise FormatError(f"{shown}: {what}not a folder written by datasets' save_to_disk ({e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            return loaded["train"]
        if len(splits) == 1:
            return loaded[splits[0]]
        raise FormatError(
            f"{shown}: holds the splits {splits} and none is called 'train'; point data.train_file "
            f"(and data.validation_file) at one split's folder, e.g. {path / splits[0]}"
        )
    return loaded


def _check_columns(columns: dict[str, str], names: list[str], shown: str) -> None:
    missing = [f"{ours} -> {theirs}" for ours, theirs in columns.items() if theirs not in names]
    if missing:
        raise FormatError(
            f"{shown}: data.columns names columns that are not in the file: {', '.join(missing)}; "
            f"the file has {names}"
        )


def _parse_messages_cell(data: Any) -> None:
    # A chat stored in a table is a JSON string in its cell; what does not parse stays a string, which
    # validation then reports as "not a list".
    if isinstance(data, dict) and isinstance(data.get("messages"), str):
        try:
            data["messages"] = json.loads(data["messages"])
        except (ValueError, RecursionError):
            pass


def read_table_records(path: Path, kind: str, shown: str | None = None
                       ) -> tuple[list[RawRecord], list[RowProblem], list[str]]:
    """Rows of a CSV/Parquet/save_to_disk table (0-based row indices), the unreadable rows, the columns."""
    shown = shown or str(path)
    if kind == "csv":
        return read_csv_records(path, shown)
    table = _load_parquet(path, shown) if kind == "parquet" else _load_saved(path, shown)
    records = [RawRecord(row, Location(shown, row=index)) for index, row in enumerate(table)]
    return records, [], list(table.column_names)


def read_records(path: Path, columns: dict[str, str] | None = None, shown: str | None = None
                 ) -> tuple[list[RawRecord], list[RowProblem], str]:
    """Read any supported file: (records with our column names, unreadable rows, file kind)."""
    columns = columns or {}
    shown = shown or str(path)
    require_file(path, shown)
    kind = file_kind(path)
    if kind == "json":
        records, problems = read_json_records(path, shown)
    else:
        records, problems, names = read_table_records(path, kind, shown)
        _check_columns(columns, names, shown)
    if not records and not problems:
        raise FormatError(f"{shown}: no rows: the file holds no data")
    for rec in records:
        rec.data = map_columns(rec.data, columns)
        if kind != "json":
            _parse_messages_cell(rec.data)
    return records, problems, kind


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


def _fold_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write each assistant turn's reasoning trace into its content (`<think>...</think>` first), so that cleaning,
    deduplication and the safety screen see it; a bad trace is left in place for encoding to report as the row's
    problem."""
    from phi3local.data.template import TemplateRejected, with_reasoning

    try:
        return with_reasoning(messages)
    except TemplateRejected:
        return messages


def _reasoning_of(data: dict[str, Any]) -> dict[str, Any]:
    return {key: data[key] for key in ("reasoning", "reasoning_content") if data.get(key) is not None}


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
            messages.append({**msg, **_reasoning_of(m)})
        return Conversation(_fold_reasoning(messages), source, loc)
    if fmt == "alpaca":
        messages = []
        if isinstance(data.get("system"), str) and data["system"].strip():
            messages.append({"role": "system", "content": data["system"]})
        for turn in data.get("history") or []:
            messages.append({"role": "user", "content": turn[0]})
            messages.append({"role": "assistant", "content": turn[1]})
        messages.append({"role": "user", "content": alpaca_user_text(data["instruction"], data.get("input"))})
        messages.append({"role": "assistant", "content": data["output"], **_reasoning_of(data)})
        return Conversation(_fold_reasoning(messages), source, loc)
    if fmt == "prompt_completion":
        messages = []
        if isinstance(data.get("system"), str) and data["system"].strip():
            messages.append({"role": "system", "content": data["system"]})
        messages.append({"role": "user", "content": data["prompt"]})
        messages.append({"role": "assistant", "content": data["completion"], **_reasoning_of(data)})
        return Conversation(_fold_reasoning(messages), source, loc)
    if fmt == "text":
        return TextExample(data["text"], source, None, loc)
    if fmt == "classification":
        return TextExample(data["text"], source, data["label"], loc)
    raise FormatError(f"unknown format {fmt!r}")
