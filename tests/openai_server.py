"""A small OpenAI-compatible HTTP server for tests: self-instruct style completions, deterministic per prompt.

It answers /v1/completions and /v1/chat/completions on 127.0.0.1, counts requests, and can be told to answer
the first N requests with 429 so the client's retry with backoff is exercised, and to take `latency` seconds per
request (as a remote endpoint does) for throughput benchmarks.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
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


class FakeOpenAI:
    def __init__(self, fail_first: int = 0, latency: float = 0.0, answer_fn=None):
        self.requests: list[dict] = []
        self.latency = latency
        self.answer = answer_fn or answer  # prompt -> completion text
        self.fail_first = fail_first
        self.failed = 0
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
                server.requests.append({"path": self.path, **body})
                if server.latency:
                    time.sleep(server.latency)
                if self.path.endswith("/chat/completions"):
                    prompt = body["messages"][-1]["content"]
                    text = server.answer(prompt)
                    choice = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}
                    obj = "chat.completion"
                elif self.path.endswith("/completions"):
                    prompt = body["prompt"]
                    text = server.answer(prompt)
                    choice = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
                    obj = "text_completion"
                else:
                    self._send(404, {"error": {"message": "no such route"}})
                    return
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                         "total_tokens": len(prompt.split()) + len(text.split())}
                self._send(200, {"id": "cmpl-test", "object": obj, "created": 0, "model": body["model"],
                                 "choices": [choice], "usage": usage})

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.request_queue_size = 128
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
