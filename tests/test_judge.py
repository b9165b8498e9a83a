"""The LLM judge through the real openai client against a local server with scripted verdicts."""
import json
import re

import numpy as np
import pytest

from openai_server import FakeOpenAI
from pipeline.llm.client import make_client
from pipeline.stages import judge
from conftest import ROOT

PROMPT = ROOT / "recipes/prompts/judge_pairwise.txt"


def answers(folder, texts):
    folder.mkdir()
    with open(folder / "answers.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "answer": t}) + "\n")
    return folder


def config(url, **over):
    return {"mode": "pairwise", "backend": "openai", "model": "judge-model", "api": "chat", "base_url": url,
            "api_key_env": "TB_TEST_KEY", "concurrency": 4, "price_per_1k_tokens": 0.0, **over}


def between(prompt, start, end):
    return prompt.split(start, 1)[1].split(end, 1)[0].strip()


def run_judge(tmp_path, server, cand, ref, name="out", prompt=PROMPT, **over):
    out = tmp_path / name
    out.mkdir()
    client = make_client(config(server.url, **over), generator=None, ledger=tmp_path / "ledger.sqlite", recipe="t")
    return judge.judge(out, candidate=cand, reference=ref, prompt=prompt, config=config(server.url, **over),
                     client=client), out


def longer_wins(prompt):
    a = between(prompt, "[The Start of Assistant A's Answer]", "[The End")
    b = between(prompt, "[The Start of Assistant B's Answer]", "[The End")
    return "Longer is better. [[A]]" if len(a) > len(b) else ("[[B]]" if len(b) > len(a) else "[[C]]")


def test_verdicts_in_both_orders_win_rate_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    cand = answers(tmp_path / "cand", ["a long detailed answer", "short", "same", "a much longer answer here"])
    ref = answers(tmp_path / "ref", ["brief", "a long reference answer", "same", "tiny"])
    with FakeOpenAI(answer_fn=longer_wins) as server:
        result, out = run_judge(tmp_path, server, cand, ref)
        # 4 instructions x 2 orders, less the one both orders render alike ("same" vs "same"): sent once
        assert len(server.requests) == 7
        m = result["metrics"]
        assert (m["win_rate"], m["tie_rate"], m["loss_rate"], m["position_bias_rate"]) == (0.5, 0.25, 0.25, 0.0)
        verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
        assert [v["outcome"] for v in verdicts] == [1.0, 0.0, 0.5, 1.0]
        # every verdict is cached by (judge model, rendered prompt): a rerun sends nothing
        run_judge(tmp_path, server, cand, ref, "again")
        assert len(server.requests) == 7
        # an edited judge prompt is a new request for every pair and order
        edited = tmp_path / "judge.txt"
        edited.write_text(PROMPT.read_text().replace("impartial judge", "fair judge"))
        run_judge(tmp_path, server, cand, ref, "edited", prompt=edited)
        assert len(server.requests) == 14


def test_position_bias_counts_as_tie(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    cand = answers(tmp_path / "cand", ["x one", "x two", "x three"])
    ref = answers(tmp_path / "ref", ["y one", "y two", "y three"])
    with FakeOpenAI(answer_fn=lambda p: "The first one is better. [[A]]") as server:  # always the first answer
        result, _ = run_judge(tmp_path, server, cand, ref)
    m = result["metrics"]
    assert m["position_bias_rate"] == 1.0 and m["tie_rate"] == 1.0 and m["win_rate"] == 0.0


def test_length_controlled_win_rate_removes_a_length_bias():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 20, 400)                       # candidate minus reference length
    p = 1 / (1 + np.exp(-(0.0 + 2.0 * np.tanh(d / d.std()))))  # the judge favours length only
    y = (rng.random(400) < p).astype(float)
    lc = judge.length_controlled(y, 100 + d, np.full(400, 100.0))
    assert abs(lc - 0.5) < 0.08
    longer = d + 30                                  # a candidate that is always longer wins raw ...
    y2 = (rng.random(400) < 1 / (1 + np.exp(-2.0 * np.tanh(longer / longer.std())))).astype(float)
    assert y2.mean() > 0.7
    # ... but at equal length its controlled win rate stays near a coin flip's
    assert judge.length_controlled(y2, 100 + longer, np.full(400, 100.0)) < y2.mean()


def test_single_grading(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    cand = answers(tmp_path / "cand", ["good", "good"])
    ref = answers(tmp_path / "ref", ["meh", "meh"])

    def grade(prompt):
        ans = between(prompt, "[The Start of Assistant's Answer]", "[The End")
        return "Rating: [[8]]" if ans == "good" else "Rating: [[3]]"

    with FakeOpenAI(answer_fn=grade) as server:
        result, _ = run_judge(tmp_path, server, cand, ref, prompt=ROOT / "recipes/prompts/judge_single.txt",
                              mode="single")
    assert result["metrics"]["grade"] == 8.0 and result["metrics"]["reference_grade"] == 3.0


def test_prompt_without_placeholders_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    bad = tmp_path / "bad.txt"
    bad.write_text("Judge this: {instruction}")
    cand = answers(tmp_path / "cand", ["a"])
    with FakeOpenAI() as server, pytest.raises(Exception, match=re.escape("lacks the placeholder {answer_a}")):
        run_judge(tmp_path, server, cand, cand, prompt=bad)
