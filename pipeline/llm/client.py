"""LLM clients: one interface, two backends, every call through the ledger.

- `openai` (`pipeline.llm.openai_backend`): any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp
  server, ...) through the `openai` package's async client, completions or chat API, with at most `concurrency`
  requests in flight (asyncio). The key comes only from the environment and never reaches a message, a file or the
  ledger. Each request has its own bounded retry loop (`RetryPolicy`, the client's own retries are off): rate
  limits (408/409/429), server errors (5xx), timeouts (a hang is cut by a per-attempt timeout), dropped or refused
  connections and unreadable answers (a 200 whose body is not JSON, truncated, or has no text) are retried with
  exponential backoff (Retry-After honoured, capped); other 4xx (bad request, bad key, unknown model) are not, and
  stop new requests from being sent. A failure never cancels the requests in flight: each answer is recorded in the
  ledger as it arrives, and the stage ends with one line `<endpoint>: <what failed> after N attempts: <last error>`
  once they have all settled.
- `local`: a transformers causal LM loaded with `from_pretrained` (a folder, or a hub id).
"""
from __future__ import annotations

import asyncio
import sys
from collections import Counter
from dataclasses import dataclass, field

from pipeline.errors import TunebuildError
from pipeline.llm.ledger import Entry, Ledger, request_key
from pipeline.llm.openai_backend import OpenAIBackend


@dataclass
class Usage:
    requests: int = 0          # requests answered (from the ledger or the backend)
    sent: int = 0              # requests the backend answered in this run (failed attempts not counted)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price_per_1k_tokens: float = 0.0

    @property
    def cost(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / 1000 * self.price_per_1k_tokens

    def as_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost": round(self.cost, 6)}


def _truncate_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class LocalBackend:
    """A local model answering through a batched engine (`pipeline.llm.engines`: the HF engine, or vLLM): a call's
    prompts are decoded many at a time, each as if alone (sampling seeded per request by its ledger key)."""
    name = "local"

    def __init__(self, model_path: str, identity: str, *, engine: str = "hf", max_model_len: int | None = None,
                 engine_run: dict | None = None):
        from pipeline.llm.engines import open_engine

        self.model_id = identity
        self.engine = open_engine(engine, model_path, max_model_len=max_model_len, run=engine_run)
        self.tokenizer = self.engine.tokenizer
        # prompts handed to the engine at once (each chunk's answers go into the ledger when it is done): the HF
        # engine's batch, which it halves on an out-of-memory error; vLLM schedules a long list itself
        self.batch_size = getattr(self.engine, "batch_size", 256)

    def complete(self, prompt: str, params: dict, sample_index: int) -> Entry:
        return self.complete_batch([prompt], params, sample_index)[0]

    def complete_batch(self, prompts: list[str], params: dict, sample_index: int) -> list[Entry]:
        seeds = [int(request_key(self.name, self.model_id, p, params, sample_index)[:12], 16) for p in prompts]
        done = self.engine.generate(prompts, max_new_tokens=params["max_tokens"], temperature=params["temperature"],
                                    top_p=params["top_p"], seeds=seeds)
        return [Entry(text=_truncate_at_stop(c.text, params.get("stop") or []), prompt_tokens=c.prompt_tokens,
                      completion_tokens=c.completion_tokens) for c in done]

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()


@dataclass
class Client:
    """Answers prompts from the ledger or the backend, recording each new answer as soon as it arrives."""
    backend: object
    ledger: Ledger
    model_id: str
    recipe: str = ""
    concurrency: int = 1
    usage: Usage = field(default_factory=Usage)

    def close(self) -> None:
        """Free the backend's engine (a local model's)."""
        if hasattr(self.backend, "close"):
            self.backend.close()

    def complete_many(self, prompts: list[str], params: dict, sample_index: int = 0) -> list[str]:
        keys = [request_key(self.backend.name, self.model_id, p, params, sample_index) for p in prompts]
        answers: dict[int, Entry] = {}
        missing, first_of = [], {}
        for i, k in enumerate(keys):
            hit = self.ledger.get(k)
            if hit is not None:
                answers[i] = hit
            elif k not in first_of:  # the same request twice in one call is sent once
                first_of[k] = i
                missing.append(i)

        def record(i: int, entry: Entry) -> None:
            self.ledger.put(keys[i], backend=self.backend.name, model=self.model_id, prompt=prompts[i],
                            params=params, sample_index=sample_index, entry=entry, recipe=self.recipe)
            answers[i] = entry
            self.usage.sent += 1

        if missing:
            from tqdm.auto import tqdm

            with tqdm(total=len(missing), desc=f"{self.backend.name} {self.model_id}", unit="req",
                      file=sys.stderr, disable=None, leave=False) as bar:
                if hasattr(self.backend, "acomplete"):
                    asyncio.run(self._complete_async(prompts, missing, params, sample_index, record, bar))
                elif hasattr(self.backend, "complete_batch"):  # many prompts per forward pass
                    # chunks of similar length (longest first), each answered whole and recorded when done: the
                    # engine sorts within what it is handed, so an unsorted chunk would pad its short prompts
                    step = self.backend.batch_size
                    by_length = sorted(missing, key=lambda i: (-len(prompts[i]), i))
                    for at in range(0, len(by_length), step):
                        chunk = by_length[at:at + step]
                        for i, entry in zip(chunk, self.backend.complete_batch([prompts[i] for i in chunk], params,
                                                                               sample_index)):
                            record(i, entry)
                        bar.update(len(chunk))
                else:
                    for i in missing:
                        record(i, self.backend.complete(prompts[i], params, sample_index))
                        bar.update()
        for i, k in enumerate(keys):
            if i not in answers:
                answers[i] = answers[first_of[k]]
        for i in range(len(prompts)):
            self.usage.requests += 1
            self.usage.prompt_tokens += answers[i].prompt_tokens
            self.usage.completion_tokens += answers[i].completion_tokens
        return [answers[i].text for i in range(len(prompts))]

    async def _complete_async(self, prompts, missing, params, sample_index, record, bar) -> None:
        """At most `concurrency` requests in flight; each answer goes into the ledger as soon as it arrives, so a
        run killed halfway loses only the requests still in flight. A failed request cancels nothing: the others
        finish (and are recorded) first. A failure that no retry can mend (`stop`: a refusal, an unreachable
        endpoint), or `concurrency` (at least 2) requests in a row failing for good with no answer in between (an
        endpoint that is down), keeps the requests not yet sent from being sent and the ones in flight from being
        retried. Then the first failure is raised, saying how many others failed and how many answers were
        recorded."""
        gate = asyncio.Semaphore(max(1, self.concurrency))
        stop = asyncio.Event()
        retried: Counter = Counter()
        failures: list[BaseException] = []
        not_sent = streak = 0
        # this many requests failing for good in a row, no answer in between: the endpoint is down, stop sending
        breaker = max(2, self.concurrency)
        async with self.backend.open() as client:
            async def one(i: int) -> None:
                nonlocal not_sent, streak
                async with gate:
                    if stop.is_set():
                        not_sent += 1
                        return
                    try:
                        entry = await self.backend.acomplete(client, prompts[i], params, sample_index,
                                                             stop=stop, retried=retried)
                        record(i, entry)
                    except Exception as e:
                        failures.append(e)
                        streak += 1
                        if getattr(e, "stop", False) or not isinstance(e, TunebuildError) or streak >= breaker:
                            stop.set()
                        return
                streak = 0
                bar.update()

            # `one` keeps its failures; whatever escapes it is kept too, and no sibling is cancelled for it
            failures += [r for r in await asyncio.gather(*(one(i) for i in missing), return_exceptions=True)
                         if isinstance(r, BaseException)]
        if retried:
            kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(retried.items()))
            print(f"{self.backend.name} {self.backend.where}: {sum(retried.values())} failed attempts retried "
                  f"({kinds})", flush=True)
        if failures:
            first = failures[0]
            if not isinstance(first, TunebuildError):
                raise first
            answered = len(missing) - len(failures) - not_sent
            others = len(failures) - 1
            extra = [f"{others} other request{'s' if others > 1 else ''} failed"] if others else []
            extra += [f"{not_sent} not sent"] if not_sent else []
            extra += [f"{answered} answer{'' if answered == 1 else 's'} recorded in the ledger"]
            raise type(first)(f"{first} ({'; '.join(extra)})") from None


