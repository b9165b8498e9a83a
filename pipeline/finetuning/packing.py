"""Packing SFT conversations, and counting what a training trained on.

`train.<name>.packing = true` hands the stage's rows (`input_ids` + `completion_mask`, one per conversation) to
TRL's own packing: `SFTConfig(packing=True, packing_strategy="bfd")`. TRL builds the labels from the completion mask
first (so the loss stays on assistant tokens), then packs whole conversations best-fit-decreasing into rows of
`max_length` tokens, keeping each one's length (`seq_lengths`). Best-fit packing implies padding-free batches: the
collator concatenates a batch's rows into one sequence with `position_ids` restarting at 0 for each conversation
(and the label of each conversation's first token set to -100), and no attention mask. transformers reads the
boundaries back from the position ids: `sdpa` and `eager` get a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`), flash attention its varlen kernel (`cu_seq_lens`). No token
attends across a conversation's boundary, and the per-token loss of a packed batch is the unpacked one
(tests/test_packing.py).

Flash attention's varlen kernel attends inside each conversation of that one flat row at the cost of the
conversations themselves. `sdpa` and `eager` (a CPU, or a GPU without flash-attn) have no such kernel: they
compute the whole flat row's `(batch x max_length)^2` scores and mask most of them away. For them the stage keeps
TRL's packed rows as rows (`dense_rows`): a `(batch, longest row)` batch, each row's position ids restarting at
every conversation and its padded tail a segment of its own that carries no label, still without an attention
mask, so transformers builds the same block-diagonal mask per row: a row's attention costs `max_length^2`, as in
LLaMA-Factory's neat packing (measured: the forward of four 512-token rows in ~0.87x the flat row's time, on a
Qwen1.5-0.5B shape on this CPU). The loss and what attends to what are the same (tests/test_packing.py); the
padded tails are slots fed, not tokens trained.

Packing changes what a step holds: a row carries several conversations, so an epoch takes fewer steps and a
`max_steps` run trains on more tokens. The summary says how much: `tokens_trained` (non-pad tokens fed to the model,
all processes), `loss_tokens` (those with a loss), `padding_share` (pad slots / all slots fed), and, packed,
`packed_rows` and `packing_efficiency` (the conversations' tokens / (rows x max_length)). All are counts of a
deterministic run: a rebuild writes the same numbers, and a resumed run counts from its checkpoint on (the counts
are saved in each checkpoint's trainer_state.json).
"""
from __future__ import annotations


def sft_args(config: dict) -> dict:
    """The SFTConfig arguments of packing (TRL's names)."""
    if not config.get("packing"):
        return {"packing": False}
    return {"packing": True, "packing_strategy": "bfd", "padding_free": True}


def varlen_attention(model) -> bool:
    """Whether `model` attends with a varlen (flash) kernel, which takes the padding-free flat row as it is."""
    return "flash" in (getattr(model.config, "_attn_implementation", None) or "")


TOKENS = "tunebuild_tokens"   # a dense-rows batch's non-pad token count; `counting` takes it out


class DenseRows:
    """TRL's best-fit packed rows (`input_ids`, `labels`, `seq_lengths`) as a `(rows, longest row)` batch for dense
    attention: position ids restart at each conversation, each conversation's first label is -100 (as TRL's
    padding-free collator sets it: no token is predicted across a boundary), and a row's padded tail is one more
    segment, of pad tokens without labels. No attention mask, so transformers reads the boundaries per row."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, labels, positions = [], [], []
        for e in examples:
            n = len(e["input_ids"])
            pad = width - n
            pos = torch.cat([torch.arange(length) for length in e["seq_lengths"]] + [torch.arange(pad)])
            row_labels = torch.cat([torch.tensor(e.get("labels", e["input_ids"])), torch.full((pad,), -100)])
            row_labels[pos == 0] = -100
            ids.append(torch.cat([torch.tensor(e["input_ids"]), torch.full((pad,), self.pad_token_id)]))
            labels.append(row_labels)
            positions.append(pos)
        tokens = torch.tensor(sum(len(e["input_ids"]) for e in examples))
        return {"input_ids": torch.stack(ids), "labels": torch.stack(labels), "position_ids": torch.stack(positions),
                TOKENS: tokens}


def dense_rows(trainer) -> None:
    """A packed trainer feeds dense attention `DenseRows` instead of one flat padding-free row."""
    if trainer.args.packing and not varlen_attention(trainer.model):
        collator = trainer.data_collator
        trainer.data_collator = DenseRows(collator.pad_token_id, getattr(collator, "pad_to_multiple_of", None))


def counter():
    """A callback holding the token counts; saved in every checkpoint, taken back when a run resumes from one."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TokenCount(TrainerCallback, ExportableState):
        def __init__(self):
            self.tokens = self.loss_tokens = self.slots = 0

        def add(self, tokens: int, loss_tokens: int, slots: int) -> None:
            self.tokens += tokens
            self.loss_tokens += loss_tokens
            self.slots += slots

        def state(self) -> dict:
            return {"args": {}, "attributes": {"tokens": self.tokens, "loss_tokens": self.loss_tokens,
                                               "slots": self.slots}}

        def on_train_begin(self, args, state, control, **kwargs):
            saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step else None
            if isinstance(saved, list):
                saved = saved[-1] if saved else None
            self.tokens = self.loss_tokens = self.slots = 0
            if saved:
                self.add(**saved["attributes"])

    return TokenCount()


def counting(trainer_cls):
    """`trainer_cls` counting, at every micro-batch it trains on (summed over the processes), the non-pad tokens,
    those with a loss, and the slots fed (tokens + padding) into its `token_count` callback."""

    class Counting(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_count = counter()
            self.add_callback(self.token_count)

        def training_step(self, model, inputs, num_items_in_batch=None):
            import torch

            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            tokens = inputs.pop(TOKENS, None)                                   # dense packed rows
            if tokens is None:
                tokens = mask.sum() if mask is not None else torch.tensor(ids.numel())  # padding-free: no padding
            labels = inputs["labels"]
            slots = torch.tensor(ids.numel(), device=ids.device)
            counts = torch.stack([tokens.to(ids.device), (labels[:, 1:] != -100).sum(), slots])
            counts = self.accelerator.reduce(counts.to(torch.int64), reduction="sum")
            self.token_count.add(*(int(x) for x in counts.tolist()))
            return super().training_step(model, inputs, num_items_in_batch)

    Counting.__name__ = Counting.__qualname__ = f"Counting{trainer_cls.__name__}"
    return Counting


def summary(trainer, config: dict) -> dict:
    """The token counts of a finished run, for train_summary.json."""
    c = trainer.token_count
    out = {"tokens_trained": c.tokens, "loss_tokens": c.loss_tokens,
           "padding_share": round(1 - c.tokens / c.slots, 6) if c.slots else 0.0, "packing_efficiency": None}
    if config.get("packing"):
        lengths = [sum(x) for x in trainer.train_dataset["seq_lengths"]]
        out["packed_rows"] = len(lengths)
        out["packing_efficiency"] = round(sum(lengths) / (len(lengths) * config["max_length"]), 6) if lengths else 0.0
    return out


def describe(counts: dict, config: dict) -> str:
    """The counts in one line for the console."""
    text = (f"{counts['tokens_trained']} tokens trained ({counts['loss_tokens']} with a loss), "
            f"{counts['padding_share']:.1%} of the slots fed were padding")
    if config.get("packing"):
        text += (f"; packed into {counts['packed_rows']} rows of max_length {config['max_length']} "
                 f"({counts['packing_efficiency']:.1%} full)")
    return text
