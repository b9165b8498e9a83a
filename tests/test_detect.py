"""pipeline.data.detect: recognising a file's format from its first rows."""

import pytest

from pipeline.data.convert import to_canonical
from pipeline.data.detect import detect
from pipeline.data.formats import FormatError
from test_formats import a, conv, u


def test_detect_each_format():
    assert detect([{"instruction": "i", "input": "", "output": "o", "text": "t"}]) == "alpaca"
    assert detect([{"instruction": "i", "context": "", "response": "r", "category": "open_qa"}]) == "dolly"
    assert detect([conv(("human", "q"), ("gpt", "a"))]) == "sharegpt"
    assert detect([conv(("human", "q"), ("gpt", "a"), key="messages")]) == "sharegpt"
    assert detect([{"messages": [u("q"), a("a")]}]) == "messages"
    assert detect([{"conversations": [u("q"), a("a")]}]) == "messages"
    assert detect([{"prompt": "p", "chosen": "c", "rejected": "r"}]) == "preference"
    assert detect([{"chosen": [u("q"), a("c")], "rejected": [u("q"), a("r")]}]) == "preference"
    assert detect([{"system": "", "question": "q", "chosen": "c", "rejected": "r"}]) == "orca_dpo"
    assert detect([{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "c"},
                    "rejected": {"from": "gpt", "value": "r"}}]) == "sharegpt_ranking"
    # HuggingFaceH4/ultrafeedback_binarized: prompt, chosen/rejected conversations, and a messages copy of chosen
    h4 = {"prompt": "q", "prompt_id": "1", "chosen": [u("q"), a("c")], "rejected": [u("q"), a("r")],
          "messages": [u("q"), a("c")], "score_chosen": 8.0, "score_rejected": 3.0}
    assert detect([h4]) == "preference"
    assert to_canonical(h4, "preference") == {"prompt": [u("q")], "chosen": [a("c")], "rejected": [a("r")]}
    # HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages
    assert detect([{"prompt": "q", "prompt_id": "1", "messages": [u("q"), a("a")]}]) == "messages"
    # a row that fits nothing among rows that fit one format does not stop detection
    assert detect([{"instruction": "i", "output": "o"}, {"junk": 1}]) == "alpaca"


def test_detect_ambiguous():
    both = {"instruction": "i", "output": "o", "conversations": [{"from": "human", "value": "q"}]}
    with pytest.raises(FormatError, match=r"^ambiguous: the rows fit both alpaca and sharegpt; set format$"):
        detect([both])
    mixed = [{"instruction": "i", "output": "o"}, {"messages": [u("q"), a("a")]}]
    with pytest.raises(FormatError, match="ambiguous: the rows fit both alpaca and messages"):
        detect(mixed)
    with pytest.raises(FormatError, match="ambiguous"):
        detect([{"instruction": "i", "output": "o", "chosen": "c", "rejected": "r"}])


def test_detect_unknown():
    with pytest.raises(FormatError) as info:
        detect([{"text": "a", "label": 1}, {"text": "b", "score": 2}])
    message = str(info.value)
    assert message.startswith("cannot recognise the format: keys seen: text, label, score; set format = one of ")
    assert "alpaca" in message and "orca_dpo" in message and "\n" not in message
    with pytest.raises(FormatError, match=r"conversations items have keys: speaker, text"):
        detect([{"conversations": [{"speaker": "a", "text": "b"}]}])
    with pytest.raises(FormatError, match="no rows"):
        detect([])
