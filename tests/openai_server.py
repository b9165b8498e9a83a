"""A small OpenAI-compatible HTTP server for tests: self-instruct style completions, deterministic per prompt.

It answers /v1/completions and /v1/chat/completions on 127.0.0.1, counts requests, and can be told to answer
the first N requests with 429 so the client's retry with backoff is exercised, and to take `latency` seconds per
request (as a remote endpoint does) for throughput benchmarks.

Fault injection, for the client's retry and resume logic (tests/test_llm_faults.py):
- `faults=0.3, seed=1`: about 30% of requests fail; whether a request fails depends only on (seed, prompt, how
  many times this prompt was received), so a run is reproducible whatever the order requests arrive in; the kind
  of each fault goes round `fault_kinds` (default FAULT_KINDS: 429 with Retry-After: 0, 500, 503, a hang longer
  than the client's timeout, a dropped connection, a 200 with a garbage body, a 200 with a truncated JSON body,
  a 200 with `"choices": []`).
- `fail_prompts={...}` (or a predicate): those prompts always fail with `fail_kind` (default 503; any fault kind
  or HTTP status); set it to None to heal the server.
- `reject=(400, "message")`: every request is refused with that status; `api_key="..."`: a request with another
  bearer token gets 401 (the message echoes the token, as careless servers do); `models={...}`: another model
  gets 404.
Everything is recorded: `received` (every request, with what it got), `requests` (bodies answered with a good
200, i.e. paid for), `answered` (prompt -> good answers sent) and `paid_twice` (prompts answered more than once).
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADJ = ["short", "formal", "funny", "simple", "detailed", "polite", "careful", "clear", "brief", "friendly"]
NOUN = ["letter", "poem", "summary", "recipe", "story", "speech", "review", "riddle", "slogan", "plan"]
TOPIC = ["a rainy morning", "a lost key", "the ocean", "a first job", "city gardens", "a chess match",
         "winter holidays", "a busy market", "space travel", "an old bridge", "a school trip", "a coffee shop"]


def answer(prompt: str) -> str:
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    if prompt.startswith("Please act as an impartial judge"):
        if "Rating:" in prompt:
            return f"Fine. Rating: [[{rng.randint(1, 10)}]]"
        return f"Both are short. [[{rng.choice('ABC')}]]"
    if prompt.rstrip().endswith("Is it classification?"):
        task = prompt.rstrip().rsplit("Task:", 1)[-1]
        return " Yes" if "Classify" in task else " No"
    if prompt.startswith("Come up with a series of tasks"):
        next_index = int(prompt.rstrip().rsplit("\n", 1)[-1].rstrip("."))
        items = []
        for k in range(3):
            if rng.random() < 0.3:
                inst = f"Classify the {rng.choice(NOUN)} about {rng.choice(TOPIC)} as {rng.choice(ADJ)} or not."
            else:
                inst = f"Write a {rng.choice(ADJ)} {rng.choice(NOUN)} about {rng.choice(TOPIC)}."
            items.append(inst if k == 0 else f"{next_index + k}. {inst}")
        return " " + "\n".join(items)
    if prompt.startswith("Given the classification task"):
        return ("Class label: Yes\nInput: " + rng.choice(TOPIC) + "\nClass label: No\nInput: " + rng.choice(TOPIC))
    if prompt.startswith("You are asked to come up with a set of 20 diverse task instructions"):
        next_index = int(prompt.rstrip().rsplit("\n", 1)[-1].split(".")[0])
        items = []
        for k in range(next_index, next_index + 4):
            inst = f"Write a {rng.choice(ADJ)} {rng.choice(NOUN)} about {rng.choice(TOPIC)}."
            inp = rng.choice(["<noinput>", rng.choice(TOPIC)])
            out = f"A {rng.choice(ADJ)} text about {rng.choice(TOPIC)}."
            items.append(("" if k == next_index else f"###\n{k}. Instruction: ") + f"{inst}\n{k}. Input:\n{inp}\n"
                         f"{k}. Output:\n{out}\n")
        return " " + "".join(items)
    if prompt.startswith("Come up with examples"):
        return "".join(f"Example {i}\nInput: {rng.choice(TOPIC)}\nOutput: A {rng.choice(ADJ)} text about "
                       f"{rng.choice(TOPIC)}.\n" for i in (1, 2))
    return " ok"


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: read when the socket starts listening, so a class attribute
    daemon_threads = True     # a hung handler does not hold up shutdown


FAULT_KINDS = ("429", "500", "503", "hang", "drop", "garbage", "truncated", "empty_choices")


class FakeOpenAI:
    def __init__(self, fail_first: int = 0, latency: float = 0.0, answer_fn=None, *, faults: float = 0.0,
                 seed: int = 0, fault_kinds: tuple[str, ...] = FAULT_KINDS, hang: float = 5.0,
                 fail_prompts=None, fail_kind: str = "503", reject: tuple[int, str] | None = None,
                 api_key: str | None = None, models: set[str] | None = None):
        self.requests: list[dict] = []        # request bodies answered with a good 200 (paid for)
        self.received: list[dict] = []        # every request: {"path", "prompt", "model", "outcome"}
        self.answered: Counter = Counter()    # prompt -> good answers sent
        self.fault_counts: Counter = Counter()  # fault kind -> times injected
        self.latency = latency
        self.answer = answer_fn or answer  # prompt -> completion text
        self.fail_first = fail_first
        self.failed = 0
        self.faults, self.seed, self.fault_kinds, self.hang = faults, seed, tuple(fault_kinds), hang
        self.fail_prompts = fail_prompts if fail_prompts is None or callable(fail_prompts) else set(fail_prompts)
        self.fail_kind, self.reject, self.api_key, self.models = fail_kind, reject, api_key, models
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._seen: Counter = Counter()
        self._next_kind = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.failed < server.fail_first:
                    server.failed += 1
                    self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                               {"retry-after-ms": "10"})
                    return
                if self.path.endswith("/chat/completions"):
                    prompt = body["messages"][-1]["content"]
                elif self.path.endswith("/completions"):
                    prompt = body["prompt"]
                else:
                    server._note(self.path, None, body, "404")
                    self._send(404, {"error": {"message": "no such route"}})
                    return
                refusal = server._refusal(self.headers.get("Authorization", ""), body)
                if refusal:
                    code, message = refusal
                    server._note(self.path, prompt, body, str(code))
                    self._send(code, {"error": {"message": message, "type": "invalid_request_error"}})
                    return
                fault = server._fault(prompt)
                if fault:
                    server._note(self.path, prompt, body, fault)
                    self._fail(fault, body)
                    return
                if server.latency:
                    time.sleep(server.latency)
                if self.path.endswith("/chat/completions"):
                    text = server.answer(prompt)
                    choice = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}
                    obj = "chat.completion"
                else:
                    text = server.answer(prompt)
                    choice = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
                    obj = "text_completion"
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                         "total_tokens": len(prompt.split()) + len(text.split())}
                try:
                    self._send(200, {"id": "cmpl-test", "object": obj, "created": 0, "model": body["model"],
                                     "choices": [choice], "usage": usage})
                except OSError:  # the client hung up before the answer was sent: not paid for
                    server._note(self.path, prompt, body, "client gone")
                    return
                with server.lock:
                    server.requests.append({"path": self.path, **body})
                    server.answered[prompt] += 1
                server._note(self.path, prompt, body, "200")

            def _fail(self, kind, body):
                if kind.isdigit():  # "429", "500", "503", or any status, e.g. "400" for a prompt-specific refusal
                    code = int(kind)
                    message = {429: "rate limited", 500: "internal error", 503: "overloaded"}.get(
                        code, f"refused with {code}")
                    headers = {"Retry-After": "0"} if code == 429 else None
                    self._send(code, {"error": {"message": message, "type": "server_error"}}, headers)
                elif kind == "hang":  # no answer until long after the client's timeout; then hang up
                    server.closing.wait(server.hang)
                    self.close_connection = True
                elif kind == "drop":  # hang up without a word
                    self.close_connection = True
                elif kind == "garbage":
                    self._send_raw(200, b"<html><body>502 Bad Gateway</body></html>")
                elif kind == "truncated":
                    whole = json.dumps({"id": "cmpl-test", "object": "text_completion", "created": 0,
                                        "model": body["model"], "choices": [{"index": 0, "text": "half an answ"}]})
                    self._send_raw(200, whole[: len(whole) // 2].encode())
                elif kind == "empty_choices":
                    self._send(200, {"id": "cmpl-test", "object": "text_completion", "created": 0,
                                     "model": body["model"], "choices": [], "usage": None})
                else:
                    raise ValueError(f"unknown fault kind {kind!r}")

            def _send(self, code, payload, headers=None):
                self._send_raw(code, json.dumps(payload).encode(), headers)

            def _send_raw(self, code, data, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _note(self, path, prompt, body, outcome):
        with self.lock:
            self.received.append({"path": path, "prompt": prompt, "model": body.get("model"), "outcome": outcome})

    def _refusal(self, authorization: str, body: dict) -> tuple[int, str] | None:
        if self.reject:
            return self.reject
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            token = authorization.removeprefix("Bearer ")
            return 401, f"Incorrect API key provided: {token}. You can find your API key in your account."
        if self.models is not None and body.get("model") not in self.models:
            return 404, f"The model `{body.get('model')}` does not exist or you do not have access to it."
        return None

    def _fault(self, prompt: str) -> str | None:
        with self.lock:
            n = self._seen[prompt]
            self._seen[prompt] += 1
            fails = self.fail_prompts is not None and (
                self.fail_prompts(prompt) if callable(self.fail_prompts) else prompt in self.fail_prompts)
            if fails:
                kind = self.fail_kind
            elif self.faults and random.Random(f"{self.seed}:{n}:{prompt}").random() < self.faults:
                kind = self.fault_kinds[self._next_kind % len(self.fault_kinds)]
                self._next_kind += 1
            else:
                return None
            self.fault_counts[kind] += 1
            return kind

    @property
    def paid_twice(self) -> int:
        """Prompts answered (a good 200) more than once over this server's life."""
        with self.lock:
            return sum(1 for c in self.answered.values() if c > 1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
