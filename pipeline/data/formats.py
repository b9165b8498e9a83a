"""Instruction and preference data formats: read a local file, recognise its format, convert rows to canonical records.

Canonical records (JSON-serialisable):

- SFT (alpaca, sharegpt, dolly, messages): ``{"messages": [{"role", "content"}, ...]}`` -- an optional system message
  first, then user/assistant turns alternating (tool results allowed after an assistant turn), ending with an
  assistant message; plus ``"category"`` when the source has one (Dolly).
- preference (preference, alpaca_ranking, sharegpt_ranking, orca_dpo): TRL's conversational preference form,
  ``{"prompt": [..., user turn], "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``.

A bad row raises :class:`BadRow` (field, expected); the caller prefixes ``<file>:<row>: ``. Field names in errors are
the file's own column names (after the ``columns`` mapping), so they can be found in the file.

Only the standard library is imported here; pyarrow is imported when a Parquet file is read.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import functools
import json
import sys
from pathlib import Path
from typing import Iterator

from pipeline.errors import TunebuildError, did_you_mean

FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "dolly", "messages", "preference", "alpaca_ranking",
                            "sharegpt_ranking", "orca_dpo")
SFT_FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "dolly", "messages")
PREFERENCE_FORMATS: tuple[str, ...] = ("preference", "alpaca_ranking", "sharegpt_ranking", "orca_dpo")


def kind_of_format(fmt: str) -> str:
    """'sft' or 'preference': the kind of canonical record a format becomes."""
    return "preference" if fmt in PREFERENCE_FORMATS else "sft"


class BadRow(Exception):
    """One row that cannot be converted: `field` (dotted, e.g. ``conversations[2].from``) and what was `expected`."""

    def __init__(self, field: str, expected: str):
        super().__init__(f"{field}: {expected}")
        self.field = field
        self.expected = expected


class FormatError(TunebuildError):
    """A whole-file problem: unreadable file, unknown or ambiguous format, bad `columns`. The message is one line."""


class RowError(TunebuildError):
    """A row that could not even be read (a JSON Lines line that is not a JSON object)."""

    def __init__(self, path, row: int, field: str, expected: str):
        super().__init__(f"{path}:{row}: {field}: {expected}")
        self.path = path
        self.row = row
        self.field = field
        self.expected = expected


# ---------------------------------------------------------------------------------------------------------------
# columns: canonical field name -> the file's column name (LLaMA-Factory's dataset_info.json "columns" + "tags")

TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag", "function_tag")

_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system"),
    "dolly": ("instruction", "context", "response", "category"),
    "messages": ("conversations", "system"),
    "preference": ("prompt", "chosen", "rejected"),
    "alpaca_ranking": ("instruction", "input", "chosen", "rejected", "system", "history"),
    "sharegpt_ranking": ("conversations", "system", "chosen", "rejected"),
    "orca_dpo": ("system", "question", "chosen", "rejected"),
}
# Other accepted names for a field (LLaMA-Factory's): alias -> field.
_ALIASES: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "alpaca_ranking": {"prompt": "instruction", "query": "input"},
    "sharegpt": {"messages": "conversations"},
    "messages": {"messages": "conversations"},
    "sharegpt_ranking": {"messages": "conversations"},
}
_HAS_TAGS = ("sharegpt", "messages", "sharegpt_ranking")


def _known_keys(fmt: str) -> tuple[str, ...]:
    keys = list(_FIELDS[fmt]) + list(_ALIASES.get(fmt, {}))
    if fmt in _HAS_TAGS:
        keys += TAG_KEYS
    return tuple(keys)


def check_columns(fmt: str, columns: dict | None) -> None:
    """Raise FormatError when `columns` has a key `fmt` does not know, a value that is not a column name, or two
    names for one field."""
    if fmt not in FORMATS and fmt != "auto":
        raise FormatError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not columns:
        return
    if not isinstance(columns, dict):
        raise FormatError(f"columns must be a table of field = column name, not {type(columns).__name__}")
    if fmt == "auto":  # each key must be known to some format; detection picks the one that fits
        known = sorted({k for f in FORMATS for k in _known_keys(f)})
        for key, value in columns.items():
            if key not in known:
                raise FormatError(f"columns: unknown key {key!r}{did_you_mean(key, known)}; known: {', '.join(known)}")
            if not isinstance(value, str) or not value.strip():
                raise FormatError(f"columns.{key}: expected a column name (a non-empty string), got {value!r}")
        return
    known = _known_keys(fmt)
    aliases = _ALIASES.get(fmt, {})
    seen: dict[str, str] = {}
    for key, value in columns.items():
        if key not in known:
            raise FormatError(f"columns: unknown key {key!r} for format {fmt}{did_you_mean(key, known)}; "
                              f"known: {', '.join(known)}")
        if not isinstance(value, str) or not value.strip():
            raise FormatError(f"columns.{key}: expected a column name (a non-empty string), got {value!r}")
        field = aliases.get(key, key)
        if field in seen:
            raise FormatError(f"columns: {seen[field]!r} and {key!r} both name the {field} column; keep one")
        seen[field] = key


@functools.lru_cache(maxsize=256)
def _resolve_cached(fmt: str, items: tuple) -> tuple[dict, dict]:
    columns = dict(items)
    check_columns(fmt, columns)
    aliases = _ALIASES.get(fmt, {})
    names: dict[str, str] = {}
    tags: dict[str, str] = {}
    for key, value in columns.items():
        if key in TAG_KEYS:
            tags[key] = value
        else:
            names[aliases.get(key, key)] = value
    return names, tags


def _resolve(fmt: str, columns: dict | None) -> tuple[dict, dict]:
    """(field -> column name for the fields `columns` renames, tags). Fields not renamed keep their own name."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not columns:
        return {}, {}
    if not isinstance(columns, dict):
        check_columns(fmt, columns)
    try:
        return _resolve_cached(fmt, tuple(sorted(columns.items(), key=lambda kv: str(kv[0]))))
    except TypeError:  # unhashable values: let check_columns say what is wrong
        check_columns(fmt, columns)
        raise


