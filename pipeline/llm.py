"""LLM clients: one interface, two backends, every call through the ledger.

- `openai`: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server, ...) through the `openai`
  package's async client, completions or chat API, with at most `concurrency` requests in flight (asyncio). The
  key comes only from the environment and never reaches a message, a file or the ledger. Each request has its
  own bounded retry loop (`RetryPolicy`, the client's own retries are off): rate limits (408/409/429), server
  errors (5xx), timeouts (a hang is cut by a per-attempt timeout), dropped or refused connections and unreadable
  answers (a 200 whose body is not JSON, truncated, or has no text) are retried with exponential backoff
  (Retry-After honoured, capped); other 4xx (bad request, bad key, unknown model) are not, and stop new requests
  from being sent. A failure never cancels the requests in flight: each answer is recorded in the ledger as it
  arrives, and the stage ends with one line `<endpoint>: <what failed> after N attempts: <last error>` once they
  have all settled.
- `local`: a transformers causal LM loaded with `from_pretrained` (a folder, or a hub id).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.errors import TunebuildError, Unavailable
from pipeline.ledger import Entry, Ledger, request_key


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


@dataclass(frozen=True)
class RetryPolicy:
    """How one request to an OpenAI-compatible endpoint is retried."""
    attempts: int = 6              # tries per request, the first included
    timeout: float = 120.0         # seconds one attempt may take, hangs included
    backoff: float = 1.0           # first wait between tries; doubles each time (with jitter)
    backoff_max: float = 30.0      # longest wait between tries
    retry_after_max: float = 60.0  # a server's Retry-After is honoured up to this
    total: float = 600.0           # seconds one request may take over all its tries

    def delay(self, failures: int, retry_after: float | None) -> float:
        """Seconds to wait after the `failures`-th failed try: exponential backoff with jitter, or longer when
        the server asked for it (Retry-After, up to `retry_after_max`)."""
        step = min(self.backoff_max, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            return max(step, min(retry_after, self.retry_after_max))
        return step


class RequestFailed(TunebuildError):
    """A request that failed for good. `stop` is set when no other request can do better (a bad request, a bad
    key, an unknown model), so requests not yet sent are not sent."""

    def __init__(self, message: str, *, stop: bool = False):
        super().__init__(message)
        self.stop = stop


class EndpointUnavailable(Unavailable):
    """The endpoint could not be reached (refused, unresolvable, dropped) on any try."""
    stop = True


class _Transient(Exception):
    """One failed try worth another: `kind` counts it, `detail` says it, `retry_after` is the server's wish."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


_RETRIED_STATUS = {408, 409, 429}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _root_cause(e: BaseException) -> str:
    """The innermost message of an exception chain (`Connection error.` says less than `Connection refused`)."""
    seen, message = set(), str(e)
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        message = str(e) or message
        e = e.__cause__ or e.__context__
    return message


def _retry_after(response) -> float | None:
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) / scale
            except ValueError:
                pass
    return None


