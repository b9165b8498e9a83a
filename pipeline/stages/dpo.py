"""Stage `dpo`: direct preference optimisation with TRL's `DPOTrainer` (LoRA, QLoRA, full or freeze).

Contract: reads every `[train.<name>]` with `method = "dpo"` (`beta`, `loss_type`, `precompute_ref_log_probs`,
`max_length` and the trainer keys; `model.chat_template`); consumes the start model (`from`: usually an SFT
stage's model, `artifacts/<recipe>/models/<from>/`) and the canonical preference datasets named in `data` (every
preference dataset of the recipe when empty); writes `artifacts/<recipe>/dpo/<name>/` (an adapter, provided as
`trained` for the merge stage) or, for full and freeze fine-tuning, `artifacts/<recipe>/models/<name>/` (the model,
provided as `model`).

The reference model is the start model: for LoRA / QLoRA it is the policy with its adapter disabled (TRL's way,
no second copy in memory); for full and freeze fine-tuning it is loaded again, frozen. The prompt and both answers
are rendered with the recipe's chat template by TRL. `train_log.jsonl` holds loss, learning rate, grad norm and
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies per logging step.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.errors import TunebuildError
from pipeline.stage import Stage

STAGE = Stage(name="dpo", version=1, phase="train", section="train.<name>",
              doc="Direct preference optimisation with TRL's DPOTrainer (LoRA, QLoRA, full, freeze).")


def tasks(plan):
    from pipeline.training import train_tasks

    yield from train_tasks(plan, STAGE, "dpo", "preference", "training stage {name}: DPO ({finetuning}) from {base}")


def run(out_dir: Path, *, base_model: str, base_ref: str, stage_name: str, data: dict, chat_template: Path,
        config: dict, scratch: Path | None = None, report_to: str = "none") -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipeline import training
    from pipeline.hf import load_causal_lm

    c = config
    where, prec, model, tokenizer, peft_config, template = training.prepare(base_model, base_ref, stage_name, c,
                                                                            chat_template)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
             for r in training.load_mixture(data, c["data"], "preference", where)]
    ref_model = None
    if peft_config is None:  # full / freeze: the start model, frozen, is the reference
        ref_model, _ = load_causal_lm(base_model, dtype="float32", with_tokenizer=False)
        ref_model.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory(prefix="tunebuild-dpo-") as tmp:
        output_dir = str(scratch) if scratch is not None else tmp
        args = DPOConfig(**training.common_args(c, output_dir, prec, report_to), max_length=c["max_length"],
                         beta=c["beta"], loss_type=[c["loss_type"]],
                         precompute_ref_log_probs=c["precompute_ref_log_probs"])
        try:
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(pairs),
                                 processing_class=tokenizer, peft_config=peft_config)
        except Exception as e:  # a chat template TRL cannot apply to the pairs, ...
            if isinstance(e, TunebuildError):
                raise
            raise TunebuildError(f"{where}: preparing the preference pairs failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        fitted = training.fit(trainer, scratch, where)
    return training.finish(out_dir, trainer, tokenizer, peft_config, base_ref, template, fitted,
                           {"method": "dpo", "finetuning": c["finetuning"], "pairs": len(pairs), "precision": prec,
                            "beta": c["beta"], "loss_type": c["loss_type"]})
