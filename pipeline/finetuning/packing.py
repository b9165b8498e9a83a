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
