"""Stage `sft`: LoRA supervised fine-tuning with TRL's `SFTTrainer`.

The dataset is conversational prompt/completion records, so TRL applies the chat template and computes the
loss on the assistant turn only (`completion_only_loss`). The recipe's chat template replaces the tokenizer's
and is saved with the adapter. Output: the PEFT adapter folder, the tokenizer, and `train_log.jsonl` (loss per
logging step; no timings, so an identical run gives an identical artifact).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.errors import TunebuildError


def _precision(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def run(out_dir: Path, *, base_model: str, base_ref: str, train: Path, chat_template: Path, config: dict) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pipeline.hf import load_causal_lm

    c = config
    precision = _precision(c["precision"])
    model, tokenizer = load_causal_lm(base_model, dtype="float32")
    tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    dataset = load_dataset("json", data_files=str(train), split="train").select_columns(["prompt", "completion"])
    try:
        tokenizer.apply_chat_template(dataset[0]["prompt"] + dataset[0]["completion"], tokenize=False)
    except Exception as e:  # jinja2 errors, raise_exception() in the template, ...
        raise TunebuildError(f"{chat_template}: the chat template fails on a training example: {e}") from None

    log: list[dict] = []

    class KeepLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                       "loss": round(float(logs["loss"]), 6), "learning_rate": float(logs.get("learning_rate", 0.0))}
                log.append(row)

    with tempfile.TemporaryDirectory(prefix="tunebuild-sft-") as scratch:
        args = SFTConfig(
            output_dir=scratch, max_steps=c["max_steps"], num_train_epochs=c["num_epochs"],
            per_device_train_batch_size=c["batch_size"],
            gradient_accumulation_steps=c["gradient_accumulation_steps"], learning_rate=c["learning_rate"],
            lr_scheduler_type=c["lr_scheduler"], warmup_steps=c["warmup_steps"], logging_steps=c["logging_steps"],
            max_length=c["max_length"], completion_only_loss=True, seed=c["seed"], data_seed=c["seed"],
            bf16=precision == "bfloat16", fp16=precision == "float16", save_strategy="no", report_to="none",
            dataloader_num_workers=0, disable_tqdm=False,
        )
        lora = LoraConfig(r=c["lora"]["r"], lora_alpha=c["lora"]["alpha"], lora_dropout=c["lora"]["dropout"],
                          target_modules=c["lora"]["target_modules"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[KeepLoss()])
        result = trainer.train()
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card names the base by local path
    # Name the base the way the recipe does, not by a path on this machine.
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_ref
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    with open(out_dir / "train_log.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    summary = {"steps": result.global_step, "train_loss": round(float(result.training_loss), 6),
               "examples": len(dataset), "precision": precision}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
