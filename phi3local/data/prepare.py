"""The `prepare` stage: read -> validate -> clean -> encode -> split -> save (Arrow) + stats.json + summary.

Output folder (default `data.prepared_dir`, else `<output_dir>/prepared`):
- `train/`, `validation/`: `datasets` save_to_disk folders with columns
  `input_ids` list[int32], `labels` list[int32] (aligned with input_ids, -100 where not trained),
  `doc_id` int64 (unique across both splits), `source` str ("file:line" / "file:row N"),
  and for task=classification `label` int64 (index into model.labels).
  task=preference writes one row per pair instead: `prompt_ids`, `chosen_ids`, `rejected_ids` list[int32],
  `doc_id`, `source` (see phi3local.data.preference), and stats.json adds a `preference` section.
- `stats.json`: counts per step, skipped and filtered rows with reasons, token statistics, the cache key
  (validation rows that are also in the training data are counted there and warned about on the console).
The folder is written under a temporary name and renamed into place, so a crash never leaves half of it.
If `stats.json` already records the same input hashes, tokenizer hash and data settings, the folder is
reused instead of tokenising again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from phi3local import folders
from phi3local.config import DataConfig, Recipe, RecipeError
from phi3local.data import clean
from phi3local.data.formats import CHAT_FORMATS, detect_format, read_records, require_file, to_example
from phi3local.data.records import (
    Conversation,
    DataError,
    Example,
    FormatError,
    RowProblem,
    StepCounts,
)
from phi3local.data.report import histogram, length_summary, print_summary
from phi3local.data.template import (
    ChatTemplateError,
    Encoded,
    OverLength,
    TemplateRejected,
    encode_conversation,
    encode_text,
    min_chat_tokens,
)
from phi3local.data.validate import check_record, collect_or_raise, invalid_unicode, resolve_label

# Bump when the output of prepare changes for the same inputs, so old caches are not reused.
PIPELINE_VERSION = 2
# DataConfig fields that change what prepare writes (prepared_dir, packing and max_errors_shown do not).
CACHE_FIELDS = ("format", "columns", "val_fraction", "split_seed", "on_error", "max_seq_len", "truncation",
                "min_tokens", "max_tokens", "dedupe", "normalize_whitespace", "system_prompt", "train_on_reasoning")
ASSETS = Path(__file__).resolve().parents[1] / "assets"

Row = TypeVar("Row")  # a cleaned row: an Example, or for task=preference a Pair
Enc = TypeVar("Enc")  # its encoding: an Encoded, or an EncodedPair


@dataclass
class PrepareResult:
    out_dir: Path
    train: Any  # datasets.Dataset
    validation: Any  # datasets.Dataset
    stats: dict[str, Any]
    reused: bool = False


@dataclass
class FileResult(Generic[Row, Enc]):
    """What one input file gave: the kept (row, encoding) pairs and the account of every other row."""

    shown: str
    fmt: str
    rows: list[tuple[Row, Enc]] = field(default_factory=list)
    counts: StepCounts = field(default_factory=StepCounts)
    problems: list[RowProblem] = field(default_factory=list)
    filtered: list[dict[str, Any]] = field(default_factory=list)
    truncated: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- inputs


def resolve_data_path(value: str, recipe: Recipe) -> Path:
    """A data path as written in the recipe: absolute, else next to the recipe file, else from the cwd."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    source = Path(recipe.source)
    if recipe.source not in ("<defaults>", "<dict>") and source.is_file():
        beside = source.parent / path
        if beside.exists():
            return beside
    return path


def demo_file(task: str) -> Path:
    if task == "preference":
        return ASSETS / "demo_preference.jsonl"
    return ASSETS / ("demo_classification.jsonl" if task == "classification" else "demo_chat.jsonl")


