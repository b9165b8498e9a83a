"""What the training stages (sft, dpo) share when they run: the dataset mixture, loading the model for a
fine-tuning mode (lora, qlora, full, freeze), the trainer's common arguments, resuming from checkpoints, the log
history, and saving a model folder that loads anywhere. Heavy imports (torch, transformers, peft) happen inside the
functions.

Declaring the training stages' tasks, and where a trained model lives, is the build core's part:
`pipeline.core.train_tasks`.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import TunebuildError

ADAPTER_MODES = ("lora", "qlora")
# how a training runs, not what it computes (gradient checkpointing: bitwise the same gradients): not keyed
UNKEYED = ("report_to", "gradient_checkpointing")
LOG_KEYS = ("loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies")


def take(records: list[dict], limit: int, weight: float, seed: str) -> list[dict]:
    """A dataset's share of the mixture: the first `limit` records (0: all), then `weight` times over (whole
    copies, plus a fixed sample for the fraction)."""
    import random

    records = records[:limit] if limit else records
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(records, round(frac * len(records))) if frac else []
    return records * whole + extra


def load_mixture(data: dict, mix: list[dict], kind: str, where: str) -> list[dict]:
    """The training records of the mixture, in the mixture's order; each dataset must be of `kind`."""
    from pipeline.data.dataset import kind_of, read_records

    out = []
    for m in mix:
        records = read_records(Path(data[m["name"]]) / "train.jsonl")
        if records and kind_of(records[0]) != kind:
            what = "preference pairs (prompt/chosen/rejected)" if kind_of(records[0]) == "preference" else \
                "conversations (messages)"
            raise TunebuildError(f"{where}.data: dataset {m['name']!r} holds {what}; this method trains on "
                                 f"{'conversations' if kind == 'sft' else 'preference pairs'}")
        out += take(records, m["limit"], m["weight"], m["name"])
    if not out:
        raise TunebuildError(f"{where}.data: the datasets hold no training example")
    return out


def check_target_modules(model, targets: list[str], base_ref: str, where: str = "lora") -> None:
    """Every target module name matches modules of the model (PEFT matches by name suffix); else one line
    listing the linear layers the model has."""
    import torch

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TunebuildError(f"{where}: {', '.join(map(repr, missing))} match(es) no module of {base_ref}; its "
                             f"linear layers are named {', '.join(linear)}")


def load_for_training(base_model: str, base_ref: str, t: dict, where: str, prec: str,
                      gradient_checkpointing: bool = False):
    """(model, tokenizer, peft_config or None) for the stage's fine-tuning mode, loaded in the dtype it trains in
    (`pipeline.finetuning.precision`) on this process's device.

    lora: the model plus a LoraConfig (TRL wraps it); qlora: the model loaded in 4-bit nf4 with double quantisation
    through bitsandbytes, computing in `prec` (in float32 prepared with `prepare_model_for_kbit_training`), plus a
    LoraConfig; full: every parameter trains; freeze: only `freeze.trainable_modules` and the last
    `freeze.last_layers` decoder layers train."""
    from peft import LoraConfig

    from pipeline.finetuning import precision
    from pipeline.models.hf import load_causal_lm

    mode = t["finetuning"]
    dtype = precision.load_dtype(prec, mode)
    kwargs = precision.load_kwargs(t, prec, where)
    if mode == "qlora":
        if not precision.installed("bitsandbytes"):
            raise TunebuildError(f"{where}.finetuning: 'qlora' needs bitsandbytes: pip install -e '.[qlora]'")
        from peft import prepare_model_for_kbit_training

        model, tok = load_causal_lm(base_model, dtype=dtype, quantization_config=precision.quantization(
            dtype, t["strategy"]), **kwargs)
        if dtype == "float32":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        model, tok = load_causal_lm(base_model, dtype=dtype, **kwargs)
    peft_config = None
    if mode in ADAPTER_MODES:
        check_target_modules(model, t["lora"]["target_modules"], base_ref, f"{where}.lora.target_modules")
        peft_config = LoraConfig(r=t["lora"]["r"], lora_alpha=t["lora"]["alpha"], lora_dropout=t["lora"]["dropout"],
                                 target_modules=sorted(t["lora"]["target_modules"]), task_type="CAUSAL_LM")
    elif mode == "freeze":
        freeze_except(model, t["freeze"]["trainable_modules"], t["freeze"]["last_layers"], base_ref, where)
    return model, tok, peft_config