def _server_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])
    if isinstance(body, str) and body.strip():
        return body
    return str(getattr(e, "message", "") or e)


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str, *, api: str = "completions", base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float | None = None,
                 max_retries: int | None = None, retry: RetryPolicy | None = None):
        key = os.environ.get(api_key_env)
        if not key:
            raise Unavailable(f"environment variable {api_key_env} is not set (generate.api_key_env): "
                              f"it must hold the API key for {base_url or 'api.openai.com'}")
        self.model, self.api = model, api
        self.retry = retry or RetryPolicy()
        if timeout is not None or max_retries is not None:
            self.retry = dataclasses.replace(
                self.retry, timeout=self.retry.timeout if timeout is None else timeout,
                attempts=self.retry.attempts if max_retries is None else max_retries + 1)
        self.where = base_url or "https://api.openai.com/v1"
        self._key = key
        self._base_url = base_url

    def redact(self, text: str) -> str:
        """`text` without the API key (a server may echo it, e.g. in a 401 message)."""
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def open(self):
        """An `openai.AsyncOpenAI` client, to be used within one event loop; its own retries are off."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=self._key, base_url=self._base_url, timeout=self.retry.timeout,
                           max_retries=0)

    async def _attempt(self, client, prompt: str, common: dict, timeout: float) -> Entry:
        """One try: an Entry, or `_Transient` for a failure worth retrying; anything else is for good."""
        import openai
        from pydantic import ValidationError

        try:
            if self.api == "completions":
                call = client.completions.create(prompt=prompt, timeout=timeout, **common)
            else:
                call = client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                                      timeout=timeout, **common)
            r = await asyncio.wait_for(call, timeout + 1.0)  # a hard bound, whatever the transport does
        except (openai.APITimeoutError, TimeoutError):
            raise _Transient("timeout", f"no answer within {timeout:.3g} s") from None
        except openai.APIConnectionError as e:
            raise _Transient("connection", f"connection failed ({_root_cause(e)})") from None
        except openai.APIStatusError as e:
            detail = f"HTTP {e.status_code}: {_server_message(e)}"
            if e.status_code in _RETRIED_STATUS or e.status_code >= 500:
                raise _Transient(str(e.status_code), detail, _retry_after(e.response)) from None
            raise RequestFailed(f"HTTP {e.status_code} (not retried): {_server_message(e)}", stop=True) from None
        except openai.APIResponseValidationError as e:
            raise _Transient("bad body", f"unreadable answer ({e})") from None
        except (json.JSONDecodeError, ValidationError) as e:  # a garbage or truncated body
            what = "not JSON" if isinstance(e, json.JSONDecodeError) else "not a completion"
            raise _Transient("bad body", f"unreadable answer: a 200 whose body is {what} ({e})") from None
        try:
            choice = r.choices[0]
            text = choice.text if self.api == "completions" else choice.message.content
        except (AttributeError, IndexError, KeyError, TypeError):
            raise _Transient("bad body", "unreadable answer: a 200 without choices") from None
        if not isinstance(text, str):
            raise _Transient("bad body", "unreadable answer: a 200 whose choice has no text") from None
        usage = getattr(r, "usage", None)
        return Entry(text=text, prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                     completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))

    async def acomplete(self, client, prompt: str, params: dict, sample_index: int, *,
                        stop: asyncio.Event | None = None, retried: Counter | None = None) -> Entry:
        """One request with its bounded retry loop. Raises `RequestFailed` (`EndpointUnavailable` when the
        endpoint could never be reached) with one line: `<endpoint>: <what failed> after N attempts: <last error>`.
        Once `stop` is set (another request failed for good) a failed try is not retried."""
        common = dict(model=self.model, max_tokens=params["max_tokens"], temperature=params["temperature"],
                      top_p=params["top_p"], stop=params.get("stop") or None)
        policy = self.retry
        start = time.monotonic()
        attempt, last, kinds = 0, None, set()
        while True:
            attempt += 1
            left = policy.total - (time.monotonic() - start)
            try:
                return await self._attempt(client, prompt, common, max(0.001, min(policy.timeout, left)))
            except RequestFailed as e:
                raise RequestFailed(self._line(attempt, str(e)), stop=True) from None
            except _Transient as e:
                last = e
                kinds.add(e.kind)
                if retried is not None:
                    retried[e.kind] += 1
            if attempt >= policy.attempts or (stop is not None and stop.is_set()):
                break
            wait = policy.delay(attempt, last.retry_after)
            if time.monotonic() - start + wait >= policy.total:
                break
            if stop is None:
                await asyncio.sleep(wait)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    break  # another request failed for good: stop here too
                except TimeoutError:
                    pass
        if kinds == {"connection"}:
            raise EndpointUnavailable(self._line(attempt, last.detail, "cannot reach the endpoint"))
        raise RequestFailed(self._line(attempt, last.detail))

    def _line(self, attempts: int, error: str, what: str | None = None) -> str:
        what = what or f"{self.api} request for model {self.model!r} failed"
        n = f"{attempts} attempt" + ("" if attempts == 1 else "s")
        return self.redact(f"{self.where}: {what} after {n}: {_one_line(error)}")


class LocalBackend:
    """A local model answering through a batched engine (`pipeline.engines`: the HF engine, or vLLM): a call's
    prompts are decoded many at a time, each as if alone (sampling seeded per request by its ledger key)."""
    name = "local"

    def __init__(self, model_path: str, identity: str, *, engine: str = "hf", max_model_len: int | None = None,
                 engine_run: dict | None = None):
        from pipeline.engines import open_engine

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
                    step = self.backend.batch_size
                    for at in range(0, len(missing), step):
                        chunk = missing[at:at + step]
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
    `config["max_model_len"]` and `engine_run` (`pipeline.engines.task_settings`) for vLLM. A local model's
    id is its name and content (a folder) and, served by vLLM, the engine and its version: answers of one engine
    are never taken from the ledger for another."""
    from pathlib import Path

    from pipeline.store import input_digest

    if config["backend"] == "openai":
        backend = OpenAIBackend(config["model"], api=config["api"], base_url=config["base_url"],
                                api_key_env=config["api_key_env"])
        model_id = config["model"]
    else:
        from pipeline import engines

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
