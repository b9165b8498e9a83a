"""The SFT loss where TRL's fused LM head has no kernel: the LM head projected at the positions with a label only.

TRL's `SFTTrainer` computes the loss through its chunked log-probability head (`trl.kernels.chunked_logprob`),
which never builds the `(tokens, vocabulary)` logits. Where Triton runs (CUDA, XPU) it scores only the positions
whose next token has a label, in fused kernels; elsewhere (a CPU) it scores every position, prompt and padding
included, in torch tiles that fold the log-sum-exp, the entropy and the top-1 flag in several passes over each tile
and project every tile twice (forward, and again in the backward). On a CPU that head costs more than the rest of
a LoRA step: the SFT stage trained at 0.67x LLaMA-Factory's packed tokens/s on a Qwen1.5-0.5B-shaped model
(`benchmarks/training.py --real-shape`), which projects every position once through the model's own loss.

`on_label_positions(SFTTrainer)` is SFTTrainer with the loss computed, on such devices, as the model computes
logits for generation: the model's own forward with `logits_to_keep` set to the positions whose next token has a
label (the assistant tokens: `completion_mask`; in a packed row, never a conversation's first token; in a batch
of several rows, each row's own where transformers takes a boolean mask there), then one
cross-entropy over those logits, summed and divided by TRL's `num_items_in_batch`, exactly TRL's reduction (and,
like TRL, scaled by the number of processes when the tokens are averaged across them). The forward goes through the
wrapped model (DDP, PEFT), so the gradients are synchronised as TRL's are. TRL's metrics (`entropy`,
`mean_token_accuracy`, `num_tokens`) are kept. Only the positions' logits are held, `label tokens x vocabulary`
floats (about 1.2 GB for 2,048 assistant tokens at Qwen's 151,936): on a CPU's memory that is cheap, which is why
the fused head stays wherever it is compiled. Any other loss (label smoothing, `compute_loss_func`, DFT, an MoE
auxiliary loss, sequence parallelism) is TRL's, unchanged. tests/test_packing.py checks the loss equals TRL's.
"""
from __future__ import annotations


def fused_head_compiled(device) -> bool:
    """Whether TRL's fused LM head runs its Triton kernels on `device` (then it scores the label positions only)."""
    from transformers.utils import is_triton_available

    return device.type in ("cuda", "xpu") and is_triton_available()


def _unwrap(model):
    """The transformers model under DDP and PEFT (PEFT's forward hands the keywords to it)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_MASKS: dict[type, bool] = {}


def _masks_logits(model) -> bool:
    """Whether `model`'s forward takes a `(batch, length)` boolean `logits_to_keep` (transformers' newer
    `slice_logits_to_keep`: the True positions of every row, flattened); an older one would index the sequence
    axis with it, so it gets the union of the rows' positions instead."""
    import sys

    import torch

    cls = type(model)
    if cls not in _MASKS:
        slicer = getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None)
        try:
            probe = slicer(torch.zeros(2, 3, 1), torch.tensor([[True, False, True], [False, False, True]]))
            _MASKS[cls] = tuple(probe.shape) == (3, 1)
        except Exception:
            _MASKS[cls] = False
    return _MASKS[cls]


def on_label_positions(trainer_cls):
    """`trainer_cls` (an `SFTTrainer`) whose plain `nll` loss, where TRL's fused head has no kernel, projects the
    LM head at the label positions only."""
    import inspect

    import torch

    class OnLabelPositions(trainer_cls):
        def _plain_loss(self, model) -> bool:
            args = self.args
            sequence_parallel = getattr(getattr(self.accelerator, "parallelism_config", None), "sp_enabled", False)
            base = _unwrap(model)
            return (self.compute_loss_func is None and self.label_smoother is None
                    and getattr(args, "loss_type", "nll") == "nll" and not self.aux_loss_enabled
                    and not sequence_parallel and not fused_head_compiled(next(base.parameters()).device)
                    and "logits_to_keep" in inspect.signature(base.forward).parameters)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self._plain_loss(model):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"][:, 1:]
            labelled = labels != -100                           # positions whose next token has a label
            if labels.shape[0] > 1 and _masks_logits(_unwrap(model)):
                keep, targets = torch.nn.functional.pad(labelled, (0, 1), value=False), labels[labelled]
            else:   # one row (padding-free): exact; several: the positions labelled in any row
                keep = labelled.any(0).nonzero().flatten()
                targets = labels[:, keep]
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            logits = model(**forward, use_cache=False, logits_to_keep=keep).logits
            mask = targets != -100
            logits = logits.float().reshape(-1, logits.shape[-1])
            loss = torch.nn.functional.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            with torch.no_grad():
                flat = mask.flatten()
                valid = logits[flat]
                log_z = valid.logsumexp(-1)
                entropy = (log_z - (valid.softmax(-1) * valid).sum(-1)).sum()
                correct = (valid.argmax(-1) == targets.flatten()[flat]).sum()
            self._record(mode, inputs, mask.sum(), entropy, correct)
            return loss

        def _record(self, mode, inputs, num_valid, entropy, correct) -> None:
            """TRL's per-step metrics, as its own `compute_loss` records them."""
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(num_valid).sum()
            entropy, correct = gather(entropy).sum(), gather(correct).sum()
            self._metrics[mode]["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
            if mode == "train":
                if "attention_mask" in inputs:
                    tokens = gather(inputs["attention_mask"].sum()).sum().item()
                else:  # packed: every slot (padding-free: each a token; dense rows: their padded tails too)
                    ids = inputs["input_ids"]
                    tokens = gather(torch.tensor(ids.numel(), device=ids.device)).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    OnLabelPositions.__name__ = OnLabelPositions.__qualname__ = trainer_cls.__name__
    return OnLabelPositions