def freeze_except(model, modules: list[str], last_layers: int, base_ref: str, where: str) -> int:
    """Freeze every parameter but those of the named modules (by name suffix) and of the last N decoder layers.
    Returns the number of trainable parameters."""
    import re

    if modules:
        check_target_modules(model, modules, base_ref, f"{where}.freeze.trainable_modules")
    layer_ids = sorted({int(m.group(1)) for n, _ in model.named_parameters()
                        if (m := re.search(r"\.layers\.(\d+)\.", n))})
    keep_layers = set(layer_ids[-last_layers:]) if last_layers else set()
    if last_layers > len(layer_ids):
        raise TunebuildError(f"{where}.freeze.last_layers: {last_layers}, but {base_ref} has {len(layer_ids)} layers")
    trainable = 0
    for n, p in model.named_parameters():
        layer = re.search(r"\.layers\.(\d+)\.", n)
        on = (layer is not None and int(layer.group(1)) in keep_layers) or \
            any(f".{m}." in f".{n}" for m in modules)
        p.requires_grad_(on)
        trainable += p.numel() if on else 0
    return trainable


def common_args(t: dict, output_dir: str, prec: str, report_to: str = "none",
                gradient_checkpointing: bool = False) -> dict:
    """The trainer arguments every method shares (TRL's names), with those of `pipeline.finetuning.precision`. With
    `save_steps`, checkpoints go to `output_dir` (the stage's scratch folder)."""
    from pipeline.finetuning.precision import trainer_args

    saving = dict(save_strategy="steps", save_steps=t["save_steps"], save_total_limit=2) if t["save_steps"] else \
        dict(save_strategy="no")
    return dict(output_dir=output_dir, max_steps=t["max_steps"], num_train_epochs=t["num_epochs"],
                per_device_train_batch_size=t["batch_size"],
                gradient_accumulation_steps=t["gradient_accumulation_steps"], learning_rate=t["learning_rate"],
                lr_scheduler_type=t["lr_scheduler"], warmup_steps=t["warmup_steps"], logging_steps=t["logging_steps"],
                seed=t["seed"], data_seed=t["seed"], report_to=report_to, dataloader_num_workers=0,
                disable_tqdm=False, **trainer_args(t, prec, gradient_checkpointing), **saving)