# ---------------------------------------------------------------------------------------------------------------
# reading files

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


# ---------------------------------------------------------------------------------------------------------------
# detection


def _as_list(value):
    """A list, or a list stored as a JSON string (CSV and some Parquet exports); anything else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, list):
            return parsed
    return value


def _conv_column(row: dict, fmt: str, names: dict) -> str:
    """The column holding the turns: as renamed, else the format's own name if present, else the other one."""
    if "conversations" in names:
        return names["conversations"]
    first, second = ("messages", "conversations") if fmt == "messages" else ("conversations", "messages")
    return first if first in row or second not in row else second


def _turn_shape(turns, tags: dict) -> str | None:
    """'sharegpt' (from/value items), 'messages' (role/content items) or None."""
    turns = _as_list(turns)
    if not isinstance(turns, list):
        return None
    item = next((t for t in turns if isinstance(t, dict)), None)
    if item is None:
        return None
    if tags.get("role_tag") or tags.get("content_tag"):
        rk, ck = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        if rk in item and ck in item:
            return "messages" if (rk, ck) == ("role", "content") else "sharegpt"
        return None
    if "from" in item and "value" in item:
        return "sharegpt"
    if "role" in item and "content" in item:
        return "messages"
    return None


def _fits(row: dict, fmt: str, names: dict, tags: dict) -> bool:
    def has(field):
        return names.get(field, field) in row

    pair = has("chosen") and has("rejected")
    if fmt in ("sharegpt", "messages", "sharegpt_ranking"):
        col = _conv_column(row, fmt, names)
        if col not in row:
            return False
        if fmt == "sharegpt_ranking":
            # prompt + chosen/rejected message lists + a messages copy (HuggingFaceH4/ultrafeedback_binarized) is TRL's
            # preference form; the ranking form's answers are single turns
            trl = has("prompt") and isinstance(_as_list(row.get(names.get("chosen", "chosen"))), list)
            return pair and not trl and isinstance(_as_list(row[col]), list)
        return not pair and _turn_shape(row[col], tags) == fmt
    if fmt == "orca_dpo":
        return pair and has("question")
    if fmt == "alpaca_ranking":  # LLaMA-Factory's alpaca form with ranking: true
        return pair and isinstance(row.get(names.get("instruction", "instruction")), str) \
            and not any(isinstance(_as_list(row.get(names.get(f, f))), list) for f in ("chosen", "rejected"))
    if fmt == "preference":
        others = has("question") or _conv_column(row, fmt, {}) in row or "instruction" in row
        return pair and (has("prompt") or not others)
    if fmt == "dolly":
        return has("instruction") and has("context") and has("response")
    if fmt == "alpaca":
        return has("instruction") and has("output")
    raise AssertionError(fmt)


