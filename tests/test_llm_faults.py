"""The OpenAI client against a faulty endpoint (issue 14): a local server that answers some requests with 429,
500/503, a hang, a dropped connection, a garbage or truncated 200 body or empty `choices`, through the real
`openai` client and the ledger. One run finishes; every answer the server sent is in the ledger, even when
another request fails for good; nothing is paid twice; a permanent failure is one line naming the endpoint, the
model and the last error; the key reaches no message and no file."""
import re
import socket
import sqlite3
import time

import pytest

from openai_server import FAULT_KINDS, FakeOpenAI, answer
from pipeline.errors import TunebuildError, Unavailable
from pipeline.llm.client import make_client
from pipeline.llm.openai_backend import RequestFailed, RetryPolicy

KEY = "sk-secret-test"
PARAMS = {"max_tokens": 32, "temperature": 0.0, "top_p": 1.0, "stop": None}
PROMPTS = [f"Come up with examples for task {i}" for i in range(40)]
# short timeout and backoff: a hang costs 1 s, a backoff a few ms
FAST = RetryPolicy(attempts=8, timeout=1.0, backoff=0.005, backoff_max=0.02, retry_after_max=0.05, total=20)


def client_for(url, ledger, *, api="completions", concurrency=8, retry=FAST, model="fault-model"):
    config = {"backend": "openai", "model": model, "api": api, "base_url": url, "api_key_env": "TB_FAULT_KEY",
              "concurrency": concurrency, "price_per_1k_tokens": 0.0}
    client = make_client(config, generator=None, ledger=ledger, recipe="t")
    client.backend.retry = retry
    return client


def ledger_prompts(path) -> list[str]:
    con = sqlite3.connect(str(path))
    try:
        return [p for (p,) in con.execute("SELECT prompt FROM calls")]
    finally:
        con.close()


def assert_every_answer_recorded(server, ledger):
    """Every prompt the server answered with a good 200 is in the ledger, and nothing else is."""
    assert sorted(server.answered) == sorted(ledger_prompts(ledger))


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("TB_FAULT_KEY", KEY)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_30_percent_faults_of_every_kind_one_run_finishes_and_a_rerun_sends_nothing(tmp_path, api, capsys):
    ledger = tmp_path / "ledger.sqlite"
    with FakeOpenAI(faults=0.3, seed=3, hang=3) as server:
        client = client_for(server.url, ledger, api=api)
        t0 = time.monotonic()
        texts = client.complete_many(PROMPTS, PARAMS)
        assert time.monotonic() - t0 < 15
        assert texts == [answer(p) for p in PROMPTS]
        assert set(server.fault_counts) == set(FAULT_KINDS), server.fault_counts  # every kind was injected
        assert sum(server.fault_counts.values()) >= 8
        assert len(ledger_prompts(ledger)) == len(PROMPTS)
        assert_every_answer_recorded(server, ledger)
        assert server.paid_twice == 0
        assert client.usage.sent == len(server.requests) == len(PROMPTS)  # answered requests, not attempts
        assert client.usage.requests == len(PROMPTS)
        assert "failed attempts retried" in capsys.readouterr().out

        # a second run: everything from the ledger, nothing sent
        received = len(server.received)
        again = client_for(server.url, ledger, api=api)
        assert again.complete_many(PROMPTS, PARAMS) == texts
        assert len(server.received) == received and again.usage.sent == 0
        assert again.usage.prompt_tokens == client.usage.prompt_tokens


@pytest.mark.parametrize("kind, last_error", [
    ("503", "HTTP 503: overloaded"),
    ("hang", "no answer within 0.5 s"),
    ("garbage", "unreadable answer: a 200 whose body is not JSON"),
    ("truncated", "unreadable answer: a 200 whose body is not JSON"),
    ("empty_choices", "unreadable answer: a 200 without choices"),
])
def test_a_request_that_keeps_failing_loses_no_other_answer_and_is_the_only_one_resent(tmp_path, kind,
                                                                                         last_error):
    ledger = tmp_path / "ledger.sqlite"
    bad = PROMPTS[0]  # the first to be sent: the others are still to come when it fails
    retry = RetryPolicy(attempts=4, timeout=0.5, backoff=0.005, backoff_max=0.02, retry_after_max=0.05)
    with FakeOpenAI(faults=0.15, seed=5, hang=3, fail_prompts={bad}, fail_kind=kind) as server:
        client = client_for(server.url, ledger, concurrency=4, retry=retry)
        with pytest.raises(TunebuildError) as info:
            client.complete_many(PROMPTS, PARAMS)
        message = str(info.value)
        assert isinstance(info.value, RequestFailed) and not isinstance(info.value, Unavailable)
        assert "\n" not in message
        assert message.startswith(f"{server.url}: completions request for model 'fault-model' failed after "
                                  f"4 attempts: {last_error}"), message
        assert message.endswith("(39 answers recorded in the ledger)"), message
        assert sum(r["prompt"] == bad for r in server.received) == 4
        # every other answer arrived and was recorded: none was cancelled or thrown away
        assert sorted(ledger_prompts(ledger)) == sorted(PROMPTS[1:])
        assert_every_answer_recorded(server, ledger)

        server.fail_prompts = None  # the server heals: the rerun sends the missing prompt only
        server.faults = 0
        received = len(server.received)
        rerun = client_for(server.url, ledger, concurrency=4, retry=retry)
        assert rerun.complete_many(PROMPTS, PARAMS) == [answer(p) for p in PROMPTS]
        assert [r["prompt"] for r in server.received[received:]] == [bad] and rerun.usage.sent == 1
        assert server.paid_twice == 0
        assert_every_answer_recorded(server, ledger)


