"""The `openai` backend of the LLM client (`pipeline.llm.client`): any OpenAI-compatible endpoint (OpenAI, vLLM,
Ollama, llama.cpp server, ...) through the `openai` package's async client, completions or chat API. The key comes
only from the environment and never reaches a message, a file or the ledger. Each request has its own bounded retry
loop (`RetryPolicy`, the client's own retries are off); see `pipeline.llm.client` for what is retried and how a
failure ends the stage.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

from pipeline.errors import TunebuildError, Unavailable
from pipeline.llm.ledger import Entry


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
