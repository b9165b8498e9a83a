"""pipeline.data.formats and pipeline.data.convert: each format's rows as canonical records, the `columns`
mapping, and the sample files (recognised, then converted). Reading files is tests/test_read.py, recognising a
format tests/test_detect.py."""

import json
from pathlib import Path

import pytest

from pipeline.data.convert import to_canonical
from pipeline.data.detect import detect
from pipeline.data.formats import FORMATS, PREFERENCE_FORMATS, BadRow, FormatError, RowError, check_columns
from pipeline.data.read import read_rows

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"

SAMPLES = {
    "alpaca_sample.json": "alpaca",
    "dolly_sample.jsonl": "dolly",
    "sharegpt_zh_sample.json": "sharegpt",
    "dpo_zh_sample.json": "sharegpt_ranking",
    "dpo_pairs_sample.jsonl": "preference",
}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def t(text):
    return {"role": "tool", "content": text}


def bad(row, fmt, columns=None):
    with pytest.raises(BadRow) as info:
        to_canonical(row, fmt, columns)
    return info.value.field, info.value.expected


def check_sft(record):
    """The canonical SFT invariants."""
    assert set(record) <= {"messages", "category"}
    msgs = record["messages"]
    roles = [m["role"] for m in msgs]
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    assert "system" not in roles[1:]
    body = roles[1:] if roles[0] == "system" else roles
    assert body[0] == "user" and body[-1] == "assistant"
    for prev, cur in zip(body, body[1:]):
        assert (prev, cur) in {("user", "assistant"), ("assistant", "user"), ("assistant", "tool"),
                               ("tool", "tool"), ("tool", "assistant")}


def check_preference(record):
    assert set(record) == {"prompt", "chosen", "rejected"}
    assert record["prompt"][-1]["role"] == "user"
    assert [m["role"] for m in record["chosen"]] == ["assistant"] == [m["role"] for m in record["rejected"]]
    assert record["chosen"] != record["rejected"]


# ---------------------------------------------------------------- sample files


@pytest.mark.parametrize("name,fmt", SAMPLES.items())
def test_samples_detect_and_convert(name, fmt):
    path = DATA / name
    raw = path.read_bytes()
    assert raw.decode("utf-8")  # UTF-8, CJK written as characters (ensure_ascii=False)
    assert b"\\u" not in raw
    rows = [row for _, row in read_rows(path)]
    assert 25 <= len(rows) <= 45
    assert detect(rows[:100]) == fmt
    for row in rows:
        record = to_canonical(row, fmt)
        json.dumps(record)
        (check_preference if fmt in PREFERENCE_FORMATS else check_sft)(record)