@pytest.mark.parametrize("server_args, status, message", [
    (dict(reject=(400, "max_tokens is too large: 32")), 400, "max_tokens is too large: 32"),
    (dict(api_key="sk-the-right-one"), 401, "Incorrect API key provided: ***"),
    (dict(models={"another-model"}), 404, "The model `fault-model` does not exist"),
])
def test_a_refusal_is_not_retried_and_stops_new_requests(tmp_path, server_args, status, message):
    ledger = tmp_path / "ledger.sqlite"
    with FakeOpenAI(**server_args) as server:
        client = client_for(server.url, ledger, concurrency=4)
        t0 = time.monotonic()
        with pytest.raises(TunebuildError) as info:
            client.complete_many(PROMPTS, PARAMS)
        assert time.monotonic() - t0 < 5
    text = str(info.value)
    assert type(info.value) is RequestFailed and "\n" not in text
    assert text.startswith(f"{server.url}: completions request for model 'fault-model' failed after 1 attempt: "
                           f"HTTP {status} (not retried): {message}"), text
    # only the requests already in flight reached the server, each once: no retry, no new request
    prompts = [r["prompt"] for r in server.received]
    assert 1 <= len(prompts) <= 4 and len(set(prompts)) == len(prompts)
    assert "not sent" in text
    assert KEY not in text
    assert ledger_prompts(ledger) == []