def file_digest(path: Path) -> str:
    """sha256 of a file, or of every file (relative name and bytes) in a folder."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def input_digest(path: Path, shown: str) -> str:
    """file_digest of an input, or a FormatError naming it when it cannot be read."""
    try:
        return file_digest(path)
    except OSError as e:
        raise FormatError(f"{shown}: cannot read the data file: {e.strerror or e}") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides the ids: the tokenizer definition, special tokens and the chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode())
    h.update(str([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def cache_key(recipe: Recipe, inputs: dict[str, dict[str, Any]], tokenizer_hash: str) -> dict[str, Any]:
    data = {name: getattr(recipe.data, name) for name in CACHE_FIELDS}
    key = {
        "version": PIPELINE_VERSION,
        "task": recipe.task,
        "labels": list(recipe.model.labels) if recipe.task == "classification" else [],
        "data": data,
        "inputs": {name: {"path": v["path"], "sha256": v["sha256"]} for name, v in inputs.items()},
        "tokenizer_sha256": tokenizer_hash,
    }
    return json.loads(json.dumps(key))


# ------------------------------------------------------------------------------------------ settings


def check_system_prompt(recipe: Recipe) -> None:
    """Refuse a data.system_prompt that no tokenizer can encode (it would fail every row)."""
    prompt = recipe.data.system_prompt
    reason = invalid_unicode(prompt) if isinstance(prompt, str) else None
    if reason:
        raise RecipeError(f"{recipe.source}: data.system_prompt: {reason}")


def check_max_seq_len(recipe: Recipe, tokenizer, fmt: str) -> None:
    """Refuse a data.max_seq_len that not even the shortest conversation fits, before any row is encoded
    (otherwise every row would be reported as over-length). The recipe itself only checks a fixed floor."""
    if fmt not in CHAT_FORMATS:
        return
    minimum = min_chat_tokens(tokenizer)
    if recipe.data.max_seq_len < minimum:
        raise RecipeError(
            f"{recipe.source}: data.max_seq_len: {recipe.data.max_seq_len} is too small for this chat template; "
            f"the minimum is {minimum} (the template's own tags around a one-token user turn and reply)"
        )


# ------------------------------------------------------------------------------------------ one file


def _sort_key(p: RowProblem) -> tuple:
    return (p.file, p.line if p.line is not None else -1, p.row if p.row is not None else -1)


def encode_example(ex: Example, tokenizer, recipe: Recipe) -> Encoded:
    """Token ids and labels of one cleaned example, by its kind (chat, classification, plain text)."""
    cfg = recipe.data
    if isinstance(ex, Conversation):
        return encode_conversation(tokenizer, ex.messages, cfg.max_seq_len, cfg.truncation, cfg.train_on_reasoning)
    if ex.label is not None:
        label = resolve_label(ex.label, list(recipe.model.labels))
        return encode_text(tokenizer, ex.text, cfg.max_seq_len, label=label, truncation=cfg.truncation)
    return encode_text(tokenizer, ex.text, cfg.max_seq_len, train_all=True, truncation=cfg.truncation)


def encode_rows(result: FileResult[Row, Enc], rows: Iterable[Row], encode: Callable[[Row], Enc], cfg: DataConfig, *,
                field_of: Callable[[Row], str], length_of: Callable[[Enc], int],
                over_length: type[Exception] = OverLength, measured: str = "") -> None:
    """Encode a file's cleaned rows into result.rows (its last step), then count what was kept and sort its problems.

    A row that cannot be encoded becomes a RowProblem on field_of(row), or for an over_length error on the error's
    `field_name` when it names one. A row outside data.min_tokens / max_tokens (counted before truncation; measured
    says what the count covers) is filtered, a truncated one listed; length_of gives an encoding's kept tokens.
    """
    counts = result.counts
    for row in rows:
        try:
            enc = encode(row)
        except over_length as e:
            result.problems.append(RowProblem(row.loc, getattr(e, "field_name", field_of(row)), f"over-length: {e}"))
            counts.over_length += 1
            continue
        except TemplateRejected as e:
            result.problems.append(RowProblem(row.loc, field_of(row), str(e)))
            counts.invalid += 1
            continue
        except ChatTemplateError:
            raise  # the template itself cannot be used: not one row's problem
        except (TypeError, ValueError, UnicodeError) as e:
            # What the tokenizer raises for text it cannot take; validation should have caught it, but one
            # odd row must not end the run with a library traceback.
            result.problems.append(RowProblem(row.loc, field_of(row), f"cannot be tokenised: {type(e).__name__}: {e}"))
            counts.invalid += 1
            continue
        reason = clean.length_filter(enc.full_length, cfg.min_tokens, cfg.max_tokens)
        if reason:
            setattr(counts, reason, getattr(counts, reason) + 1)
            limit = f"min_tokens {cfg.min_tokens}" if reason == "too_short" else f"max_tokens {cfg.max_tokens}"
            result.filtered.append({"where": row.source, "step": reason,
                                    "reason": f"{enc.full_length} tokens{measured}, {limit}"})
            continue
        kept = length_of(enc)
        if kept < enc.full_length:
            counts.truncated += 1
            result.truncated.append({"where": row.source, "truncated_turns": enc.truncated_turns,
                                     "tokens_before": enc.full_length, "tokens_after": kept})
        result.rows.append((row, enc))
    counts.kept = len(result.rows)
    result.problems.sort(key=_sort_key)


def process_file(path: Path, shown: str, recipe: Recipe, tokenizer) -> FileResult[Example, Encoded]:
    """Read, validate, clean and encode one file. Row problems are collected, not raised."""
    cfg = recipe.data
    labels = list(recipe.model.labels)
    records, problems, _ = read_records(path, cfg.columns, shown)
    if cfg.format == "auto" and problems and not any(isinstance(r.data, dict) for r in records):
        raise DataError(problems, cfg.max_errors_shown,
                        header=f"{shown}: no row can be read, so its format cannot be guessed")
    fmt = detect_format(records, recipe.task, cfg.format, shown)
    if fmt == "classification" and len(labels) < 2:
        found = sorted({str(r.data.get("label")) for r in records if isinstance(r.data, dict)})[:20]
        raise FormatError(
            f"{shown}: task=classification needs model.labels (at least two names, in the order of the "
            f"classifier's outputs); the labels in the data are {found}"
        )
    check_max_seq_len(recipe, tokenizer, fmt)
    result: FileResult[Example, Encoded] = FileResult(shown, fmt, problems=problems)
    counts = result.counts
    counts.read = len(records) + len(problems)
    examples: list[Example] = []
    for rec in records:
        problem = check_record(rec.data, fmt, rec.loc, labels)
        if problem:
            problems.append(problem)
        else:
            examples.append(to_example(rec, fmt))
    counts.invalid = len(problems)

    if cfg.normalize_whitespace:
        normalized = []
        for ex in examples:
            ex, changed = clean.normalize_example(ex)
            counts.whitespace_normalized += changed
            normalized.append(ex)
        examples = normalized
    if cfg.system_prompt:
        with_system = []
        for ex in examples:
            ex, added = clean.add_system_prompt(ex, cfg.system_prompt)
            counts.system_prompt_added += added
            with_system.append(ex)
        examples = with_system
    if cfg.dedupe:
        examples, dropped = clean.dedupe(examples)
        counts.duplicates = len(dropped)
        for dup, first in dropped:
            result.filtered.append({"where": dup.source, "step": "duplicates",
                                    "reason": f"exact duplicate of {first.source}"})

    encode_rows(result, examples, lambda ex: encode_example(ex, tokenizer, recipe), cfg,
                field_of=lambda ex: "messages" if isinstance(ex, Conversation) else "text",
                length_of=lambda enc: len(enc.input_ids))
    return result


# ------------------------------------------------------------------------------------------- split/save


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of n rows: (train indices, validation indices), each in the original order."""
    n_val = math.floor(n * val_fraction + 0.5)  # round half up (Python's round(98.5) is 98)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [i for i in range(n) if i not in val], sorted(val)