def make_client(config: dict, *, generator, ledger, recipe: str = "", engine_run: dict | None = None) -> Client:
    """The client a recipe's `[generate]` (or `[eval.judge]`) section asks for. `generator` is the resolved local
    model (a folder path) for the local backend; `config["engine"]` (default `hf`) the engine that runs it, with
    `config["max_model_len"]` and `engine_run` (`pipeline.llm.engines.task_settings`) for vLLM. A local model's
    id is its name and content (a folder) and, served by vLLM, the engine and its version: answers of one engine
    are never taken from the ledger for another."""
    from pathlib import Path

    from pipeline.digests import input_digest

    if config["backend"] == "openai":
        backend = OpenAIBackend(config["model"], api=config["api"], base_url=config["base_url"],
                                api_key_env=config["api_key_env"])
        model_id = config["model"]
    else:
        from pipeline.llm import engines

        engine = config.get("engine", engines.DEFAULT)
        ref = str(generator if generator is not None else config["model"])
        # A local model is identified by its content when it is a folder (an artifact or a folder under recipes/:
        # retrained weights are asked anew), else by its hub name.
        is_folder = Path(ref).is_dir()
        model_id = f"{config['model']}@{input_digest(Path(ref))[:16]}" if is_folder else ref
        if engine != engines.DEFAULT:
            model_id = f"{model_id} ({engines.identity(engine)})"
        backend = LocalBackend(ref, model_id, engine=engine, max_model_len=config.get("max_model_len"),
                               engine_run=engine_run)
    return Client(backend=backend, ledger=Ledger(Path(ledger)), model_id=model_id, recipe=recipe,
                  concurrency=config["concurrency"], usage=Usage(price_per_1k_tokens=config["price_per_1k_tokens"]))