def detect(rows: list[dict], columns: dict[str, str] | None = None) -> str:
    """The format of `rows` (the first rows of a file), one of FORMATS; FormatError when none or several fit."""
    if columns is not None and not isinstance(columns, dict):
        raise FormatError(f"columns must be a table of field = column name, not {type(columns).__name__}")
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        raise FormatError("cannot recognise the format: no rows")
    candidates = []
    errors = []
    for fmt in FORMATS:
        try:
            candidates.append((fmt, *_resolve(fmt, columns)))
        except FormatError as e:
            errors.append(e)
    if not candidates:
        known = sorted({k for f in FORMATS for k in _known_keys(f)})
        bad = [k for k in columns if not any(k in _known_keys(f) for f in FORMATS)]
        if bad:
            raise FormatError(f"columns: unknown key {bad[0]!r}; known: {', '.join(known)}")
        raise errors[0]
    found: list[str] = []
    for row in rows:
        fits = [fmt for fmt, names, tags in candidates if _fits(row, fmt, names, tags)]
        if {"preference", "alpaca_ranking"} <= set(fits) and columns and "prompt" in columns:
            fits.remove("preference")  # both read the prompt from that column; alpaca_ranking also folds input
        if len(fits) > 1:
            raise FormatError(f"ambiguous: the rows fit both {fits[0]} and {fits[1]}; set format")
        if fits and fits[0] not in found:
            found.append(fits[0])
    if len(found) > 1:
        found.sort(key=FORMATS.index)
        raise FormatError(f"ambiguous: the rows fit both {found[0]} and {found[1]}; set format")
    if found:
        return found[0]
    keys: list[str] = []
    for row in rows:
        keys += [str(k) for k in row if str(k) not in keys]
    hint = ""
    for col in ("conversations", "messages"):
        turns = _as_list(rows[0].get(col))
        if isinstance(turns, list):
            item = next((t for t in turns if isinstance(t, dict)), None)
            if item is not None:
                hint = f" ({col} items have keys: {', '.join(map(str, item)) or 'none'})"
            break
    shown = ", ".join(keys[:30]) + (", ..." if len(keys) > 30 else "")
    raise FormatError(f"cannot recognise the format: keys seen: {shown or 'none'}{hint}; "
                      f"set format = one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------------------------
# conversion

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant", "function_call": "assistant",
    "system": "system",
    "function": "tool", "observation": "tool", "tool": "tool",
}
_MESSAGES_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                   "tool": "tool", "function": "tool"}
_TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system",
              "observation_tag": "tool", "function_tag": "assistant"}


class _Dialect:
    """How one format spells turns: item keys, role names, and the names used in error messages."""

    def __init__(self, fmt: str, tags: dict):
        sharegpt = fmt != "messages" and not (tags.get("role_tag") == "role" and tags.get("content_tag") == "content")
        self.role_key = tags.get("role_tag")
        self.content_key = tags.get("content_tag")
        self.roles = dict(_SHAREGPT_ROLES if fmt != "messages" else _MESSAGES_ROLES)
        for tag, role in _TAG_ROLES.items():
            if tags.get(tag):
                self.roles[tags[tag]] = role
        if sharegpt:
            self.labels = {"user": tags.get("user_tag", "human"), "assistant": tags.get("assistant_tag", "gpt"),
                           "tool": tags.get("observation_tag", "observation")}
            self.keys = (self.role_key or "from", self.content_key or "value")
        else:
            self.labels = {"user": tags.get("user_tag", "user"), "assistant": tags.get("assistant_tag", "assistant"),
                           "tool": tags.get("observation_tag", "tool")}
            self.keys = (self.role_key or "role", self.content_key or "content")
        self.role_list = ", ".join(self.roles)

    def item_keys(self, item: dict) -> tuple[str, str]:
        rk = self.role_key or ("from" if "from" in item else "role" if "role" in item else self.keys[0])
        ck = self.content_key or ("value" if "value" in item else "content" if "content" in item else self.keys[1])
        return rk, ck


