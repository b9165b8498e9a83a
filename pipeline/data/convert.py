"""Converting one row of a known format to its canonical record (`to_canonical`; the records are described in
`pipeline.data.formats`). A row that does not fit raises BadRow(field, expected), naming the file's own column.
"""

from __future__ import annotations

from pipeline.data.formats import FIELDS, BadRow, as_list, conversation_column, resolve_columns


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
    turns = as_list(value)
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
    col = conversation_column(row, fmt, names)
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
    history = as_list(row.get(col["history"]))
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
    col = {f: names.get(f, f) for f in FIELDS["alpaca"]}
    prompt = _alpaca_prompt(row, col)
    output = _text(row.get(col["output"]), col["output"])
    return {"messages": prompt + [{"role": "assistant", "content": output}]}


def _alpaca_ranking(row: dict, names: dict) -> dict:
    col = {f: names.get(f, f) for f in FIELDS["alpaca_ranking"]}
    prompt = _alpaca_prompt(row, col)
    c, r = _pair(_text(row.get(col["chosen"]), col["chosen"]), _text(row.get(col["rejected"]), col["rejected"]),
                 col["rejected"])
    return {"prompt": prompt, "chosen": c, "rejected": r}


def _dolly(row: dict, names: dict) -> dict:
    col = {f: names.get(f, f) for f in FIELDS["dolly"]}
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
    value = as_list(value)
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
    col = {f: names.get(f, f) for f in FIELDS["orca_dpo"]}
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
    value = as_list(value)
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
    raw_prompt = as_list(row.get(p_col))
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
    names, tags = resolve_columns(fmt, columns)
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
