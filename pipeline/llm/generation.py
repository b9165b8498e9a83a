"""Batched generation with a transformers model: many prompts at once, each answer as if it were alone.

`HFEngine(model_path).generate(prompts, max_new_tokens=...)` decodes a list of already-rendered prompts:

- Prompts are sorted by length and cut into batches: `batch_size` at most, fewer where the batch's KV cache would
  not fit in half the device's free memory, halved and retried on an out-of-memory error.
- A batch's prompts go through the model in groups of similar length (each group left-padded to its own longest,
  `PREFILL_TOKENS` padded tokens at most, padding under `PREFILL_WASTE`), with position ids counted from each
  row's first real token, and only the last position's logits computed. Their keys and values are laid into one
  preallocated cache (transformers' static cache layer) that holds each prompt right-aligned and leaves room for
  the answers, which the decode writes in place, a column per step (no copy of the cache per token).
- Decoding is one loop over the batch; a row stops at any of its stop token ids (the generation config's EOS ids,
  which include the chat template's end of turn) or at `max_new_tokens`. When a quarter of the rows have ended
  they leave the batch and its cache, and the batch stops when every row has.
- A row sees exactly what it would see alone: greedy answers equal one-at-a-time `generate` (tested on the tiny
  model and on a 2-layer Llama whose answers vary token by token, also with rows ending early).
- Sampling (`temperature` > 0) draws each row's tokens from its own generator seeded by the caller (`seeds`), so
  a request samples the same text whichever batch it lands in.
- Answers come back in the prompts' order, with prompt and completion token counts.

A library module: it knows neither the build core nor the stages.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

DEFAULT_BATCH_SIZE = 32
# the most (padded) tokens one prompt-processing forward takes, and the padding a group of prompts may carry
PREFILL_TOKENS = 4096
PREFILL_WASTE = 0.125


def prefill_groups(lengths: list[int], budget: int = PREFILL_TOKENS) -> list[list[int]]:
    """The rows (indices into `lengths`) that share a prompt forward: longest first, a group grows while its
    padded size stays within `budget` tokens and its padding within PREFILL_WASTE of that (a prompt longer than
    the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    groups: list[list[int]] = []
    for k in order:
        if groups:
            group = groups[-1]
            longest, size = lengths[group[0]], len(group) + 1
            real = sum(lengths[j] for j in group) + lengths[k]
            if size * longest <= budget and real >= (1 - PREFILL_WASTE) * size * longest:
                group.append(k)
                continue
        groups.append([k])
    return groups


def _text_config(config):
    """A model's config, or a multimodal one's text part."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim(config) -> int | None:
    """The size of one attention head, from a model's config; None where the config does not say."""
    text = _text_config(config)
    head = getattr(text, "head_dim", None)
    if head:
        return int(head)
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return int(hidden) // int(heads) if hidden and heads else None


def kv_bytes_per_token(config, itemsize: int) -> int | None:
    """A KV cache's bytes per token (every layer's keys and values, `itemsize` bytes a number), from a model's
    config (a multimodal one's text config); None where the config does not say."""
    text, head = _text_config(config), head_dim(config)
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None)
    if not (head and layers and heads):
        return None
    return 2 * int(layers) * int(heads) * head * int(itemsize)


