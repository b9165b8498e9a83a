"""Reading a local data file as rows: .json (a list of rows, or an object wrapping one), .jsonl / .ndjson (a JSON
list named so is read too), .parquet, .csv. Rows are numbered from 1 (line numbers for JSON Lines); a file that
cannot be read as its suffix says raises FormatError, a row that is not a JSON object RowError.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import json
import sys
from pathlib import Path
from typing import Iterator

from pipeline.data.formats import FormatError, RowError


_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv")
# A JSON object whose only list is under one of these keys is one row, not a wrapper around the rows.
_ROW_LIST_KEYS = {"conversations", "messages", "chosen", "rejected", "prompt", "history"}


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number, row) for each row of a local .json, .jsonl/.ndjson, .parquet or .csv file; numbers are 1-based
    (line numbers for JSON Lines). Raises FormatError for a file that cannot be read as its suffix says, RowError
    for a JSON Lines line that is not a JSON object."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise FormatError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; "
                          f"expected one of {', '.join(_SUFFIXES)}")
    if not path.is_file():
        raise FormatError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return _read_csv(path)


def head_rows(path: Path, n: int) -> list[dict]:
    """The first `n` rows of a file, as `read_rows` reads them, without parsing all of a large JSON list (for
    recognising a format when a recipe loads). Raises what `read_rows` raises."""
    import itertools

    path = Path(path)
    if path.suffix.lower() == ".json" and path.is_file():
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            head = f.read(1 << 20)
        text = head.lstrip()
        if text.startswith("[") and len(head) == 1 << 20:  # a large list: decode its first items only
            rows, pos, decoder = [], 1, json.JSONDecoder()
            while len(rows) < n:
                while pos < len(text) and text[pos] in " \t\r\n,":
                    pos += 1
                try:
                    row, pos = decoder.raw_decode(text, pos)
                except ValueError:
                    break
                rows.append(row)
            if rows and all(isinstance(r, dict) for r in rows):
                return rows
    return [row for _, row in itertools.islice(read_rows(path), n)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def _json_rows(path: Path, data) -> Iterator[tuple[int, dict]]:
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if not lists or any(k in _ROW_LIST_KEYS for k in lists):
            yield 1, data
            return
        if len(lists) > 1:
            raise FormatError(f"{path}: a JSON object with several lists of rows ({', '.join(lists)}); "
                              f"expected a list of rows")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a JSON list of rows, found a JSON {type(data).__name__}")
    for n, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise RowError(path, n, "row", f"a JSON object, not {_json_type(row)}")
        yield n, row


def _json_type(value) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines named .json
            yield from _jsonl_lines(path, text.split("\n"))  # not splitlines: U+2028 may sit inside a string
            return
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    yield from _json_rows(path, data)


def _jsonl_lines(path: Path, lines) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RowError(path, n, "row", f"not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(row, dict):
            raise RowError(path, n, "row", f"a JSON object, not {_json_type(row)}")
        yield n, row


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            head = f.read(4096)
            if head.lstrip().startswith("["):  # a JSON list named .jsonl
                yield from _json_rows(path, _loads_whole(path, head + f.read()))
                return
            f.seek(0)
            yield from _jsonl_lines(path, f)
        except UnicodeDecodeError:
            raise FormatError(f"{path}: not UTF-8 text") from None


def _loads_whole(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _plain(value):
    """Arrow scalars as plain, JSON-serialisable Python."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).hex()
    return value


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=1024)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise FormatError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    n = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise FormatError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
        for row in batch.to_pylist(maps_as_pydicts="lossy"):
            n += 1
            yield n, _plain(row)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers exceed csv's default 128 KiB per field
    try:
        with f:
            reader = csv.DictReader(f)
            n = 0
            try:
                for row in reader:
                    n += 1
                    if None in row:
                        raise RowError(path, n, "row", f"{len(reader.fieldnames)} fields, as in the header")
                    yield n, row
            except UnicodeDecodeError:
                raise FormatError(f"{path}: not UTF-8 text") from None
            except csv.Error as e:
                raise FormatError(f"{path}: not valid CSV near line {reader.line_num} ({e})") from None
    finally:
        csv.field_size_limit(limit)
