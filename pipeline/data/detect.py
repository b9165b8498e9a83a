"""Recognising the format of a file's first rows (`format = "auto"`): the one format whose fields the rows have; a
FormatError naming the keys seen when none fits, or the two formats when several do.
"""

from __future__ import annotations

from pipeline.data.formats import (FORMATS, FormatError, as_list, conversation_column, known_keys,
                                   resolve_columns)


def _turn_shape(turns, tags: dict) -> str | None:
    """'sharegpt' (from/value items), 'messages' (role/content items) or None."""
    turns = as_list(turns)
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
        col = conversation_column(row, fmt, names)
        if col not in row:
            return False
        if fmt == "sharegpt_ranking":
            # prompt + chosen/rejected message lists + a messages copy (HuggingFaceH4/ultrafeedback_binarized) is TRL's
            # preference form; the ranking form's answers are single turns
            trl = has("prompt") and isinstance(as_list(row.get(names.get("chosen", "chosen"))), list)
            return pair and not trl and isinstance(as_list(row[col]), list)
        return not pair and _turn_shape(row[col], tags) == fmt
    if fmt == "orca_dpo":
        return pair and has("question")
    if fmt == "alpaca_ranking":  # LLaMA-Factory's alpaca form with ranking: true
        return pair and isinstance(row.get(names.get("instruction", "instruction")), str) \
            and not any(isinstance(as_list(row.get(names.get(f, f))), list) for f in ("chosen", "rejected"))
    if fmt == "preference":
        others = has("question") or conversation_column(row, fmt, {}) in row or "instruction" in row
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
            candidates.append((fmt, *resolve_columns(fmt, columns)))
        except FormatError as e:
            errors.append(e)
    if not candidates:
        known = sorted({k for f in FORMATS for k in known_keys(f)})
        bad = [k for k in columns if not any(k in known_keys(f) for f in FORMATS)]
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
        turns = as_list(rows[0].get(col))
        if isinstance(turns, list):
            item = next((t for t in turns if isinstance(t, dict)), None)
            if item is not None:
                hint = f" ({col} items have keys: {', '.join(map(str, item)) or 'none'})"
            break
    shown = ", ".join(keys[:30]) + (", ..." if len(keys) > 30 else "")
    raise FormatError(f"cannot recognise the format: keys seen: {shown or 'none'}{hint}; "
                      f"set format = one of {', '.join(FORMATS)}")
