"""Read documents from text, JSONL (plain or gzip), CSV, Parquet or a `datasets` name.

Every reader streams: memory does not grow with corpus size. Errors name the file and line. One rule
for every format: empty (or all-blank) texts are skipped; a null or a non-text value is a bad row
(CSV has no null: its empty cell is an empty text).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class DataError(ValueError):
    """Unusable input data; the message names the file and, where there is one, the line."""


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files and globs to a sorted, de-duplicated list; `hf:` names pass through unchanged."""
    if not patterns:
        raise DataError("no input files given")
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith("hf:"):
            out.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise DataError(f"{pattern}: no file matches this pattern")
        for match in matches:
            if Path(match).is_dir():
                raise DataError(f"{match}: a folder, not a file; name its files (e.g. {match.rstrip('/')}/*.jsonl)")
            if not Path(match).is_file():
                raise DataError(f"{match}: no such file")
            if match not in out:
                out.append(match)
    return out


def detect_format(path: str) -> str:
    if path.startswith("hf:"):
        return "hf"
    name = path.lower().removesuffix(".gz")
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return fmt
    return "text"


def _open_text(path: str) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):  # noqa: B007
                yield lineno, raw
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}:{lineno + 1}: cannot read ({exc})") from None


def _decode(path: str, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs, decoded line by line so that an error names the right line."""
    for lineno, raw in _raw_lines(path):
        yield lineno, _decode(path, lineno, raw)


def parse_jsonl_object(path: str, lineno: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def text_field(path: str, lineno: int, row: dict, column: str) -> str:
    if column not in row:
        raise DataError(f"{path}:{lineno}: no column '{column}' (columns: {', '.join(row)})")
    value = row[column]
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        # a conversation (role/content or ShareGPT from/value turns) as text: its turns, a line each, so a
        # tokenizer or a corpus can be made from chat data as it is
        turns = [t.get("content", t.get("value")) for t in value]
        if all(isinstance(t, str) for t in turns):
            return "\n".join(turns)
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: column '{column}' is {type(value).__name__}, not text")
    return value


def parse_jsonl_line(path: str, lineno: int, line: str, column: str) -> str:
    return text_field(path, lineno, parse_jsonl_object(path, lineno, line), column)


def read_jsonl(path: str, column: str) -> Iterator[str]:
    for lineno, line in _lines(path):
        if line.strip():
            yield parse_jsonl_line(path, lineno, line, column)


def scan_jsonl_rows(path: str, max_rows: int | None = None) -> Iterator[tuple[int, dict] | DataError]:
    """Every non-empty line as (line number, object), or as its error; the scan goes on past bad
    lines so that a check can list them all (only a file that cannot be read any further ends it)."""
    lines = _raw_lines(path)
    while True:
        try:
            lineno, raw = next(lines)
        except StopIteration:
            return
        except DataError as exc:  # the file itself is unreadable past this point
            yield exc
            return
        if max_rows is not None and lineno > max_rows:
            return
        try:
            line = _decode(path, lineno, raw)
            if line.strip():
                yield lineno, parse_jsonl_object(path, lineno, line)
        except DataError as exc:
            yield exc


# Python's csv module stops at a field over 131,072 characters (a real e-mail has more), and every row
# after it would be lost: lmforge reads fields of any length.
csv.field_size_limit(2**31 - 1)


def scan_csv_rows(path: str, max_rows: int | None = None) -> Iterator[tuple[int, dict] | DataError]:
    """Every CSV record (after the header) as (line number, {column: text}), or as the error that ends the file."""
    try:
        with _open_text(path) as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:  # reads the header: an empty file has no rows
                return
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                if max_rows is not None and start > max_rows:
                    return
                if None in row:  # more fields than the header names
                    yield DataError(f"{path}:{start}: {len(reader.fieldnames or [])} columns in the header, more in this row")
                    continue
                yield start, {k: v or "" for k, v in row.items()}
    except UnicodeDecodeError as exc:
        yield DataError(f"{path}: not valid UTF-8 ({exc.reason})")
    except csv.Error as exc:
        yield DataError(f"{path}: malformed CSV ({exc})")
    except OSError as exc:
        yield DataError(f"{path}: cannot read ({exc})")


def read_all(items: Iterable[T | DataError]) -> list[T]:
    """Every item of a scan (parse_rows and the readers built on it), raising the first bad row's error."""
    out: list[T] = []
    for item in items:
        if isinstance(item, DataError):
            raise item
        out.append(item)
    return out


def parse_rows(files: list[str], parse: Callable[[str, int, dict], T], max_rows: int | None = None) -> Iterator[T | DataError]:
    """`parse(path, line number, row)` of every row of `files` (JSONL, CSV or Parquet); a row that cannot be
    read or that `parse` refuses is yielded as its DataError, and the scan goes on (a check lists them all)."""
    for path in expand_inputs(files):
        rows = _ROW_SCANNERS.get(detect_format(path), scan_jsonl_rows)(path, max_rows)
        for item in rows:
            if isinstance(item, DataError):
                yield item
                continue
            try:
                yield parse(path, *item)
            except DataError as exc:
                yield exc


def scan_jsonl(path: str, column: str, max_rows: int | None = None) -> Iterator[str | DataError]:
    """Like `read_jsonl`, but a bad row is yielded as its error and the scan goes on."""
    for item in scan_jsonl_rows(path, max_rows):
        if isinstance(item, DataError):
            yield item
            continue
        try:
            yield text_field(path, *item, column)
        except DataError as exc:
            yield exc


def read_text(path: str) -> Iterator[str]:
    """Plain text: the whole file is one document (a page of prose is not dozens of documents, and a
    held-out split by document never holds out paragraphs of a page that trains)."""
    text = "".join(line for _, line in _lines(path)).strip("\n")
    if text:
        yield text


def read_paragraphs(path: str) -> Iterator[str]:
    """Plain text, `data.format: paragraphs`: documents are separated by one or more blank lines."""
    buffer: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            buffer.append(line)
        elif buffer:
            yield "".join(buffer).strip("\n")
            buffer = []
    if buffer:
        yield "".join(buffer).strip("\n")


def read_csv(path: str, column: str) -> Iterator[str]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        try:
            if reader.fieldnames is None:
                return
            if column not in reader.fieldnames:
                raise DataError(f"{path}:1: no column '{column}' (columns: {', '.join(reader.fieldnames)})")
            for row in reader:
                yield row[column] or ""  # an empty document is skipped, as in JSONL and Parquet
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{reader.line_num + 1}: not valid UTF-8 ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def scan_parquet_rows(path: str, max_rows: int | None = None) -> Iterator[tuple[int, dict] | DataError]:
    """Every Parquet row as (row number from 1, {column: value}): the rows that JSONL and CSV give, so
    every row reader (labelled, instructions, preferences, pairs) takes Parquet too."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a broken file
        yield DataError(f"{path}: not a readable Parquet file ({exc})")
        return
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            if max_rows is not None and number > max_rows:
                return
            yield number, row


_ROW_SCANNERS = {"csv": scan_csv_rows, "parquet": scan_parquet_rows}


def read_parquet(path: str, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if column not in table.schema_arrow.names:
        raise DataError(f"{path}: no column '{column}' (columns: {', '.join(table.schema_arrow.names)})")
    import pyarrow as pa

    kind = table.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column '{column}' holds {kind}, not text")
    row = 0
    for batch in table.iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _document(f"{path}: row {row}", column, value)


def read_hf(name: str, column: str) -> Iterator[str]:
    """`hf:NAME[:CONFIG][@SPLIT]`, streamed through `datasets` (needs network or a local cache)."""
    from datasets import load_dataset

    spec = name.removeprefix("hf:")
    spec, _, split = spec.partition("@")
    dataset_name, _, config = spec.partition(":")
    ds = load_dataset(dataset_name, config or None, split=split or "train", streaming=True)
    for row in ds:
        if column not in row:
            raise DataError(f"{name}: no column '{column}' (columns: {', '.join(row)})")
        yield _document(name, column, row[column])


def _document(where: str, column: str, value: object) -> str:
    """One rule for every format: text is a document (empty ones are skipped later); null, or any
    other type, is a bad row named by file and row (JSONL's reader says the same)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{column}' is {type(value).__name__}, not text")
    return value


def read_documents(path: str, column: str = "text", fmt: str = "auto") -> Iterator[str]:
    """Stream the documents of one input, skipping empty ones."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {
        "jsonl": lambda: read_jsonl(path, column),
        "text": lambda: read_text(path),
        "paragraphs": lambda: read_paragraphs(path),
        "csv": lambda: read_csv(path, column),
        "parquet": lambda: read_parquet(path, column),
        "hf": lambda: read_hf(path, column),
    }
    if fmt not in readers:
        raise DataError(f"{path}: unknown format '{fmt}'")
    for doc in readers[fmt]():
        if doc and doc.strip():
            yield doc


def iter_corpus(files: list[str], column: str = "text", fmt: str = "auto", max_docs: int | None = None) -> Iterator[str]:
    count = 0
    for path in expand_inputs(files):
        for doc in read_documents(path, column, fmt):
            yield doc
            count += 1
            if max_docs is not None and count >= max_docs:
                return


def file_fingerprints(files: list[str | Path]) -> list[dict]:
    """Path, size and mtime of each input (a `datasets` name by its name): cheap, and it changes whenever
    a file is rewritten. The one fingerprint of input files for corpora, tokenizers and train keys."""
    out = []
    for path in map(str, files):
        if path.startswith("hf:"):
            out.append({"path": path})
        else:
            stat = os.stat(path)
            out.append({"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out
