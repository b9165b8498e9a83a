import json

import pytest

from openai_server import FakeOpenAI
from pipeline.core.recipe.load import load_recipes
from pipeline.errors import Unavailable
from pipeline.llm.client import make_client
from pipeline.stages import generate
from conftest import ROOT


def gen_config(url, **over):
    demo = {r.name: r for r in load_recipes(ROOT / "recipes")}["mini_lima"]
    c = demo.section("generate")
    c.update({"base_url": url, "api_key_env": "TB_TEST_KEY", "num_instructions": 12, "max_requests": 10,
              "request_batch_size": 2, "concurrency": 2, "price_per_1k_tokens": 0.5, **over})
    return c


def files():
    r = ROOT / "recipes"
    return dict(seeds=r / "seeds/seed_tasks.jsonl", prompt=r / "prompts/self_instruct.txt",
                classify_prompt=r / "prompts/is_classification.txt",
                instance_prompt=r / "prompts/instances_input_first.txt",
                instance_prompt_output_first=r / "prompts/instances_output_first.txt")


def run_once(tmp_path, url, name, **over):
    cfg = gen_config(url, **over)
    out = tmp_path / name
    out.mkdir()
    client = make_client(cfg, generator=None, ledger=tmp_path / "ledger.sqlite", recipe="t")
    report = generate.generate(out, config=cfg, client=client, **files())
    return out, report, client


def test_seed_set_shape():
    seeds = generate.read_seeds(ROOT / "recipes/seeds/seed_tasks.jsonl")
    assert len(seeds) >= 40
    assert sum(s["is_classification"] for s in seeds) >= 5
    assert all({"id", "name", "instruction", "instances", "is_classification"} <= set(s) for s in seeds)


def test_prompt_has_8_instructions_with_2_machine_once_pool_has_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    seeds = {s["instruction"] for s in generate.read_seeds(ROOT / "recipes/seeds/seed_tasks.jsonl")}
    with FakeOpenAI() as server:
        run_once(tmp_path, server.url, "a")
    prompts = [r["prompt"] for r in server.requests if r["prompt"].startswith("Come up with a series")]
    for i, p in enumerate(prompts):
        listed = [line.split(". ", 1)[1] for line in p.splitlines()[1:-1]]
        assert len(listed) == 8 and p.rstrip().endswith("9.")
        n_machine = sum(x not in seeds for x in listed)
        assert n_machine == (0 if i < 2 else 2)  # the first round (2 requests) has no machine instructions yet


def test_openai_backend_through_real_client_with_ledger_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    with FakeOpenAI(fail_first=2) as server:
        out, report, client = run_once(tmp_path, server.url, "first")
        assert server.failed == 2  # two 429s were retried by the client
        sent_first = len(server.requests)
        assert client.usage.sent == sent_first > 0
        tasks = [json.loads(x) for x in (out / "instructions.jsonl").read_text().splitlines()]
        machine = [t for t in tasks if t["source"] == "machine"]
        assert len(machine) == report["machine_instructions"] == 12
        assert report["stop_reason"] == "target reached"
        assert any(t["is_classification"] for t in machine) and any(not t["is_classification"] for t in machine)
        assert all(t["instances"] for t in machine)
        assert report["usage"]["cost"] == pytest.approx(
            (report["usage"]["prompt_tokens"] + report["usage"]["completion_tokens"]) / 1000 * 0.5)
        # a rebuild is answered from the ledger: no request reaches the server, the output is identical
        out2, report2, client2 = run_once(tmp_path, server.url, "second")
        assert len(server.requests) == sent_first and client2.usage.sent == 0
        assert (out2 / "instructions.jsonl").read_bytes() == (out / "instructions.jsonl").read_bytes()
        assert report2 == report


def test_request_budget_stops_generation_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    with FakeOpenAI() as server:
        _, report, _ = run_once(tmp_path, server.url, "a", num_instructions=500, max_requests=3)
    assert report["stop_reason"] == "request budget spent" and report["instruction_requests"] == 3


def test_missing_key_is_one_line(monkeypatch):
    monkeypatch.delenv("TB_TEST_KEY", raising=False)
    with pytest.raises(Unavailable, match="environment variable TB_TEST_KEY is not set"):
        make_client(gen_config("http://127.0.0.1:9/v1"), generator=None, ledger=":memory:")


def test_parsers():
    assert generate.parse_instructions(" Write a poem.\n10. Sort a list\n11 . Name a color", 9) == [
        "Write a poem.", "Sort a list", "Name a color"]
    assert generate.parse_input_first("Example 1\nInput: 2, 1\nOutput: 1, 2\nExample 2\nInput: b a\nOutput: a b") == [
        {"input": "2, 1", "output": "1, 2"}, {"input": "b a", "output": "a b"}]
    assert generate.parse_input_first("Output: hello") == [{"input": "", "output": "hello"}]
    assert generate.parse_output_first("Class label: Yes\nInput: x\nClass label: No\nInput: y") == [
        {"input": "x", "output": "Yes"}, {"input": "y", "output": "No"}]


def test_alpaca_style_one_prompt_for_20_tasks_with_instances(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    with FakeOpenAI() as server:
        cfg = gen_config(server.url, style="alpaca", num_prompt_instructions=3, num_instructions=10)
        out = tmp_path / "alpaca"
        out.mkdir()
        client = make_client(cfg, generator=None, ledger=tmp_path / "ledger.sqlite", recipe="t")
        r = ROOT / "recipes"
        report = generate.generate(out, seeds=r / "seeds/seed_tasks.jsonl", prompt=r / "prompts/alpaca.txt",
                              config=cfg, client=client)
    prompts = [q["prompt"] for q in server.requests]
    # only task-list requests: no classification or instance prompts in this style
    assert prompts and all(p.startswith("You are asked to come up with a set of 20") for p in prompts)
    assert all(p.count("###") == 4 and p.rstrip().endswith("4. Instruction:") for p in prompts)
    assert set(server.requests[0]["stop"]) == {"\n20", "20.", "20 ."}
    tasks = [json.loads(x) for x in (out / "instructions.jsonl").read_text().splitlines()]
    machine = [t for t in tasks if t["source"] == "machine"]
    assert len(machine) == report["machine_instructions"] == 10
    assert all(len(t["instances"]) == 1 and t["instances"][0]["output"] for t in machine)
    assert any(t["instances"][0]["input"] == "" for t in machine)  # <noinput> became an empty input
    assert any(t["instances"][0]["input"] for t in machine)


def test_alpaca_parser_keeps_complete_items_only():
    text = (" Name a prime.\n4. Input:\n<noinput>\n4. Output:\n7\n###\n5. Instruction: Sort these.\n5. Input:\n"
            "3 1 2\n5. Output:\n1 2 3\n###\n6. Instruction: Cut off")
    assert generate.parse_alpaca(text, 4) == [
        {"instruction": "Name a prime.", "input": "", "output": "7"},
        {"instruction": "Sort these.", "input": "3 1 2", "output": "1 2 3"}]