class Split(NamedTuple):
    """The kept rows of both splits, each (doc_id, row, encoding) with doc_ids unique across them, and how."""

    train: list[tuple[int, Any, Any]]
    validation: list[tuple[int, Any, Any]]
    info: dict[str, Any]  # stats.json's `split`


def split_results(results: dict[str, FileResult], cfg: DataConfig, row_key: Callable[[Any], str],
                  unit: str = "rows") -> Split:
    """Apply data.on_error to the files' problems, then split the kept rows: the validation file's, else a seeded
    share of the training file's. row_key finds validation rows that are also training rows (they are counted).
    Raises DataError when no training row is left (unit names them in the message)."""
    problems = [p for r in results.values() for p in r.problems]
    collect_or_raise(problems, cfg.on_error, cfg.max_errors_shown)
    train_res = results["train"]
    if "validation" in results:
        train_rows = [(i, *row) for i, row in enumerate(train_res.rows)]
        offset = len(train_rows)
        val_rows = [(offset + i, *row) for i, row in enumerate(results["validation"].rows)]
        train_keys = {row_key(row) for _, row, _ in train_rows}
        overlap = sum(row_key(row) in train_keys for _, row, _ in val_rows)
        info: dict[str, Any] = {"method": "file", "validation_rows_also_in_train": overlap}
    else:
        tr, va = split_indices(len(train_res.rows), cfg.val_fraction, cfg.split_seed)
        train_rows = [(i, *train_res.rows[i]) for i in tr]
        val_rows = [(i, *train_res.rows[i]) for i in va]
        info = {"method": "seeded", "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}
    if not train_rows:
        raise DataError(problems, cfg.max_errors_shown,
                        header=f"no training {unit} left after validation and cleaning of {train_res.shown}")
    info.update({"train_rows": len(train_rows), "validation_rows": len(val_rows)})
    return Split(train_rows, val_rows, info)


def prepare_stats(recipe: Recipe, key: dict[str, Any], inputs: dict[str, dict[str, Any]],
                  results: dict[str, FileResult], split: Split, summary: Callable[[list[tuple]], dict[str, Any]],
                  length_of: Callable[[Any], int]) -> dict[str, Any]:
    """The stats.json sections of every task: inputs, step counts, split, skipped/filtered/truncated rows, the
    token summary of each split (summary of its rows) and the histogram of length_of(encoding)."""
    all_rows = split.train + split.validation
    return {
        "version": PIPELINE_VERSION,
        "task": recipe.task,
        "cache_key": key,
        "inputs": {name: {**inputs[name], "format": results[name].fmt} for name in results},
        "steps": {name: {k: v for k, v in dataclasses.asdict(r.counts).items() if k != "extra"}
                  for name, r in results.items()},
        "split": split.info,
        "skipped_rows": [{"split": name, **p.to_dict()} for name, r in results.items() for p in r.problems],
        "filtered_rows": [{"split": name, **f} for name, r in results.items() for f in r.filtered],
        "tokens": {"train": summary(split.train), "validation": summary(split.validation), "all": summary(all_rows)},
        "histogram": histogram([length_of(enc) for _, _, enc in all_rows]),
        "truncated": {
            "rows": sum(len(r.truncated) for r in results.values()),
            "turns_dropped": sum(t["truncated_turns"] for r in results.values() for t in r.truncated),
            "max_seq_len": recipe.data.max_seq_len,
            "list": [{"split": name, **t} for name, r in results.items() for t in r.truncated],
        },
    }


def features(task: str):
    import datasets

    cols = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "doc_id": datasets.Value("int64"),
        "source": datasets.Value("string"),
    }
    if task == "classification":
        cols["label"] = datasets.Value("int64")
    return datasets.Features(cols)


