"""Batched generation with a transformers model: many prompts at once, each answer as if it were alone.

`HFEngine(model_path).generate(prompts, max_new_tokens=...)` decodes a list of already-rendered prompts:

- Prompts are sorted by length and cut into batches (`batch_size`, halved and retried on an out-of-memory error,
  so it adapts to the device), left-padded, with position ids counted from each row's first real token, so a row
  sees exactly what it would see alone: greedy answers equal one-at-a-time answers (tested on the tiny model).
- Decoding is one loop over the batch with the model's KV cache; a row stops at any of its stop token ids (the
  generation config's EOS ids, which include the chat template's end of turn) or at `max_new_tokens`, and the
  batch stops when every row has.
- Sampling (`temperature` > 0) draws each row's tokens from its own generator seeded by the caller (`seeds`), so
  a request samples the same text whichever batch it lands in.
- Answers come back in the prompts' order, with prompt and completion token counts.

A library module: it knows neither the build core nor the stages.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH_SIZE = 16


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


class HFEngine:
    name = "hf"

    def __init__(self, model_path: str, *, batch_size: int = DEFAULT_BATCH_SIZE, model=None, tokenizer=None):
        if model is None:
            from pipeline.models.hf import load_causal_lm

            model, tokenizer = load_causal_lm(model_path)
        self.model, self.tokenizer = model, tokenizer
        self.model.eval()
        self.batch_size = max(1, batch_size)
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = sorted(set(eos) | {tokenizer.eos_token_id})
        self.stop_ids = eos
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 4096
        import inspect

        # transformers renamed `past_key_values` to `cache` (5.2x); take whichever this version has
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # the prompt's forward projects its last position only (the others' logits are never read)
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids (an empty prompt starts from the BOS token, or the pad token)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else self.pad_id]
        return ids

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seeds: list[int] | None = None, skip_special_tokens: bool = True) -> list[Completion]:
        """Completions of `prompts`, in their order."""
        room = max(1, self.context - max_new_tokens)
        encoded = [self.encode(p)[-room:] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        out: dict[int, Completion] = {}
        start = 0
        size = self.batch_size
        while start < len(order):
            batch = order[start:start + size]
            try:
                tokens = self._decode([encoded[i] for i in batch], max_new_tokens, temperature, top_p,
                                      [seeds[i] for i in batch] if seeds is not None else None)
            except (RuntimeError, MemoryError) as e:
                if size > 1 and _is_oom(e):
                    self._free()
                    size = max(1, size // 2)
                    continue
                raise
            for i, new in zip(batch, tokens):
                text = self.tokenizer.decode(new, skip_special_tokens=skip_special_tokens)
                out[i] = Completion(text, len(encoded[i]), len(new))
            start += len(batch)
        return [out[i] for i in range(len(prompts))]

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _decode(self, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                seeds: list[int] | None) -> list[list[int]]:
        import torch
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            if r:
                ids[k, width - len(r):] = torch.tensor(r)
                mask[k, width - len(r):] = 1
        ids, mask = ids.to(device), mask.to(device)
        gens = None
        if temperature > 0:
            gens = [torch.Generator(device="cpu").manual_seed(int(s) % (2 ** 63)) for s in (seeds or [0] * len(rows))]
        stop = torch.tensor(self.stop_ids or [-1], device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new: list[list[int]] = [[] for _ in rows]
        cache = DynamicCache()
        step_ids, step_mask = ids, mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=step_ids, attention_mask=step_mask, position_ids=positions,
                                 use_cache=True, **{self.cache_arg: cache}, **self.last_logits)
                logits = out.logits[:, -1, :].float()
                nxt = self._pick(logits, temperature, top_p, gens)
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                for k in torch.nonzero(~done).flatten().tolist():
                    new[k].append(int(nxt[k]))
                done = done | torch.isin(nxt, stop)
                if bool(done.all()):
                    break
                step_mask = torch.cat([step_mask, torch.ones((len(rows), 1), dtype=step_mask.dtype,
                                                             device=device)], dim=-1)
                positions = positions[:, -1:] + 1
                step_ids = nxt[:, None]
        # the stop token ends the answer; it is not part of it
        return [r[:-1] if r and r[-1] in self.stop_ids else r for r in new]

    @staticmethod
    def _pick(logits, temperature: float, top_p: float, gens):
        import torch

        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
        picks = [torch.multinomial(probs[k].cpu(), 1, generator=g) for k, g in enumerate(gens)]
        return torch.cat(picks).to(logits.device)
