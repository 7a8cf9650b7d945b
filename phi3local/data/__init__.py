"""The `prepare` stage: user data -> validated, cleaned, tokenised train/validation sets.

Modules, one job each:
- `records`: the value types (Location, Conversation, TextExample, RowProblem, DataError, FormatError).
- `formats`: readers (JSONL/JSON, CSV, Parquet, save_to_disk folders), format detection, conversion.
- `validate`: the row rules; `on_error` fail/skip.
- `clean`: whitespace normalisation, system prompt, de-duplication, token-length filters.
- `template`: chat-template encoding with the assistant-only loss mask, truncation by whole turns.
- `report`: percentiles, histogram, the rich summary.
- `prepare`: the stage itself (`prepare`, `load_prepared`), caching and atomic output.
- `demo`: the embedded demo data generator.
"""