def _to_dataset(rows: list[tuple[int, Example, Encoded]], task: str):
    import datasets

    data: dict[str, list] = {
        "input_ids": [enc.input_ids for _, _, enc in rows],
        "labels": [enc.labels for _, _, enc in rows],
        "doc_id": [doc for doc, _, _ in rows],
        "source": [ex.source for _, ex, _ in rows],
    }
    if task == "classification":
        data["label"] = [enc.label for _, _, enc in rows]
    return datasets.Dataset.from_dict(data, features=features(task))


def _save(ds, path: Path) -> None:
    # datasets 5.2 writes 0 shards for an empty dataset and then cannot load it back; force one shard.
    ds.save_to_disk(str(path), num_shards=1 if len(ds) == 0 else None)


def load_prepared(directory: str | Path):
    """(train, validation) `datasets.Dataset`s from a prepared folder."""
    import datasets

    directory = Path(directory)
    missing = [name for name in ("train", "validation") if not (directory / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{directory}: no prepared data ({', '.join(missing)} missing); run `prepare` first")
    return datasets.load_from_disk(str(directory / "train")), datasets.load_from_disk(str(directory / "validation"))


def read_stats(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "stats.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- prepare


def _default_console():
    from rich.console import Console

    return Console()


def prepare(recipe: Recipe, tokenizer, out_dir: str | Path | None = None, console=None) -> PrepareResult:
    """Run the prepare stage for `recipe` with `tokenizer`; see the module docstring for the output."""
    started = time.time()
    console = console or _default_console()
    cfg = recipe.data
    out_dir = Path(out_dir or cfg.prepared_dir or Path(recipe.output_dir) / "prepared")

    files: dict[str, tuple[Path, str]] = {}
    if cfg.train_file:
        files["train"] = (resolve_data_path(cfg.train_file, recipe), cfg.train_file)
    else:
        demo = demo_file(recipe.task)
        files["train"] = (demo, demo.name)
        console.print(f"data.train_file is not set: using the embedded demo data {demo.name}")
    if cfg.validation_file:
        files["validation"] = (resolve_data_path(cfg.validation_file, recipe), cfg.validation_file)
    for name, (path, shown) in files.items():
        require_file(path, f"data.{name}_file: {shown}")
    check_system_prompt(recipe)

    folders.check_output_dir(out_dir, "prepare", overwrite=True)  # before any work: never someone else's folder
    folders.settle(out_dir)  # before the reuse check: an earlier output a crash left renamed aside is reused
    inputs = {name: {"path": shown, "sha256": input_digest(path, shown)} for name, (path, shown) in files.items()}
    key = cache_key(recipe, inputs, tokenizer_fingerprint(tokenizer))
    stats_path = out_dir / "stats.json"
    if stats_path.exists():
        try:
            old = json.loads(stats_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: prepared again
            old = {}
        if old.get("cache_key") == key and (not cfg.safety_screen or "safety_screen" in old):
            try:
                train, validation = load_prepared(out_dir)
            except Exception as e:  # noqa: BLE001 - a damaged folder is simply prepared again
                console.print(f"{out_dir}: stats.json matches but the data cannot be loaded ({e}); preparing again")
            else:
                shown_stats = {**old, "reused": True, "out_dir": str(out_dir)}
                _print_summary(shown_stats, console, cfg.max_errors_shown)
                return PrepareResult(out_dir, train, validation, shown_stats, reused=True)

    if recipe.task == "preference":  # pairs: phi3local.data.preference reads, encodes and counts them
        from phi3local.data.preference import prepare_pairs

        stats, train_ds, validation_ds = prepare_pairs(files, inputs, key, recipe, tokenizer, console)
        return _publish(out_dir, stats, train_ds, validation_ds, started, console, cfg.max_errors_shown)

    results = {name: process_file(path, shown, recipe, tokenizer) for name, (path, shown) in files.items()}
    split = split_results(results, cfg, clean.example_key)

    def summary(rows):
        return length_summary([len(enc.input_ids) for _, _, enc in rows], [enc.n_trained for _, _, enc in rows])

    stats = prepare_stats(recipe, key, inputs, results, split, summary, lambda enc: len(enc.input_ids))
    if cfg.safety_screen:  # opt-in; the rules and the report live in phi3local.safety.screen
        from phi3local.safety.screen import screen_examples, screen_lines

        stats["safety_screen"] = screen_examples(ex for r in results.values() for ex, _ in r.rows)
        for line in screen_lines(stats["safety_screen"], cfg.max_errors_shown):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if recipe.task == "classification":
        names = list(recipe.model.labels)

        def label_counts(rows):
            counts = {n: 0 for n in names}
            for _, _, enc in rows:
                counts[names[enc.label]] += 1
            return counts

        stats["labels"] = {"names": names, "train": label_counts(split.train),
                           "validation": label_counts(split.validation)}
    return _publish(out_dir, stats, _to_dataset(split.train, recipe.task), _to_dataset(split.validation, recipe.task),
                    started, console, cfg.max_errors_shown)


def _print_summary(stats: dict[str, Any], console, max_rows_shown: int) -> None:
    print_summary(stats, console, max_rows_shown)
    if stats.get("task") == "preference":
        from phi3local.data.preference import print_preference_summary

        print_preference_summary(stats, console)


def _publish(out_dir: Path, stats: dict[str, Any], train_ds, validation_ds, started: float, console,
             max_rows_shown: int) -> PrepareResult:
    """Write the two splits and stats.json under a temporary name, rename into place, print the summary."""
    import datasets

    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        # overwrite=True: replaces an earlier prepare output only (check_output_dir refuses anything else).
        with folders.staged(out_dir, "prepare", overwrite=True) as tmp:
            _save(train_ds, tmp / "train")
            _save(validation_ds, tmp / "validation")
            stats["seconds"] = round(time.time() - started, 2)
            # backslashreplace: a file name that is not UTF-8 (decoded by Python into surrogates) must not crash.
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n",
                                            encoding="utf-8", errors="backslashreplace")
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    train, validation = load_prepared(out_dir)
    shown_stats = {**stats, "reused": False, "out_dir": str(out_dir)}
    _print_summary(shown_stats, console, max_rows_shown)
    return PrepareResult(out_dir, train, validation, shown_stats, reused=False)


__all__ = [
    "PIPELINE_VERSION",
    "FileResult",
    "PrepareResult",
    "Split",
    "cache_key",
    "check_max_seq_len",
    "check_system_prompt",
    "demo_file",
    "encode_example",
    "encode_rows",
    "features",
    "file_digest",
    "input_digest",
    "load_prepared",
    "prepare",
    "prepare_stats",
    "process_file",
    "read_stats",
    "resolve_data_path",
    "split_indices",
    "split_results",
    "tokenizer_fingerprint",
]
