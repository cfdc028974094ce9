"""Read raw records from a local file, the shipped default dataset, or a Hugging Face dataset.

Sources (a ``path`` string):

- ``x.jsonl``: one JSON object per line (blank lines are ignored); records are named ``x.jsonl line N``.
- ``x.json``: a JSON array of objects, or an object with exactly one list value (``{"data": [...]}``);
  records are named ``x.json item N``.
- ``x.csv``: a header row then one record per row; every value is a string; records are named
  ``x.csv row N`` where row 1 is the first row after the header.
- ``x.parquet``: read with pyarrow; records are named ``x.parquet row N``.
- ``hf:NAME`` / ``hf:NAME:CONFIG``: ``datasets.load_dataset(NAME, CONFIG, split=split)``; NAME is a hub id
  or a local dataset folder/script; records are named ``hf:NAME[split] row N``.
- ``default`` / ``default:eval``: the dataset shipped with the package (train.jsonl / eval.jsonl).

All numbers N are 1-based.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf.data.errors import DataError, SkipReport, short_repr
from rlhf.paths import DEFAULT_DATA_DIR

SUPPORTED = (".json", ".jsonl", ".csv", ".parquet")
SUPPORTED_TEXT = "local .json, .jsonl, .csv, .parquet files, hf:NAME[:CONFIG], default, default:eval"


@dataclass(frozen=True)
class Record:
    """One raw record: its fields as read, and where it came from (``data/x.jsonl line 7``)."""

    fields: dict[str, Any]
    where: str


def resolve_path(path: str) -> str:
    """``default`` and ``default:eval`` -> the shipped files; anything else unchanged."""
    if path == "default":
        return str(DEFAULT_DATA_DIR / "train.jsonl")
    if path == "default:eval":
        return str(DEFAULT_DATA_DIR / "eval.jsonl")
    return path


def parse_hf(path: str) -> tuple[str, str | None]:
    """``hf:NAME`` -> (NAME, None); ``hf:NAME:CONFIG`` -> (NAME, CONFIG)."""
    name, _, config = path[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"{path}: expected hf:NAME or hf:NAME:CONFIG, e.g. hf:Dahoas/rm-static")
    return name, config or None


def read_records(
    path: str,
    *,
    split: str = "train",
    columns: dict[str, str] | None = None,
    max_records: int | None = None,
    skipped: SkipReport | None = None,
) -> list[Record]:
    """Read records from ``path`` (see the module docstring for the sources).

    ``columns`` renames source columns to ours (``{our_name: source_name}``). ``max_records`` stops after
    that many records. Malformed JSON lines, lines that are not objects and records missing a mapped
    column raise :class:`DataError`, unless ``skipped`` is given: then they are counted there (its
    ``total`` grows by every record looked at) and left out. An empty source is always an error.
    """
    if max_records is not None and max_records <= 0:
        raise ValueError(f"max_records must be positive, got {max_records}")
    columns = dict(columns or {})
    if path.startswith("hf:"):
        rows = _read_hf(path, split)
    else:
        resolved = resolve_path(path)
        file = Path(resolved)
        suffix = file.suffix.lower()
        if suffix not in SUPPORTED:
            raise DataError(
                f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {SUPPORTED_TEXT}"
            )
        if not file.is_file():
            hint = " (the shipped default dataset is missing from the package)" if resolved != path else ""
            raise DataError(f"{resolved}: file not found{hint}")
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        rows = reader[suffix](file)

    records: list[Record] = []
    seen = 0
    for where, fields in rows:
        seen += 1
        try:
            if isinstance(fields, DataError):
                raise fields
            records.append(Record(_rename(fields, columns, where), where))
        except DataError as exc:
            if skipped is None:
                raise
            skipped.skip(exc.reason, where)
        if max_records is not None and len(records) >= max_records:
            break
    if skipped is not None:
        skipped.total += seen
    if seen == 0:
        shown = path if path.startswith("hf:") else resolve_path(path)
        raise DataError(f"{shown}: no records (the source is empty)")
    if not records:
        assert skipped is not None  # without a report the first bad record raised
        raise DataError(f"{resolve_path(path)}: every record was invalid: {skipped.summary()} ({skipped.locations()})")
    return records


def _rename(fields: dict[str, Any], columns: dict[str, str], where: str) -> dict[str, Any]:
    """Apply ``{our_name: source_name}``; all sources are taken out before any is put back, so swaps work."""
    if not columns:
        return fields
    missing = [source for source in columns.values() if source not in fields]
    if missing:
        mapped = next(ours for ours, source in columns.items() if source == missing[0])
        raise DataError(
            f"{where}: field '{missing[0]}' (mapped to '{mapped}' by columns): missing; "
            f"the record has fields: {', '.join(map(str, fields)) or '(none)'}",
            reason=f"missing column '{missing[0]}'",
        )
    out = dict(fields)
    values = {ours: out.pop(source) for ours, source in columns.items()}
    out.update(values)
    return out


# Readers yield (where, fields) or (where, DataError) for a bad record, so the caller decides whether
# to fail or to count a skip. Errors that spoil the whole file raise at once.

Rows = Iterator[tuple[str, "dict[str, Any] | DataError"]]


def _read_jsonl(file: Path) -> Rows:
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{file} line {number}"
            try:
                # utf-8-sig drops a byte-order mark some editors put at the start of the file.
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield where, DataError(f"{where}: not UTF-8 text ({exc.reason})", reason="not UTF-8")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield where, DataError(
                    f"{where}: not valid JSON: {exc.msg} at column {exc.colno}", reason="malformed JSON"
                )
                continue
            if not isinstance(value, dict):
                yield where, DataError(
                    f"{where}: expected a JSON object like {{\"prompt\": ..., \"response\": ...}}, "
                    f"got {type(value).__name__} {short_repr(value)}",
                    reason="not a JSON object",
                )
                continue
            yield where, value


def _read_json(file: Path) -> Rows:
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} line {exc.lineno}: not valid JSON: {exc.msg} at column {exc.colno}") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{file}: expected a JSON array of objects, or an object with exactly one list value; "
                f"got an object with {len(lists)} list values (keys: {', '.join(data) or '(none)'})"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON array of objects, got {type(data).__name__}")
    for number, value in enumerate(data, start=1):
        where = f"{file} item {number}"
        if not isinstance(value, dict):
            yield where, DataError(
                f"{where}: expected a JSON object, got {type(value).__name__} {short_repr(value)}",
                reason="not a JSON object",
            )
            continue
        yield where, value


def _read_csv(file: Path) -> Rows:
    # The csv module's default field limit (128 KiB) would reject long records with an obscure error;
    # length is checked later against max_record_chars with a clear one.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{file} line {line}: unreadable CSV: not UTF-8 text ({exc.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        for number, row in enumerate(reader, start=1):
            where = f"{file} row {number}"
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                yield where, DataError(
                    f"{where}: has {len(row)} values, the header has {len(header)} ({', '.join(header)})",
                    reason="wrong number of CSV values",
                )
                continue
            yield where, dict(zip(header, row))
    except csv.Error as exc:
        raise DataError(f"{file} line {reader.line_num}: unreadable CSV: {exc}") from None


def _read_parquet(file: Path) -> Rows:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    try:
        # to_pylist gives plain Python values (lists, dicts, None) rather than numpy objects.
        rows = pq.read_table(file).to_pylist()
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise DataError(f"{file}: unreadable Parquet: {exc}") from None
    for number, value in enumerate(rows, start=1):
        yield f"{file} row {number}", value


def _read_hf(path: str, split: str) -> Rows:
    import datasets  # the Hugging Face library (absolute import); slow to import, so only when needed

    name, config = parse_hf(path)
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # hub, network, script and split errors all arrive as different types
        raise DataError(f"{path}: could not load split '{split}' with datasets.load_dataset: {exc}") from None
    for number, value in enumerate(dataset, start=1):
        yield f"{path}[{split}] row {number}", dict(value)