_PREFERENCE_DIALECT_ROLES = {**_SHAREGPT_ROLES, **_MESSAGES_ROLES}


def _text(value, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRow(field, "a non-empty string")
    return value


def _optional_text(value, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRow(field, "a string (or nothing)")
    return value if value.strip() else None


def _read_turns(value, col: str, dialect: _Dialect) -> list[tuple[int, str, str, str]]:
    """(index, role, content, role key) for each item of a turn list, each validated."""
    turns = _as_list(value)
    if not isinstance(turns, list) or not turns:
        raise BadRow(col, "a non-empty list of turns")
    out = []
    for i, item in enumerate(turns):
        if not isinstance(item, dict):
            raise BadRow(f"{col}[{i}]", f"an object with {dialect.keys[0]} and {dialect.keys[1]}")
        rk, ck = dialect.item_keys(item)
        if rk not in item:
            raise BadRow(f"{col}[{i}]", f"an object with {rk} and {ck}")
        name = item[rk]
        role = dialect.roles.get(name) if isinstance(name, str) else None
        if role is None and isinstance(name, str):
            role = dialect.roles.get(name.strip().lower())
        if role is None:
            raise BadRow(f"{col}[{i}].{rk}", f"one of {dialect.role_list}")
        out.append((i, role, _text(item.get(ck), f"{col}[{i}].{ck}"), rk))
    return out


def _a(word: str) -> str:
    """`word` with its indefinite article."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _sequence(turns, col: str, dialect: _Dialect, system: str | None, system_col: str,
              end: str) -> list[dict]:
    """Validate turn order and build messages. `end` 'assistant' (SFT: drop trailing non-assistant turns) or
    'user' (a preference prompt: must end with a user turn). Leading assistant/tool turns are dropped."""
    lab = dialect.labels
    msgs: list[dict] = []
    rest = list(turns)
    if rest and rest[0][1] == "system":
        i, _, content, rk = rest.pop(0)
        if system is not None and system != content:
            raise BadRow(system_col, "either a system column or a system turn, not both")
        system = content
    if system is not None:
        msgs.append({"role": "system", "content": system})
    while rest and rest[0][1] in ("assistant", "tool"):
        rest.pop(0)
    prev = None
    body = []
    for i, role, content, rk in rest:
        where = f"{col}[{i}].{rk}"
        if role == "system":
            raise BadRow(where, "a system turn only as the first turn")
        if role == "user" and prev == "user":
            raise BadRow(where, f"{_a(lab['assistant'])} turn (turns must alternate {lab['user']}, {lab['assistant']})")
        if role == "user" and prev == "tool":
            raise BadRow(where, f"{_a(lab['assistant'])} turn after {_a(lab['tool'])} turn")
        if role == "assistant" and prev == "assistant":
            raise BadRow(where, f"{_a(lab['user'])} turn (turns must alternate {lab['user']}, {lab['assistant']})")
        if role == "tool" and prev == "user":
            raise BadRow(where, f"{_a(lab['assistant'])} turn before {_a(lab['tool'])} turn")
        body.append({"role": role, "content": content})
        prev = role
    if end == "assistant":
        while body and body[-1]["role"] != "assistant":
            body.pop()
        if not body:
            raise BadRow(col, f"at least one {lab['user']} turn followed by {_a(lab['assistant'])} turn")
    else:
        if not body or body[-1]["role"] != "user":
            raise BadRow(col, f"turns ending with {_a(lab['user'])} turn")
    return msgs + body


def _conversation(row: dict, fmt: str, names: dict, tags: dict, end: str) -> list[dict]:
    dialect = _Dialect(fmt, tags)
    col = _conv_column(row, fmt, names)
    if col not in row:
        raise BadRow(col, "a non-empty list of turns")
    system_col = names.get("system", "system")
    system = _optional_text(row.get(system_col), system_col)
    return _sequence(_read_turns(row[col], col, dialect), col, dialect, system, system_col, end)


def with_input(instruction: str, extra: str | None) -> str:
    """The user turn of an Alpaca row: the instruction, then its input after a blank line."""
    return instruction + ("\n\n" + extra if extra is not None else "")


def _alpaca_prompt(row: dict, col: dict) -> list[dict]:
    """system, history and the user turn (instruction + input) of an Alpaca row, as messages."""
    instruction = _text(row.get(col["instruction"]), col["instruction"])
    extra = _optional_text(row.get(col["input"]), col["input"])
    system = _optional_text(row.get(col["system"]), col["system"])
    msgs = [{"role": "system", "content": system}] if system is not None else []
    history = _as_list(row.get(col["history"]))
    if history is not None:
        if not isinstance(history, list):
            raise BadRow(col["history"], "a list of [user, assistant] pairs")
        for i, pair in enumerate(history):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(t, str) and t.strip() for t in pair)):
                raise BadRow(f"{col['history']}[{i}]", "a [user, assistant] pair of non-empty strings")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return msgs + [{"role": "user", "content": with_input(instruction, extra)}]


def _alpaca(row: dict, names: dict) -> dict:
    col = {f: names.get(f, f) for f in _FIELDS["alpaca"]}
    prompt = _alpaca_prompt(row, col)
    output = _text(row.get(col["output"]), col["output"])
    return {"messages": prompt + [{"role": "assistant", "content": output}]}


def _alpaca_ranking(row: dict, names: dict) -> dict:
    col = {f: names.get(f, f) for f in _FIELDS["alpaca_ranking"]}
    prompt = _alpaca_prompt(row, col)
    c, r = _pair(_text(row.get(col["chosen"]), col["chosen"]), _text(row.get(col["rejected"]), col["rejected"]),
                 col["rejected"])
    return {"prompt": prompt, "chosen": c, "rejected": r}


def _dolly(row: dict, names: dict) -> dict:
    col = {f: names.get(f, f) for f in _FIELDS["dolly"]}
    instruction = _text(row.get(col["instruction"]), col["instruction"])
    context = _optional_text(row.get(col["context"]), col["context"])
    response = _text(row.get(col["response"]), col["response"])
    category = _optional_text(row.get(col["category"]), col["category"])
    record = {"messages": [{"role": "user", "content": with_input(instruction, context)},
                           {"role": "assistant", "content": response}]}
    if category is not None:
        record["category"] = category
    return record


def _answer(value, field: str, dialect: _Dialect) -> str:
    """A ranking answer: a {from, value} object, a string, or a one-element list of either."""
    value = _as_list(value)
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRow(field, f"one {{{dialect.keys[0]}, {dialect.keys[1]}}} object or a string")
        value, field = value[0], f"{field}[0]"
    if isinstance(value, str):
        return _text(value, field)
    if not isinstance(value, dict):
        raise BadRow(field, f"a {{{dialect.keys[0]}, {dialect.keys[1]}}} object or a string")
    rk, ck = dialect.item_keys(value)
    if rk in value and dialect.roles.get(value[rk]) != "assistant":
        raise BadRow(f"{field}.{rk}", f"{dialect.labels['assistant']} (the answer's role)")
    return _text(value.get(ck), f"{field}.{ck}")


def _pair(chosen: str, rejected: str, rejected_col: str) -> tuple[list, list]:
    if chosen == rejected:
        raise BadRow(rejected_col, "an answer different from chosen")
    return [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]


def _ranking(row: dict, names: dict, tags: dict) -> dict:
    dialect = _Dialect("sharegpt_ranking", tags)
    prompt = _conversation(row, "sharegpt_ranking", names, tags, end="user")
    c_col, r_col = names.get("chosen", "chosen"), names.get("rejected", "rejected")
    chosen = _answer(row.get(c_col), c_col, dialect)
    rejected = _answer(row.get(r_col), r_col, dialect)
    c, r = _pair(chosen, rejected, r_col)
    return {"prompt": prompt, "chosen": c, "rejected": r}


def _orca(row: dict, names: dict) -> dict:
    col = {f: names.get(f, f) for f in _FIELDS["orca_dpo"]}
    system = _optional_text(row.get(col["system"]), col["system"])
    question = _text(row.get(col["question"]), col["question"])
    chosen = _text(row.get(col["chosen"]), col["chosen"])
    rejected = _text(row.get(col["rejected"]), col["rejected"])
    prompt = ([{"role": "system", "content": system}] if system is not None else [])
    prompt.append({"role": "user", "content": question})
    c, r = _pair(chosen, rejected, col["rejected"])
    return {"prompt": prompt, "chosen": c, "rejected": r}


def _message_list(value, field: str) -> list[dict]:
    dialect = _Dialect("preference", {})
    dialect.roles = dict(_PREFERENCE_DIALECT_ROLES)
    dialect.role_list = "system, user, assistant, tool"
    return [{"role": role, "content": content} for _, role, content, _ in _read_turns(value, field, dialect)]


def _side(value, field: str):
    """A preference field as a string or a list of messages."""
    value = _as_list(value)
    if isinstance(value, str):
        return _text(value, field)
    if isinstance(value, list) and value:
        return _message_list(value, field)
    raise BadRow(field, "a non-empty string or a list of messages")


def _check_prompt(prompt: list[dict], field: str) -> None:
    prev = None
    for i, m in enumerate(prompt):
        role = m["role"]
        if role == "system" and i > 0:
            raise BadRow(f"{field}[{i}]", "a system message only first")
        if role == prev and role in ("user", "assistant"):
            raise BadRow(f"{field}[{i}]", "user and assistant turns alternating")
        if i == (1 if prompt[0]["role"] == "system" else 0) and role != "user":
            raise BadRow(f"{field}[{i}]", "a user turn first (after an optional system message)")
        prev = role
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow(field, "messages ending with a user turn")


def _completion(side, prompt: list[dict], field: str) -> str:
    if isinstance(side, str):
        return side
    if side[:len(prompt)] == prompt:
        side = side[len(prompt):]
    if len(side) != 1 or side[0]["role"] != "assistant":
        raise BadRow(field, "one assistant message after the prompt")
    return side[0]["content"]


def _preference(row: dict, names: dict) -> dict:
    p_col, c_col, r_col = (names.get(f, f) for f in ("prompt", "chosen", "rejected"))
    chosen = _side(row.get(c_col), c_col)
    rejected = _side(row.get(r_col), r_col)
    raw_prompt = _as_list(row.get(p_col))
    if raw_prompt is None:  # implicit prompt: the common start of chosen and rejected
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise BadRow(p_col, "a prompt (or chosen and rejected as whole conversations)")
        if chosen == rejected:
            raise BadRow(r_col, "an answer different from chosen")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
        if not prompt or prompt[-1]["role"] != "user":
            raise BadRow(p_col, "chosen and rejected sharing a prompt that ends with a user turn")
    elif isinstance(raw_prompt, str):
        # an `input` column no mapping reads follows the prompt, as in Alpaca (columns = {prompt = "instruction"})
        extra = _optional_text(row.get("input"), "input") if "input" not in (p_col, c_col, r_col) else None
        prompt = [{"role": "user", "content": with_input(_text(raw_prompt, p_col), extra)}]
    elif isinstance(raw_prompt, list) and raw_prompt:
        prompt = _message_list(raw_prompt, p_col)
    else:
        raise BadRow(p_col, "a non-empty string or a list of messages")
    _check_prompt(prompt, p_col)
    c, r = _pair(_completion(chosen, prompt, c_col), _completion(rejected, prompt, r_col), r_col)
    return {"prompt": prompt, "chosen": c, "rejected": r}


def to_canonical(row: dict, fmt: str, columns: dict[str, str] | None = None) -> dict:
    """One row of format `fmt` as its canonical record; BadRow(field, expected) when the row does not fit."""
    names, tags = _resolve(fmt, columns)
    if not isinstance(row, dict):
        raise BadRow("row", "a JSON object")
    if fmt == "alpaca":
        return _alpaca(row, names)
    if fmt == "dolly":
        return _dolly(row, names)
    if fmt in ("sharegpt", "messages"):
        return {"messages": _conversation(row, fmt, names, tags, end="assistant")}
    if fmt == "sharegpt_ranking":
        return _ranking(row, names, tags)
    if fmt == "orca_dpo":
        return _orca(row, names)
    if fmt == "alpaca_ranking":
        return _alpaca_ranking(row, names)
    return _preference(row, names)
