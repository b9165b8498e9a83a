"""pipeline.data.read: local files as rows (.json, .jsonl / .ndjson, .csv, .parquet) and the errors of unreadable
ones."""

import json

import pytest

from pipeline.data.convert import to_canonical
from pipeline.data.detect import detect
from pipeline.data.formats import FormatError, RowError
from pipeline.data.read import read_rows
from test_formats import a, u


def test_read_json_list_wrapped_and_misnamed(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    p = tmp_path / "list.json"
    p.write_text(json.dumps(rows), encoding="utf-8")
    assert list(read_rows(p)) == [(1, rows[0]), (2, rows[1])]
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"version": "1", "data": rows}), encoding="utf-8")
    assert list(read_rows(p)) == [(1, rows[0]), (2, rows[1])]
    p = tmp_path / "lines.json"
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert list(read_rows(p)) == [(1, rows[0]), (3, rows[1])]
    one = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    p = tmp_path / "one.json"
    p.write_text(json.dumps(one), encoding="utf-8")
    assert list(read_rows(p)) == [(1, one)]
    p = tmp_path / "broken.json"
    p.write_text('[{"a": 1},', encoding="utf-8")
    with pytest.raises(FormatError, match=r"broken\.json: not valid JSON"):
        list(read_rows(p))
    p = tmp_path / "scalars.json"
    p.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(RowError, match=r"scalars\.json:1: row: a JSON object"):
        list(read_rows(p))


def test_read_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": "ü"}\n\n   \n{"a": "中文"}\n', encoding="utf-8")
    assert list(read_rows(p)) == [(1, {"a": "ü"}), (4, {"a": "中文"})]
    p = tmp_path / "bom.ndjson"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n')
    assert list(read_rows(p)) == [(1, {"a": 1})]


def test_read_jsonl_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3,\n{"a": 4}\n', encoding="utf-8")
    rows = read_rows(p)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(RowError) as info:
        list(rows)
    err = info.value
    assert (err.path, err.row, err.field) == (p, 4, "row")
    assert str(err).startswith(f"{p}:4: row: not valid JSON")
    p.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(RowError, match=r":2: row: a JSON object, not a list"):
        list(read_rows(p))
    # the same inside a .json file holding JSON Lines
    p = tmp_path / "misnamed.json"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(RowError) as info:
        list(read_rows(p))
    assert info.value.row == 3


def test_read_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes("\ufeffinstruction,input,output\nSay hi,,Hi!\n\"Two\nlines\",x,\"a, b\"\n".encode("utf-8"))
    rows = list(read_rows(p))
    assert rows == [(1, {"instruction": "Say hi", "input": "", "output": "Hi!"}),
                    (2, {"instruction": "Two\nlines", "input": "x", "output": "a, b"})]
    assert detect([r for _, r in rows]) == "alpaca"
    assert to_canonical(rows[0][1], "alpaca") == {"messages": [u("Say hi"), a("Hi!")]}
    p.write_text("a,b\n1,2\n1,2,3\n", encoding="utf-8")
    with pytest.raises(RowError, match=r"d\.csv:2: row: 2 fields, as in the header"):
        list(read_rows(p))


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    table = pa.table({
        "conversations": [[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                          [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]],
        "meta": [{"k": 1}, None],
        "tags": pa.array([[("x", "1")], []], type=pa.map_(pa.string(), pa.string())),
    })
    pq.write_table(table, p)
    rows = list(read_rows(p))
    assert [n for n, _ in rows] == [1, 2]
    first = rows[0][1]
    assert first["conversations"] == [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert type(first["conversations"]) is list and type(first["conversations"][0]) is dict
    assert first["meta"] == {"k": 1} and rows[1][1]["meta"] is None
    assert first["tags"] == {"x": "1"}
    json.dumps([r for _, r in rows])
    assert detect([r for _, r in rows]) == "sharegpt"
    assert to_canonical(rows[1][1], "sharegpt") == {"messages": [u("问"), a("答")]}


def test_read_errors(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(FormatError, match=r"d\.txt: unknown file type '\.txt'"):
        list(read_rows(p))
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"a": "café"}\n'.encode("latin-1"))
    with pytest.raises(FormatError, match=r"latin1\.jsonl: not UTF-8 text$"):
        list(read_rows(p))
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"a": "café"}]'.encode("latin-1"))
    with pytest.raises(FormatError, match=r"latin1\.json: not UTF-8 text$"):
        list(read_rows(p))
    with pytest.raises(FormatError, match="no such file"):
        list(read_rows(tmp_path / "missing.jsonl"))
    p = tmp_path / "fake.parquet"
    p.write_text("not parquet", encoding="utf-8")
    with pytest.raises(FormatError, match=r"fake\.parquet: not a readable Parquet file"):
        list(read_rows(p))