def test_requests_in_flight_when_one_is_refused_finish_and_are_recorded(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    with FakeOpenAI(latency=0.15, fail_prompts={PROMPTS[0]}, fail_kind="400") as server:
        client = client_for(server.url, ledger, concurrency=4)
        with pytest.raises(RequestFailed, match=r"HTTP 400 \(not retried\): refused with 400 \(36 not sent; "
                                                r"3 answers recorded in the ledger\)$"):
            client.complete_many(PROMPTS, PARAMS)
    assert sorted(ledger_prompts(ledger)) == sorted(PROMPTS[1:4])  # the three in flight were not thrown away
    assert_every_answer_recorded(server, ledger)
    assert len(server.received) == 4


def test_an_unreachable_endpoint_is_unavailable_in_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    retry = RetryPolicy(attempts=3, timeout=1, backoff=0.01, backoff_max=0.02)
    client = client_for(url, tmp_path / "ledger.sqlite", concurrency=2, retry=retry)
    with pytest.raises(Unavailable) as info:
        client.complete_many(PROMPTS, PARAMS)
    text = str(info.value)
    assert text.startswith(f"{url}: cannot reach the endpoint after 3 attempts: connection failed"), text
    assert "\n" not in text and "not sent" in text  # the other requests were not tried once it was unreachable


def test_the_key_reaches_no_message_and_no_file(tmp_path, capsys):
    ledger = tmp_path / "ledger.sqlite"
    with FakeOpenAI(faults=0.3, seed=7, hang=3) as server:
        client_for(server.url, ledger).complete_many(PROMPTS, PARAMS)
    with FakeOpenAI(api_key="sk-the-right-one") as server:  # the 401 message echoes the key it was sent
        with pytest.raises(TunebuildError) as info:
            client_for(server.url, ledger).complete_many(PROMPTS[:2] + ["another prompt"], PARAMS)
    assert server.received and KEY not in str(info.value) and "***" in str(info.value)
    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.startswith("ledger.sqlite") for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p


def test_retry_policy_backoff_and_retry_after_are_bounded():
    policy = RetryPolicy(backoff=1.0, backoff_max=30.0, retry_after_max=60.0)
    assert 0.5 <= policy.delay(1, None) <= 1.0 and 2.0 <= policy.delay(3, None) <= 4.0
    assert 15.0 <= policy.delay(20, None) <= 30.0  # capped
    assert policy.delay(1, 5.0) == 5.0 and policy.delay(2, 10.0) == 10.0  # Retry-After honoured
    assert policy.delay(1, 3600.0) == 60.0  # ... but capped
    assert 0.5 <= policy.delay(1, 0.0) <= 1.0 and 0.5 <= policy.delay(1, -1.0) <= 1.0  # and never below backoff


def test_total_time_per_request_is_bounded(tmp_path):
    retry = RetryPolicy(attempts=100, timeout=0.2, backoff=0.05, backoff_max=0.05, total=1.0)
    with FakeOpenAI(fail_prompts={"slow"}, fail_kind="hang", hang=3) as server:
        client = client_for(server.url, tmp_path / "ledger.sqlite", retry=retry)
        t0 = time.monotonic()
        with pytest.raises(RequestFailed, match=r"failed after \d attempts: no answer within [\d.]+ s"):
            client.complete_many(["slow"], PARAMS)
        assert time.monotonic() - t0 < 2.0


def test_generation_through_a_faulty_endpoint_finishes_in_one_run_without_paying_twice(tmp_path):
    from pipeline.stages import generate
    from test_generate import files, gen_config

    with FakeOpenAI(faults=0.3, seed=11, hang=3) as server:
        reports = []
        for name in ("first", "second"):
            cfg = gen_config(server.url, api_key_env="TB_FAULT_KEY", concurrency=4)
            client = make_client(cfg, generator=None, ledger=tmp_path / "ledger.sqlite", recipe="t")
            client.backend.retry = FAST
            (tmp_path / name).mkdir()
            reports.append(generate.generate(tmp_path / name, config=cfg, client=client, **files()))
            if name == "first":
                sent_first = len(server.received)
                assert client.usage.sent == len(server.requests) > 0
        assert len(server.received) == sent_first and client.usage.sent == 0  # the rerun: all from the ledger
        assert sum(server.fault_counts.values()) > 0 and server.paid_twice == 0
        assert_every_answer_recorded(server, tmp_path / "ledger.sqlite")
    assert reports[0] == reports[1] and reports[0]["stop_reason"] == "target reached"
    assert (tmp_path / "first/instructions.jsonl").read_bytes() == (tmp_path / "second/instructions.jsonl").read_bytes()


def test_the_stage_fails_with_one_line_naming_task_endpoint_model_and_error(tmp_path):
    from conftest import copy_project, run_doit

    with FakeOpenAI(api_key="sk-the-right-one") as server:
        project = copy_project(tmp_path)
        (project / "recipes/t.toml").write_text(
            f'extends = "mini_lima.toml"\n[model]\nbase = "builtin:tiny"\n[generate]\nbase_url = "{server.url}"\n'
            f'api_key_env = "TB_FAULT_KEY"\nconcurrency = 2\n')
        _, _, out, rc = run_doit(project, "generate:t.self_instruct", env={"TB_FAULT_KEY": KEY, "HF_HUB_OFFLINE": "1"},
                                 check=False, timeout=300)
    assert rc != 0 and "Traceback" not in out and KEY not in out
    lines = [line for line in out.splitlines() if line.startswith("generate:t.self_instruct: ")]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"generate:t.self_instruct: {server.url}: completions request for model ") and \
        "failed after 1 attempt: HTTP 401 (not retried): Incorrect API key provided: ***" in lines[0], lines[0]
    assert len(server.received) <= 2  # the requests in flight; none retried, no new one sent


def test_an_endpoint_that_fails_every_request_stops_being_asked(tmp_path):
    retry = RetryPolicy(attempts=3, timeout=1, backoff=0.01, backoff_max=0.02)
    with FakeOpenAI(fail_prompts=lambda p: True, fail_kind="500") as server:
        client = client_for(server.url, tmp_path / "ledger.sqlite", concurrency=2, retry=retry)
        with pytest.raises(RequestFailed) as info:
            client.complete_many(PROMPTS, PARAMS)
    text = str(info.value)
    assert re.search(r"after 3 attempts: HTTP 500: internal error \(\d other requests? failed; (\d+) not sent; "
                     r"0 answers recorded in the ledger\)$", text), text
    assert int(re.search(r"(\d+) not sent", text)[1]) >= len(PROMPTS) - 3
    # two requests failed for good in a row: a request already in flight gets no retry, no new one is sent
    assert len(server.received) <= 2 * 3 + 1


def test_the_same_request_twice_in_one_call_is_paid_once(tmp_path, monkeypatch):
    from openai_server import FakeOpenAI
    from pipeline.llm.client import make_client

    monkeypatch.setenv("TB_TEST_KEY", "k")
    with FakeOpenAI() as server:
        cfg = {"backend": "openai", "model": "m", "api": "completions", "base_url": server.url,
               "api_key_env": "TB_TEST_KEY", "concurrency": 4, "price_per_1k_tokens": 0.0}
        client = make_client(cfg, generator=None, ledger=tmp_path / "ledger.sqlite", recipe="t")
        params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": []}
        out = client.complete_many(["same prompt", "other prompt", "same prompt"], params)
        assert out[0] == out[2] and len(server.requests) == 2 and client.usage.requests == 3
