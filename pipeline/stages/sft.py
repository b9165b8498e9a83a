"""Stage `sft`: supervised fine-tuning with TRL's `SFTTrainer` (LoRA, QLoRA, full or freeze).

Contract: reads every `[train.<name>]` with `method = "sft"` (and `model.base`, `model.chat_template`); consumes
the start model (`from = "base"` or another stage's model, `artifacts/<recipe>/models/<from>/`) and the canonical
datasets named in `data` (every SFT dataset of the recipe when empty), each optionally capped (`limit`) or
weighted (`weight`: 2 = every example twice, 0.5 = a fixed half); writes `artifacts/<recipe>/sft/<name>/` (an
adapter, provided as `trained` for the merge stage) or, for full and freeze fine-tuning,
`artifacts/<recipe>/models/<name>/` (the model itself, provided as `model`).

Each canonical `messages` record is rendered with the recipe's chat template and tokenized here, with a
completion mask over every assistant turn (the loss is on the answers of all turns, not only the last one); TRL
then trains on `input_ids` + `completion_mask` (`completion_only_loss`); where TRL's fused LM head has no kernel
(a CPU), the loss projects the LM head at the assistant tokens only (`pipeline.finetuning.sft_loss`).
Conversations longer than `max_length` are truncated; one with no answer token left is dropped. Kept, truncated and dropped counts go to
`train_summary.json` and the console, and the stage fails when more than `max_dropped_fraction` is dropped
(TRL would otherwise drop such examples silently). `train_log.jsonl` holds loss, learning rate and grad norm per
logging step; no timings, so an identical run gives an identical artifact.

With `packing = true` TRL packs the conversations best-fit into `max_length` rows, attention kept inside each
conversation (padding-free for flash attention, rows of their own for sdpa / eager: `pipeline.finetuning.packing`); the summary counts the tokens trained, those with a loss, the padding
share and the packing efficiency. Several processes (`processes`, one per GPU the task holds by default; `strategy`: ddp, fsdp, zero2, zero3) run
`train` in every rank under `accelerate launch` (`pipeline.finetuning.launch`); rank 0 alone writes the output.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.errors import TunebuildError

STAGE = Stage(name="sft", version=8, phase="train", section="train.<name>", gpus="train.<name>.gpus",
              doc="Supervised fine-tuning with TRL's SFTTrainer (LoRA, QLoRA, full, freeze).")


def localize(out_dir: Path, *, base_model: str, **_) -> dict:
    """This task's own adapter_config.json: the adapter names its recipe's start folder (the run cache keeps it
    portable; see `pipeline.finetuning.training.localize_adapter`)."""
    from pipeline.finetuning.training import localize_adapter

    return localize_adapter(out_dir, base_model)


def tasks(plan):
    from pipeline.core.train_tasks import train_tasks

    yield from train_tasks(plan, STAGE, "sft", "sft", "training stage {name}: SFT ({finetuning}) from {base}")


def tokenize_conversations(conversations: list[list[dict]], tokenizer, max_length: int,
                           template: Path) -> tuple[list[dict], dict]:
    """`input_ids` and `completion_mask` (1 on every assistant turn's tokens,
    `pipeline.finetuning.chat_templates.assistant_spans`) per conversation, truncated to `max_length`; conversations
    with no answer token left are dropped. Returns (rows, counts)."""
    from pipeline.finetuning.chat_templates import TemplateError, assistant_spans

    rows, truncated, dropped = [], 0, 0
    for n, msgs in enumerate(conversations):
        try:
            full, mask = assistant_spans(tokenizer, msgs)
        except TemplateError as e:
            raise TunebuildError(f"{template}: training conversation {n + 1}: {e}") from None
        except Exception as e:  # jinja2 errors, raise_exception() in the template, ...
            raise TunebuildError(f"{template}: the chat template fails on training conversation {n + 1}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if len(full) > max_length:
            truncated += 1
            full, mask = full[:max_length], mask[:max_length]
        if not any(mask):
            dropped += 1
            continue
        rows.append({"input_ids": full, "completion_mask": mask})
    counts = {"examples": len(conversations), "kept": len(rows), "truncated": truncated, "dropped": dropped}
    return rows, counts


def run(out_dir: Path, *, scratch: Path | None = None, **kwargs) -> dict:
    """`train` in this process, or in `processes` ranks under `accelerate launch` (`pipeline.finetuning.launch`); rank 0
    writes `out_dir`."""
    from pipeline.finetuning import launch

    return launch.run(train, out_dir, {**kwargs, "scratch": scratch}, f"train.{kwargs['stage_name']}")


def train(out_dir: Path, *, base_model: str, base_ref: str, stage_name: str, data: dict, chat_template: Path,
        config: dict, scratch: Path | None = None, report_to: str = "none",
        gradient_checkpointing: bool = False) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.finetuning import packing, sft_loss, training

    c = config
    where, prec, model, tokenizer, peft_config, template = training.prepare(base_model, base_ref, stage_name, c,
                                                                            chat_template, gradient_checkpointing)
    conversations = [r["messages"] for r in training.load_mixture(data, c["data"], "sft", where)]
    rows, counts = tokenize_conversations(conversations, tokenizer, c["max_length"], chat_template)
    print(f"sft {stage_name}: {counts['examples']} training conversations: {counts['kept']} kept, "
          f"{counts['truncated']} truncated to max_length {c['max_length']}, {counts['dropped']} dropped (no answer "
          f"token within max_length)", flush=True)
    if counts["dropped"] > c["max_dropped_fraction"] * counts["examples"] or not counts["kept"]:
        why = "none is left to train on" if not counts["kept"] else \
            f"more than max_dropped_fraction = {c['max_dropped_fraction']}"
        raise TunebuildError(f"{where}.max_length: {counts['dropped']} of {counts['examples']} training "
                             f"conversations have no answer token within {c['max_length']} tokens ({why}): "
                             f"raise max_length")
    with tempfile.TemporaryDirectory(prefix="tunebuild-sft-") as tmp:
        output_dir = str(scratch) if scratch is not None else tmp
        args = SFTConfig(**training.common_args(c, output_dir, prec, report_to, gradient_checkpointing),
                         max_length=c["max_length"], completion_only_loss=True, **packing.sft_args(c))
        trainer_cls = packing.counting(sft_loss.on_label_positions(SFTTrainer))
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, peft_config=peft_config)
        packing.dense_rows(trainer)
        fitted = training.fit(trainer, scratch, where)
    tokens = packing.summary(trainer, c)
    print(f"sft {stage_name}: {packing.describe(tokens, c)}", flush=True)
    return training.finish(out_dir, trainer, tokenizer, peft_config, base_model, template, fitted,
                           {"method": "sft", "finetuning": c["finetuning"], **counts, "precision": prec,
                            "packing": c["packing"], **tokens})
