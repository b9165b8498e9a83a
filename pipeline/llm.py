"""LLM clients: one interface, two backends, every call through the ledger.

- `openai`: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server, ...) through the `openai`
  package's async client, completions or chat API, with at most `concurrency` requests in flight (asyncio). The
  key comes only from the environment. The client's own retry with exponential backoff covers rate limits (429),
  server errors (5xx), timeouts and dropped connections.
- `local`: a transformers causal LM loaded with `from_pretrained` (a folder, or a hub id).
"""
from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field

from pipeline.errors import TunebuildError, Unavailable
from pipeline.ledger import Entry, Ledger, request_key


@dataclass
class Usage:
    requests: int = 0          # requests answered (from the ledger or the backend)
    sent: int = 0              # requests actually sent to the backend in this run
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


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str, *, api: str = "completions", base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, max_retries: int = 6):
        key = os.environ.get(api_key_env)
        if not key:
            raise Unavailable(f"environment variable {api_key_env} is not set (generate.api_key_env): "
                              f"it must hold the API key for {base_url or 'api.openai.com'}")
        self.model, self.api = model, api
        self.client_args = dict(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self.where = base_url or "api.openai.com"

    def open(self):
        """An `openai.AsyncOpenAI` client, to be used within one event loop."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(**self.client_args)

    async def acomplete(self, client, prompt: str, params: dict, sample_index: int) -> Entry:
        import openai

        common = dict(model=self.model, max_tokens=params["max_tokens"], temperature=params["temperature"],
                      top_p=params["top_p"], stop=params.get("stop") or None)
        try:
            if self.api == "completions":
                r = await client.completions.create(prompt=prompt, **common)
                text = r.choices[0].text
            else:
                r = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                                         **common)
                text = r.choices[0].message.content or ""
        except openai.APIConnectionError as e:
            raise Unavailable(f"cannot reach the endpoint {self.where}: {e}") from None
        except openai.APIStatusError as e:
            raise TunebuildError(f"{self.where} answered {e.status_code} for model {self.model!r}: "
                                 f"{e.message}") from None
        usage = r.usage
        return Entry(text=text, prompt_tokens=usage.prompt_tokens if usage else 0,
                     completion_tokens=usage.completion_tokens if usage else 0)


class LocalBackend:
    name = "local"

    def __init__(self, model_path: str, identity: str):
        from pipeline.hf import load_causal_lm

        self.model_id = identity
        self.model, self.tokenizer = load_causal_lm(model_path)
        self.model.eval()

    def complete(self, prompt: str, params: dict, sample_index: int) -> Entry:
        import torch

        key = request_key(self.name, self.model_id, prompt, params, sample_index)
        torch.manual_seed(int(key[:12], 16))  # the same request always samples the same text
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        room = getattr(self.model.config, "max_position_embeddings", 4096) - params["max_tokens"]
        ids = ids[:, -max(room, 1):]
        ids = ids.to(self.model.device)
        temperature = params["temperature"]
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params["max_tokens"],
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=params["top_p"] if temperature > 0 else None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Entry(text=_truncate_at_stop(text, params.get("stop") or []), prompt_tokens=int(ids.shape[1]),
                     completion_tokens=int(new.shape[0]))


@dataclass
class Client:
    """Answers prompts from the ledger or the backend, recording each new answer as soon as it arrives."""
    backend: object
    ledger: Ledger
    model_id: str
    recipe: str = ""
    concurrency: int = 1
    usage: Usage = field(default_factory=Usage)

    def complete_many(self, prompts: list[str], params: dict, sample_index: int = 0) -> list[str]:
        keys = [request_key(self.backend.name, self.model_id, p, params, sample_index) for p in prompts]
        answers: dict[int, Entry] = {}
        missing = []
        for i, k in enumerate(keys):
            hit = self.ledger.get(k)
            if hit is None:
                missing.append(i)
            else:
                answers[i] = hit

        def record(i: int, entry: Entry) -> None:
            self.ledger.put(keys[i], backend=self.backend.name, model=self.model_id, prompt=prompts[i],
                            params=params, sample_index=sample_index, entry=entry, recipe=self.recipe)
            answers[i] = entry

        if missing:
            from tqdm.auto import tqdm

            with tqdm(total=len(missing), desc=f"{self.backend.name} {self.model_id}", unit="req",
                      file=sys.stderr, disable=None, leave=False) as bar:
                if hasattr(self.backend, "acomplete"):
                    asyncio.run(self._complete_async(prompts, missing, params, sample_index, record, bar))
                else:
                    for i in missing:
                        record(i, self.backend.complete(prompts[i], params, sample_index))
                        bar.update()
        self.usage.sent += len(missing)
        for i in range(len(prompts)):
            self.usage.requests += 1
            self.usage.prompt_tokens += answers[i].prompt_tokens
            self.usage.completion_tokens += answers[i].completion_tokens
        return [answers[i].text for i in range(len(prompts))]

    async def _complete_async(self, prompts, missing, params, sample_index, record, bar) -> None:
        """At most `concurrency` requests in flight; each answer goes into the ledger as soon as it arrives,
        so a run killed halfway loses only the requests still in flight."""
        gate = asyncio.Semaphore(max(1, self.concurrency))
        async with self.backend.open() as client:
            async def one(i: int) -> None:
                async with gate:
                    entry = await self.backend.acomplete(client, prompts[i], params, sample_index)
                record(i, entry)
                bar.update()

            tasks = [asyncio.create_task(one(i)) for i in missing]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()


def make_client(config: dict, *, generator, ledger, recipe: str = "") -> Client:
    """The client a recipe's `[generate]` section asks for. `generator` is the resolved local model (a folder
    path) for the local backend."""
    from pathlib import Path

    from pipeline.store import input_digest

    if config["backend"] == "openai":
        backend = OpenAIBackend(config["model"], api=config["api"], base_url=config["base_url"],
                                api_key_env=config["api_key_env"])
        model_id = config["model"]
    else:
        ref = str(generator if generator is not None else config["model"])
        # A local model is identified by its content when it is an artifact folder, else by its name.
        is_artifact = (Path(ref) / "manifest.json").is_file()
        model_id = f"{config['model']}@{input_digest(Path(ref))[:16]}" if is_artifact else ref
        backend = LocalBackend(ref, model_id)
    return Client(backend=backend, ledger=Ledger(Path(ledger)), model_id=model_id, recipe=recipe,
                  concurrency=config["concurrency"], usage=Usage(price_per_1k_tokens=config["price_per_1k_tokens"]))