def last_checkpoint(scratch: Path | None) -> Path | None:
    """The newest complete `checkpoint-<step>` in the scratch folder of an interrupted run of the same key."""
    if scratch is None or not Path(scratch).is_dir():
        return None
    done = [p for p in Path(scratch).glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def log_at_checkpoints_and_end():
    """A callback that has the trainer log at every checkpoint and at the last step, besides every
    `logging_steps`: a checkpoint's log history then covers every step before it (the loss of the steps since the
    last log would otherwise be lost with the killed process) and the history ends at the last step, so the mean
    loss over all steps can be read from the log, in a resumed run as in an uninterrupted one."""
    from transformers import TrainerCallback

    class LogAtCheckpointsAndEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after DefaultFlowCallback decided what to do
            if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogAtCheckpointsAndEnd()


def mean_loss(rows: list[dict], steps: int, fallback: float) -> float:
    """The mean training loss over all `steps` steps, from the logged rows (each the mean since the row before),
    rounded as the log is: the same for a resumed run as for an uninterrupted one, whose trainer's own
    `training_loss` only covers the steps since the resume. `fallback` (the trainer's) when the log does not
    reach the last step."""
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not losses or losses[-1][0] != steps:
        return round(float(fallback), 6)
    total, prev = 0.0, 0
    for step, loss in losses:
        total += loss * (step - prev)
        prev = step
    return round(total / steps, 6)


def _logs_to_stderr(trainer) -> None:
    """The trainer's per-step log dicts go to stderr (the task's log file; the terminal with TUNEBUILD_VERBOSE),
    not stdout, which is for the stage's own few lines. The progress bar stays where tqdm puts it."""
    import sys

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, (ProgressCallback, PrinterCallback)):
            def on_log(args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    print(logs, file=sys.stderr, flush=True)
            cb.on_log = on_log


def fit(trainer, scratch: Path | None, where: str) -> tuple[object, int | None, list[dict]]:
    """Train, resuming from the last checkpoint of an interrupted run with the same run-cache key (passed
    explicitly: transformers ignores TrainingArguments.resume_from_checkpoint). Returns (train result, the step
    it resumed from or None, the log history rows: every `logging_steps`, at each checkpoint and at the last
    step, including those of the interrupted run up to its checkpoint)."""
    checkpoint = last_checkpoint(scratch)
    resumed = int(checkpoint.name.split("-")[-1]) if checkpoint else None
    if checkpoint:
        print(f"{where}: resuming from {checkpoint.name} of an interrupted run", flush=True)
    trainer.add_callback(log_at_checkpoints_and_end())
    _logs_to_stderr(trainer)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    rows = []
    for logs in trainer.state.log_history:
        if any(k in logs for k in ("loss", "rewards/chosen")) and "step" in logs:
            row = {"step": logs["step"], "epoch": round(logs.get("epoch") or 0.0, 4)}
            row.update({k: round(float(logs[k]), 6) for k in LOG_KEYS if k in logs})
            rows.append(row)
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"{where}: {trainer.state.global_step} steps" + (f", loss {losses[0]:.4f} → {losses[-1]:.4f}"
                                                           if losses else "") +
          f", {result.metrics.get('train_runtime', 0):.1f} s" + (f" (resumed at step {resumed})" if resumed else ""),
          flush=True)
    return result, resumed, rows


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn under the tokenizer's chat template (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, `</s>`, ...), found by rendering a probe conversation: the first special token after the
    answer in the assistant's span; plus the tokenizer's EOS."""
    from pipeline.finetuning.chat_templates import assistant_spans

    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    probe = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]
    ids = []
    try:
        full, mask = assistant_spans(tokenizer, probe)
        span = [t for t, m in zip(full, mask) if m]
        ids += [next(t for t in span if t in special)]
    except Exception:  # noqa: BLE001  no special token in the span (StopIteration), or no span: the EOS alone
        pass
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def save_model_folder(model, tokenizer, out_dir: Path, template_text: str, dtype: str = "float32",
                      state_dict: dict | None = None) -> None:
    """A model folder that loads with AutoModelForCausalLM.from_pretrained, without bitsandbytes, carrying the
    tokenizer, the chat template, and a generation_config.json whose EOS ids include the template's end-of-turn
    token (so generation stops at the end of the assistant's turn)."""
    import torch
    from transformers import GenerationConfig

    if state_dict is None:
        model = model.to(getattr(torch, dtype)).to("cpu")
    else:  # gathered from the shards of several processes
        state_dict = {k: v.to(getattr(torch, dtype)).cpu() for k, v in state_dict.items()}
    tokenizer.chat_template = template_text
    eos = end_of_turn_ids(tokenizer)
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    base_eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else \
        ([gen.eos_token_id] if gen.eos_token_id is not None else [])
    gen.eos_token_id = sorted(set(base_eos) | set(eos)) or None
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.chat_template = template_text
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)