def test_sample_shapes():
    alpaca = json.loads((DATA / "alpaca_sample.json").read_text(encoding="utf-8"))
    with_input = sum(1 for r in alpaca if r["input"])
    assert 10 <= with_input <= 20 and len(alpaca) - with_input >= 20
    dolly = [json.loads(line) for line in (DATA / "dolly_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["category"] for r in dolly} == {"open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                                             "information_extraction", "summarization", "creative_writing"}
    for r in dolly:
        assert bool(r["context"]) == (r["category"] in {"closed_qa", "information_extraction", "summarization"})
    sharegpt = json.loads((DATA / "sharegpt_zh_sample.json").read_text(encoding="utf-8"))
    assert any(c["conversations"][0]["from"] == "system" for c in sharegpt)
    assert any(sum(t["from"] == "human" for t in c["conversations"]) >= 2 for c in sharegpt)
    dpo = json.loads((DATA / "dpo_zh_sample.json").read_text(encoding="utf-8"))
    assert all(r["chosen"]["from"] == r["rejected"]["from"] == "gpt" for r in dpo)


# ---------------------------------------------------------------- alpaca


def test_alpaca_plain_and_with_input():
    assert to_canonical({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "alpaca") == \
        {"messages": [u("Say hi."), a("Hi!")]}
    assert to_canonical({"instruction": "Say hi.", "input": None, "output": "Hi!"}, "alpaca") == \
        {"messages": [u("Say hi."), a("Hi!")]}
    assert to_canonical({"instruction": "Say hi.", "output": "Hi!", "text": "ignored"}, "alpaca") == \
        {"messages": [u("Say hi."), a("Hi!")]}
    assert to_canonical({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}, "alpaca") == \
        {"messages": [u("Translate.\n\nBonjour"), a("Hello")]}
    # whitespace inside content is kept; an all-whitespace input counts as none
    assert to_canonical({"instruction": " Hi ", "input": "  \n", "output": " yo\n"}, "alpaca") == \
        {"messages": [u(" Hi "), a(" yo\n")]}


def test_alpaca_system_and_history():
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
           "history": [["1+1?", "2"], ["2+2?", "4"]]}
    record = to_canonical(row, "alpaca")
    assert record == {"messages": [s("Be brief."), u("1+1?"), a("2"), u("2+2?"), a("4"), u("And 3+3?"), a("6")]}
    check_sft(record)
    assert bad({**row, "history": [["only one"]]}, "alpaca") == \
        ("history[0]", "a [user, assistant] pair of non-empty strings")
    assert bad({**row, "history": "nope"}, "alpaca")[0] == "history"


def test_alpaca_bad_rows():
    assert bad({"instruction": "Hi", "input": "", "output": ""}, "alpaca") == ("output", "a non-empty string")
    assert bad({"instruction": "Hi", "input": "", "output": "   "}, "alpaca") == ("output", "a non-empty string")
    assert bad({"instruction": "Hi", "input": ""}, "alpaca") == ("output", "a non-empty string")
    assert bad({"instruction": None, "output": "x"}, "alpaca") == ("instruction", "a non-empty string")
    assert bad({"instruction": "Hi", "input": 3, "output": "x"}, "alpaca")[0] == "input"
    assert str(BadRow("output", "a non-empty string")) == "output: a non-empty string"


# ---------------------------------------------------------------- dolly


def test_dolly():
    row = {"instruction": "When was it built?", "context": "The tower was built in 1889.", "response": "In 1889.",
           "category": "closed_qa"}
    assert to_canonical(row, "dolly") == \
        {"messages": [u("When was it built?\n\nThe tower was built in 1889."), a("In 1889.")], "category": "closed_qa"}
    assert to_canonical({"instruction": "Name a fruit.", "context": "", "response": "Apple."}, "dolly") == \
        {"messages": [u("Name a fruit."), a("Apple.")]}
    assert bad({"instruction": "x", "context": "", "response": ""}, "dolly") == ("response", "a non-empty string")


# ---------------------------------------------------------------- sharegpt / messages


def conv(*turns, key="conversations"):
    return {key: [{"from": f, "value": v} for f, v in turns]}


def test_sharegpt_roles():
    row = conv(("system", "sys"), ("human", "q1"), ("gpt", "a1"), ("user", "q2"), ("chatgpt", "a2"),
               ("human", "q3"), ("bing", "a3"), ("human", "q4"), ("bard", "a4"), ("human", "q5"), ("model", "a5"))
    assert to_canonical(row, "sharegpt") == {"messages": [
        s("sys"), u("q1"), a("a1"), u("q2"), a("a2"), u("q3"), a("a3"), u("q4"), a("a4"), u("q5"), a("a5")]}


def test_sharegpt_tool_turns():
    row = conv(("human", "weather in Paris?"), ("function_call", '{"name": "weather", "arguments": {"city": "Paris"}}'),
               ("observation", '{"temp": 21}'), ("gpt", "It is 21 °C."), ("human", "and Rome?"),
               ("function_call", '{"name": "weather", "arguments": {"city": "Rome"}}'), ("function", '{"temp": 25}'),
               ("tool", '{"note": "sunny"}'), ("gpt", "25 °C and sunny."))
    record = to_canonical(row, "sharegpt")
    assert [m["role"] for m in record["messages"]] == \
        ["user", "assistant", "tool", "assistant", "user", "assistant", "tool", "tool", "assistant"]
    check_sft(record)


def test_sharegpt_lenient_edges():
    # a leading gpt turn and a trailing human turn are dropped
    row = conv(("gpt", "Hello! How can I help?"), ("human", "q"), ("gpt", "a"), ("human", "unanswered"))
    assert to_canonical(row, "sharegpt") == {"messages": [u("q"), a("a")]}
    # a top-level system (LLaMA-Factory) comes first
    row = {**conv(("human", "q"), ("gpt", "a")), "system": "Be nice."}
    assert to_canonical(row, "sharegpt") == {"messages": [s("Be nice."), u("q"), a("a")]}
    row = {**conv(("human", "q"), ("gpt", "a")), "system": ""}
    assert to_canonical(row, "sharegpt") == {"messages": [u("q"), a("a")]}
    # {role, content} items under conversations, and from/value under messages
    row = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_canonical(row, "sharegpt") == {"messages": [u("q"), a("a")]}
    assert to_canonical(conv(("human", "q"), ("gpt", "a"), key="messages"), "sharegpt") == \
        {"messages": [u("q"), a("a")]}
    # extra keys on items (as Arrow structs give them) and on the row are ignored
    row = {"id": "x1", "conversations": [{"from": "human", "value": "q", "weight": None},
                                         {"from": "gpt", "value": "a", "weight": 1.0}]}
    assert to_canonical(row, "sharegpt") == {"messages": [u("q"), a("a")]}
    # conversations stored as a JSON string (CSV exports)
    row = {"conversations": json.dumps(conv(("human", "q"), ("gpt", "a"))["conversations"])}
    assert to_canonical(row, "sharegpt") == {"messages": [u("q"), a("a")]}


def test_sharegpt_bad_rows():
    assert bad(conv(("human", "q"), ("robot", "a")), "sharegpt") == \
        ("conversations[1].from", "one of human, user, gpt, assistant, chatgpt, bing, bard, model, function_call, "
                                  "system, function, observation, tool")
    assert bad(conv(("human", "q"), ("gpt", "")), "sharegpt") == ("conversations[1].value", "a non-empty string")
    assert bad({"conversations": [{"from": "human", "value": None}]}, "sharegpt") == \
        ("conversations[0].value", "a non-empty string")
    field, expected = bad(conv(("human", "q1"), ("human", "q2"), ("gpt", "a")), "sharegpt")
    assert field == "conversations[1].from" and expected.startswith("a gpt turn")
    field, expected = bad(conv(("human", "q"), ("gpt", "a1"), ("gpt", "a2")), "sharegpt")
    assert field == "conversations[2].from" and expected.startswith("a human turn")
    assert bad(conv(("human", "q"), ("system", "late"), ("gpt", "a")), "sharegpt") == \
        ("conversations[1].from", "a system turn only as the first turn")
    assert bad(conv(("human", "q")), "sharegpt") == \
        ("conversations", "at least one human turn followed by a gpt turn")
    assert bad(conv(("gpt", "only an answer")), "sharegpt")[0] == "conversations"
    assert bad({"conversations": []}, "sharegpt") == ("conversations", "a non-empty list of turns")
    assert bad({"conversations": ["q", "a"]}, "sharegpt") == ("conversations[0]", "an object with from and value")
    assert bad({"other": 1}, "sharegpt") == ("conversations", "a non-empty list of turns")
    assert bad({**conv(("system", "A"), ("human", "q"), ("gpt", "a")), "system": "B"}, "sharegpt")[0] == "system"


def test_messages():
    row = {"messages": [s("sys"), u("q"), a("a"), u("q2"), a("a2")]}
    assert to_canonical(row, "messages") == {"messages": [s("sys"), u("q"), a("a"), u("q2"), a("a2")]}
    row = {"messages": [u("q"), {"role": "assistant", "content": "call", "tool_calls": None}, t("42"), a("It is 42.")]}
    check_sft(to_canonical(row, "messages"))
    assert bad({"messages": [u("q"), {"role": "assistant", "content": None}]}, "messages") == \
        ("messages[1].content", "a non-empty string")
    assert bad({"messages": [u("q"), {"role": "gpt", "content": "a"}]}, "messages") == \
        ("messages[1].role", "one of system, developer, user, assistant, tool, function")
    field, expected = bad({"messages": [u("q"), u("q again"), a("a")]}, "messages")
    assert field == "messages[1].role" and expected.startswith("an assistant turn")
    assert bad({"messages": [u("q")]}, "messages") == \
        ("messages", "at least one user turn followed by an assistant turn")


# ---------------------------------------------------------------- preference formats


def test_preference_strings():
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert to_canonical(row, "preference") == {"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}
    assert bad({"prompt": "2+2?", "chosen": "4", "rejected": "4"}, "preference") == \
        ("rejected", "an answer different from chosen")
    assert bad({"prompt": "2+2?", "chosen": "", "rejected": "4"}, "preference") == ("chosen", "a non-empty string")
    assert bad({"chosen": "4", "rejected": "5"}, "preference")[0] == "prompt"


def test_preference_message_lists():
    # conversational: prompt list, answers only
    row = {"prompt": [s("Be brief."), u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}
    assert to_canonical(row, "preference") == {"prompt": [s("Be brief."), u("2+2?")], "chosen": [a("4")],
                                               "rejected": [a("5")]}
    # answers holding the whole conversation: the shared prompt is stripped
    row = {"prompt": [u("2+2?")], "chosen": [u("2+2?"), a("4")], "rejected": [u("2+2?"), a("5")]}
    assert to_canonical(row, "preference") == {"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}
    # string prompt with message-list answers
    row = {"prompt": "2+2?", "chosen": [a("4")], "rejected": [u("2+2?"), a("5")]}
    assert to_canonical(row, "preference") == {"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}
    assert bad({"prompt": [u("q"), a("x")], "chosen": [a("4")], "rejected": [a("5")]}, "preference") == \
        ("prompt", "messages ending with a user turn")
    assert bad({"prompt": [u("q")], "chosen": [a("4"), a("more")], "rejected": [a("5")]}, "preference") == \
        ("chosen", "one assistant message after the prompt")


def test_preference_implicit_prompt():
    chosen = [s("sys"), u("hi"), a("hello"), u("2+2?"), a("4")]
    rejected = [s("sys"), u("hi"), a("hello"), u("2+2?"), a("5")]
    record = to_canonical({"chosen": chosen, "rejected": rejected}, "preference")
    assert record == {"prompt": [s("sys"), u("hi"), a("hello"), u("2+2?")], "chosen": [a("4")],
                      "rejected": [a("5")]}
    check_preference(record)
    assert bad({"chosen": chosen, "rejected": chosen}, "preference") == ("rejected", "an answer different from chosen")
    assert bad({"chosen": [u("a"), a("1")], "rejected": [u("b"), a("2")]}, "preference")[0] == "prompt"


def test_sharegpt_ranking():
    row = {"conversations": [{"from": "human", "value": "2+2?"}],
           "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    expected = {"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}
    assert to_canonical(row, "sharegpt_ranking") == expected
    assert to_canonical({**row, "chosen": "4", "rejected": ["5"]}, "sharegpt_ranking") == expected
    assert to_canonical({**row, "chosen": [{"from": "gpt", "value": "4"}]}, "sharegpt_ranking") == expected
    multi = {**row, "system": "Be exact.", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"}]}
    assert to_canonical(multi, "sharegpt_ranking")["prompt"] == [s("Be exact."), u("hi"), a("hello"), u("2+2?")]
    assert bad({**row, "rejected": {"from": "gpt", "value": "4"}}, "sharegpt_ranking") == \
        ("rejected", "an answer different from chosen")
    assert bad({**row, "chosen": {"from": "human", "value": "4"}}, "sharegpt_ranking")[0] == "chosen.from"
    assert bad({**row, "chosen": {"from": "gpt", "value": ""}}, "sharegpt_ranking") == \
        ("chosen.value", "a non-empty string")
    ends_with_gpt = {**row, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert bad(ends_with_gpt, "sharegpt_ranking") == ("conversations", "turns ending with a human turn")


def test_orca_dpo():
    row = {"system": "", "question": "2+2?", "chosen": "4", "rejected": "5"}
    assert to_canonical(row, "orca_dpo") == {"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}
    row["system"] = "You are an AI assistant."
    assert to_canonical(row, "orca_dpo")["prompt"] == [s("You are an AI assistant."), u("2+2?")]
    assert bad({**row, "question": ""}, "orca_dpo") == ("question", "a non-empty string")
    assert bad({**row, "rejected": "4"}, "orca_dpo") == ("rejected", "an answer different from chosen")


# ---------------------------------------------------------------- columns


def test_columns_llamafactory_alpaca():
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "sys", "history": "hist"}
    row = {"instruction": "Continue.", "input": "1, 2, 3", "output": "4, 5", "sys": "Count.", "hist": [["hi", "yo"]]}
    assert to_canonical(row, "alpaca", columns) == \
        {"messages": [s("Count."), u("hi"), a("yo"), u("Continue.\n\n1, 2, 3"), a("4, 5")]}
    row = {"q": "What is 2+2?", "answer": "4"}
    columns = {"instruction": "q", "output": "answer"}
    assert to_canonical(row, "alpaca", columns) == {"messages": [u("What is 2+2?"), a("4")]}
    assert detect([row], columns) == "alpaca"
    # errors name the file's column
    assert bad({"q": "x", "answer": ""}, "alpaca", columns) == ("answer", "a non-empty string")


def test_columns_sharegpt_tags():
    columns = {"messages": "dialog", "role_tag": "speaker", "content_tag": "text", "user_tag": "Q",
               "assistant_tag": "A", "system_tag": "S", "observation_tag": "obs", "function_tag": "call"}
    row = {"dialog": [{"speaker": "S", "text": "sys"}, {"speaker": "Q", "text": "q"}, {"speaker": "call", "text": "{}"},
                      {"speaker": "obs", "text": "42"}, {"speaker": "A", "text": "a"}]}
    assert to_canonical(row, "sharegpt", columns) == {"messages": [s("sys"), u("q"), a("{}"), t("42"), a("a")]}
    assert detect([row], columns) == "sharegpt"
    field, expected = bad({"dialog": [{"speaker": "Q", "text": "q"}, {"speaker": "X", "text": "a"}]},
                          "sharegpt", columns)
    assert field == "dialog[1].speaker" and "Q" in expected and "A" in expected
    field, expected = bad({"dialog": [{"speaker": "Q", "text": "q"}, {"speaker": "Q", "text": "a"}]},
                          "sharegpt", columns)
    assert field == "dialog[1].speaker" and expected.startswith("an A turn")
    # LLaMA-Factory's OpenAI-style tags
    oa = {"messages": "messages", "role_tag": "role", "content_tag": "content", "user_tag": "user",
          "assistant_tag": "assistant"}
    row = {"messages": [u("q"), a("a")]}
    assert to_canonical(row, "sharegpt", oa) == {"messages": [u("q"), a("a")]}
    # ranking with renamed columns
    columns = {"conversations": "turns", "chosen": "good", "rejected": "bad"}
    row = {"turns": [{"from": "human", "value": "q"}], "good": {"from": "gpt", "value": "yes"}, "bad": "no"}
    assert to_canonical(row, "sharegpt_ranking", columns) == {"prompt": [u("q")], "chosen": [a("yes")],
                                                              "rejected": [a("no")]}
    assert detect([row], columns) == "sharegpt_ranking"


def test_check_columns():
    check_columns("alpaca", {"prompt": "q", "query": "i", "response": "r"})
    check_columns("sharegpt", {"messages": "m", "role_tag": "role"})
    check_columns("orca_dpo", {})
    with pytest.raises(FormatError, match=r"unknown key 'answer' for format alpaca; known: instruction, input"):
        check_columns("alpaca", {"answer": "a"})
    with pytest.raises(FormatError, match="unknown key 'role_tag'"):
        check_columns("alpaca", {"role_tag": "r"})
    with pytest.raises(FormatError, match="both name the instruction column"):
        check_columns("alpaca", {"prompt": "a", "instruction": "b"})
    with pytest.raises(FormatError, match="column name"):
        check_columns("dolly", {"context": ""})
    with pytest.raises(FormatError, match="unknown format"):
        check_columns("lima", {})
    with pytest.raises(FormatError, match="unknown key 'bogus'"):
        to_canonical({"instruction": "a", "output": "b"}, "alpaca", {"bogus": "x"})
    with pytest.raises(FormatError, match="unknown key 'bogus'"):
        detect([{"instruction": "a", "output": "b"}], {"bogus": "x"})

def test_constants():
    assert FORMATS == ("alpaca", "sharegpt", "dolly", "messages", "preference", "alpaca_ranking", "sharegpt_ranking",
                       "orca_dpo")
    assert PREFERENCE_FORMATS == ("preference", "alpaca_ranking", "sharegpt_ranking", "orca_dpo")
    assert issubclass(FormatError, Exception) and issubclass(RowError, Exception)


def test_no_heavy_imports_at_module_top():
    import subprocess
    import sys

    code = ("import sys, pipeline.data.formats, pipeline.data.read, pipeline.data.detect, pipeline.data.convert; "
            "heavy = {'pyarrow', 'datasets', 'torch', 'numpy'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[]"
