"""Instruction and preference data formats: their names, their fields and the `columns` mapping, the errors a file
or a row raises, and the shapes of a row that recognising (`pipeline.data.detect`) and converting
(`pipeline.data.convert`) share. Reading a file is `pipeline.data.read`.

Canonical records (JSON-serialisable):

- SFT (alpaca, sharegpt, dolly, messages): ``{"messages": [{"role", "content"}, ...]}`` -- an optional system message
  first, then user/assistant turns alternating (tool results allowed after an assistant turn), ending with an
  assistant message; plus ``"category"`` when the source has one (Dolly).
- preference (preference, alpaca_ranking, sharegpt_ranking, orca_dpo): TRL's conversational preference form,
  ``{"prompt": [..., user turn], "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``.

A bad row raises :class:`BadRow` (field, expected); the caller prefixes ``<file>:<row>: ``. Field names in errors are
the file's own column names (after the ``columns`` mapping), so they can be found in the file.

Only the standard library is imported by the data-format modules; pyarrow is imported when a Parquet file is read.
"""

from __future__ import annotations

import functools
import json

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

FIELDS: dict[str, tuple[str, ...]] = {
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


def known_keys(fmt: str) -> tuple[str, ...]:
    keys = list(FIELDS[fmt]) + list(_ALIASES.get(fmt, {}))
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
        known = sorted({k for f in FORMATS for k in known_keys(f)})
        for key, value in columns.items():
            if key not in known:
                raise FormatError(f"columns: unknown key {key!r}{did_you_mean(key, known)}; known: {', '.join(known)}")
            if not isinstance(value, str) or not value.strip():
                raise FormatError(f"columns.{key}: expected a column name (a non-empty string), got {value!r}")
        return
    known = known_keys(fmt)
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


def resolve_columns(fmt: str, columns: dict | None) -> tuple[dict, dict]:
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
# the shapes of a row


def as_list(value):
    """A list, or a list stored as a JSON string (CSV and some Parquet exports); anything else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, list):
            return parsed
    return value


def conversation_column(row: dict, fmt: str, names: dict) -> str:
    """The column holding the turns: as renamed, else the format's own name if present, else the other one."""
    if "conversations" in names:
        return names["conversations"]
    first, second = ("messages", "conversations") if fmt == "messages" else ("conversations", "messages")
    return first if first in row or second not in row else second