def prepare(base_model: str, base_ref: str, stage_name: str, config: dict, chat_template: Path,
            gradient_checkpointing: bool = False):
    """(where, precision, model, tokenizer, peft_config, template text) for a training stage's run."""
    from pipeline.finetuning import precision

    where = f"train.{stage_name}"
    prec = precision.resolve(config["precision"])
    precision.check_liger(config["liger_kernel"], where)
    model, tokenizer, peft_config = load_for_training(base_model, base_ref, config, where, prec,
                                                      gradient_checkpointing)
    template = Path(chat_template).read_text(encoding="utf-8")
    tokenizer.chat_template = template
    return where, prec, model, tokenizer, peft_config, template


def finish(out_dir: Path, trainer, tokenizer, peft_config, base_model: str, template: str, fitted: tuple,
           summary: dict) -> dict:
    """Save the adapter (lora, qlora) or the model folder (full, freeze), the log and the summary (with the start
    model's identity: its content digest, or the hub id and the commit it resolved to). Under several processes
    every rank gathers a sharded model's weights (`pipeline.finetuning.launch.full_state_dict`) and rank 0 alone writes."""
    from pipeline.models.hf import model_identity
    from pipeline.finetuning.launch import full_state_dict, is_main
    from pipeline.finetuning.precision import load_dtype

    result, resumed, log = fitted
    state = full_state_dict(trainer)
    if not is_main():
        return {}
    start = model_identity(base_model)
    if peft_config is not None:
        save_adapter(trainer, tokenizer, out_dir, base_model, start, state)
    else:  # in the dtype the weights trained in
        save_model_folder(trainer.model, tokenizer, out_dir, template,
                          load_dtype(summary["precision"], summary["finetuning"]), state)
    summary = {**summary, "start_model": start, "steps": result.global_step,
               "train_loss": mean_loss(log, result.global_step, result.training_loss), "resumed_from_step": resumed}
    return write_logs(out_dir, log, summary)


def write_logs(out_dir: Path, rows: list[dict], summary: dict) -> dict:
    with open(out_dir / "train_log.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def save_adapter(trainer, tokenizer, out_dir: Path, base_model: str, start: str, state_dict=None) -> None:
    """The PEFT adapter with the tokenizer, its settings in a stable order (PEFT keeps target_modules as a set,
    whose order follows PYTHONHASHSEED), naming its base portably: a hub model by its id and the commit it resolved
    to; a folder by its content digest (`start`, `sha256:...`), never by its path, which holds the recipe's name
    (`artifacts/<recipe>/models/sft`). That is the run cache's copy; `localize_adapter` then names the folder in
    each recipe's own output, where AutoPeftModelForCausalLM resolves it from the project root."""
    from pipeline.models.hf import split_ref

    trainer.model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card names the base by local path
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if Path(base_model).is_dir():
        cfg["base_model_name_or_path"], cfg["revision"] = start, None
    else:
        hub_id, revision = split_ref(base_model)
        commit = start.rpartition("@")[2]
        cfg["base_model_name_or_path"], cfg["revision"] = hub_id, commit or revision
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(_adapter_config_text(cfg))


def _adapter_config_text(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def localize_adapter(out_dir: Path, base_model: str) -> dict[str, bytes]:
    """The adapter's own `adapter_config.json` in this task's output: `base_model_name_or_path` names the start
    model folder as the task has it, relative to the project root (`artifacts/models/builtin-tiny`,
    `recipes/models/llama`, `artifacts/<recipe>/models/sft`), so `AutoPeftModelForCausalLM.from_pretrained` of the
    adapter folder loads from there. Nothing for a hub model (the adapter already names it) or a model folder
    (full, freeze)."""
    cfg_path = Path(out_dir) / "adapter_config.json"
    if not cfg_path.is_file() or not Path(base_model).is_dir():
        return {}
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = Path(base_model).as_posix()
    return {"adapter_config.json": _adapter_config_text(cfg).encode()}