def free_memory(device) -> int | None:
    """Bytes free on `device`: the GPU's free memory, or the machine's available memory for a CPU (Linux); None
    where that cannot be read."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


@functools.lru_cache(maxsize=1)
def _slots():
    """transformers' static cache layer (K/V preallocated for the whole answer, written in place: no copy of the
    cache per step), which can also drop the rows whose answers ended."""
    from transformers.cache_utils import StaticLayer

    class Slots(StaticLayer):
        def batch_select_indices(self, indices) -> None:
            self.keys = self.keys.index_select(0, indices)
            self.values = self.values.index_select(0, indices)
            self.batch_size = int(indices.shape[0])

    return Slots


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
            batch = batch[:self._fitting(len(encoded[batch[0]]), max_new_tokens, len(batch))]
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

    def kv_bytes_per_token(self) -> int | None:
        """The model's KV cache bytes per token (see `kv_bytes_per_token`)."""
        try:
            itemsize = next(self.model.parameters()).element_size()
        except StopIteration:
            return None
        return kv_bytes_per_token(self.model.config, itemsize)

    def _fitting(self, width: int, max_new_tokens: int, rows: int) -> int:
        """How many of `rows` prompts (the longest `width` tokens) to decode at once: as many as fit in half the
        memory free on the model's device (each row's cache holds `width + max_new_tokens` tokens, and its prompt's
        K/V once more while the cache is filled), at least one."""
        per_token, free = self.kv_bytes_per_token(), free_memory(self.model.device)
        if not per_token or not free:
            return rows
        return max(1, min(rows, int(free // 2 // ((2 * width + max_new_tokens) * per_token))))

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _decode(self, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                seeds: list[int] | None) -> list[list[int]]:
        import torch

        device = self.model.device
        n, width = len(rows), max(len(r) for r in rows)
        gens = None
        if temperature > 0:
            gens = [torch.Generator(device="cpu").manual_seed(int(s) % (2 ** 63)) for s in (seeds or [0] * n)]
        stop = torch.tensor(self.stop_ids or [-1], device=device)
        new: list[list[int]] = [[] for _ in rows]
        with torch.no_grad():
            cache, logits = self._prefill(rows, width, width + max_new_tokens)
            # the batch's mask over the whole cache: each prompt ends at column `width` (left padding before it),
            # the answers' tokens take the columns from `width` on, one per step
            mask = torch.zeros((n, width + max_new_tokens), dtype=torch.long, device=device)
            for k, r in enumerate(rows):
                mask[k, width - len(r):width] = 1
            positions = torch.tensor([[len(r)] for r in rows], dtype=torch.long, device=device)
            live = list(range(n))                                   # the batch's rows -> the prompts they answer
            finished = torch.zeros(n, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                nxt = self._pick(logits, temperature, top_p, gens)
                for k, token, f in zip(live, nxt.tolist(), finished.tolist()):
                    if not f:
                        new[k].append(token)
                finished = finished | torch.isin(nxt, stop)
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                if 4 * int(finished.sum()) >= len(live):
                    # a quarter of the rows have ended: they leave the batch and the cache, the others go on
                    keep = torch.nonzero(~finished).flatten()
                    cache.batch_select_indices(keep)
                    mask, positions, nxt = mask[keep], positions[keep], nxt[keep]
                    live = [live[k] for k in keep.tolist()]
                    gens = [gens[k] for k in keep.tolist()] if gens is not None else None
                    finished = finished[keep]
                mask[:, width + step] = 1
                out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                                 use_cache=True, **{self.cache_arg: cache})
                positions = positions + 1
                logits = out.logits[:, -1, :].float()
        # the stop token ends the answer; it is not part of it
        return [r[:-1] if r and r[-1] in self.stop_ids else r for r in new]

    def _prefill(self, rows: list[list[int]], width: int, length: int):
        """The prompts' forward pass: (a cache of `length` columns per row holding each prompt right-aligned at
        column `width`, the last position's logits of each prompt). Prompts of similar length share a forward
        (left-padded to the group's longest, at most PREFILL_TOKENS padded tokens), so padding costs little."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import Cache

        device = self.model.device
        parts, logits = [], torch.empty(0)
        for group in prefill_groups([len(r) for r in rows], PREFILL_TOKENS):
            gw = max(len(rows[k]) for k in group)
            ids = torch.full((len(group), gw), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), gw), dtype=torch.long)
            for j, k in enumerate(group):
                ids[j, gw - len(rows[k]):] = torch.tensor(rows[k])
                mask[j, gw - len(rows[k]):] = 1
            ids, mask = ids.to(device), mask.to(device)
            part = DynamicCache()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             use_cache=True, **{self.cache_arg: part}, **self.last_logits)
            last = out.logits[:, -1, :].float()
            if not len(logits):
                logits = last.new_empty((len(rows), last.shape[-1]))
            index = torch.tensor(group, device=device)
            logits[index] = last
            parts.append((index, gw, part))
        cache = Cache(layers=[_slots()(max_cache_len=length) for _ in parts[0][2].layers])
        for i in range(len(cache.layers)):
            k0, v0 = parts[0][2].layers[i].keys, parts[0][2].layers[i].values
            keys = k0.new_zeros((len(rows), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(rows), v0.shape[1], width, v0.shape[3]))
            for group, gw, part in parts:
                layer = part.layers[i]
                keys[group, :, width - gw:] = layer.keys
                values[group, :, width - gw:] = layer.values
                layer.keys = layer.values = None                    # each prompt's K/V is held once at a time
            cache.update(keys, values, i)
        return cache, logits

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
