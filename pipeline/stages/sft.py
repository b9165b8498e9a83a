"""Stage `sft`: LoRA supervised fine-tuning with TRL's `SFTTrainer`.

Contract: reads `[sft]` (and `model.base`, `model.chat_template`); consumes the canonical datasets named in
`sft.data` (every SFT dataset of the recipe when it is empty), each optionally capped (`limit`) or weighted
(`weight`: 2 = every example twice, 0.5 = a fixed half); writes `artifacts/<recipe>/sft/` and provides it as the
`trained` adapter `sft`, which the merge stage folds into the base model.

Each canonical `messages` record is rendered with the recipe's chat template and tokenized here, with a
completion mask over every assistant turn (the loss is on the answers of all turns, not only the last one); TRL
then trains on `input_ids` + `completion_mask` (`completion_only_loss`). Conversations longer than `max_length`
are truncated; one with no answer token left is dropped. Kept, truncated and dropped counts go to
`train_summary.json` and the console, and the stage fails when more than `max_dropped_fraction` is dropped
(TRL would otherwise drop such examples silently). The recipe's chat template replaces the tokenizer's
and is saved with the adapter. Output: the PEFT adapter folder, the tokenizer, and `train_log.jsonl` (loss per
logging step; no timings, so an identical run gives an identical artifact).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.errors import TunebuildError
from pipeline.stage import Stage

STAGE = Stage(name="sft", version=3, phase="train", section="sft",
              doc="LoRA supervised fine-tuning with TRL's SFTTrainer.")


def mixture(recipe) -> list[dict]:
    """`sft.data` as [{name, limit, weight}], every SFT dataset of the recipe when it names none."""
    from pipeline.formats import PREFERENCE_FORMATS

    items = recipe.config["sft"]["data"]
    if not items:
        items = [n for n, d in sorted(recipe.config["data"].items()) if d["format"] not in PREFERENCE_FORMATS]
    return [{"name": i, "limit": 0, "weight": 1.0} if isinstance(i, str) else
            {"name": i["name"], "limit": i.get("limit", 0), "weight": float(i.get("weight", 1.0))} for i in items]


def tasks(plan):
    r = plan.recipe
    mix = mixture(r)
    datasets = {}
    for m in mix:
        p = plan.product("dataset", m["name"])
        if p is None:
            from pipeline.recipe import RecipeError

            known = ", ".join(x.name for x in plan.products("dataset")) or "none"
            raise RecipeError(f"{r.path}: sft.data: no dataset named {m['name']!r} (the recipe's [data.<name>] "
                              f"tables: {known})")
        datasets[m["name"]] = p.out
    if not datasets:
        return
    src = plan.model(r.config["model"]["base"])
    inputs, params = src.as_arg("base_model")
    inputs.update(data=datasets, chat_template=plan.rel(r.config["model"]["chat_template"]))
    params["base_ref"] = src.ref
    config = {**plan.section("sft"), "data": mix}
    yield plan.task(STAGE, r.name, plan.out(STAGE), inputs=inputs, params=params, config=config,
                    provides=("trained", "sft", {"base": src, "datasets": sorted(datasets.values())}),
                    doc=f"LoRA SFT of {src.ref} for {r.name}")


def take(records: list[dict], limit: int, weight: float, seed: str) -> list[dict]:
    """A dataset's share of the mixture: the first `limit` records (0: all), then `weight` times over (whole
    copies, plus a fixed sample for the fraction)."""
    import random

    records = records[:limit] if limit else records
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(records, round(frac * len(records))) if frac else []
    return records * whole + extra


def load_mixture(data: dict, mix: list[dict]) -> list[dict]:
    """Training conversations (canonical `messages` lists) of the mixture, in the mixture's order."""
    from pipeline.dataset import kind_of, read_records

    out = []
    for m in mix:
        records = read_records(Path(data[m["name"]]) / "train.jsonl")
        if records and kind_of(records[0]) != "sft":
            raise TunebuildError(f"sft.data: dataset {m['name']!r} holds preference pairs "
                                 f"(prompt/chosen/rejected); SFT trains on conversations")
        out += [rec["messages"] for rec in take(records, m["limit"], m["weight"], m["name"])]
    if not out:
        raise TunebuildError("sft.data: the datasets hold no training example")
    return out


def _ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))


def tokenize_conversations(conversations: list[list[dict]], tokenizer, max_length: int,
                           template: Path) -> tuple[list[dict], dict]:
    """`input_ids` and `completion_mask` (1 on every assistant turn's tokens) per conversation, truncated to
    `max_length`; conversations with no answer token left are dropped. Returns (rows, counts)."""
    rows, truncated, dropped = [], 0, 0
    for n, msgs in enumerate(conversations):
        try:
            full = _ids(tokenizer, msgs)
            mask = [0] * len(full)
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                start = len(_ids(tokenizer, msgs[:i], generation_prompt=True))
                upto = _ids(tokenizer, msgs[: i + 1])
                if full[: len(upto)] != upto or start > len(upto):
                    raise TunebuildError(f"{template}: rendering a conversation does not extend its earlier turns "
                                         f"(the template must render each turn as a prefix of the next)")
                if len(upto) == start:
                    raise TunebuildError(f"{template}: the chat template renders nothing for an assistant turn "
                                         f"(training conversation {n + 1}): there would be nothing to learn")
                mask[start:len(upto)] = [1] * (len(upto) - start)
        except TunebuildError:
            raise
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


def check_target_modules(model, targets: list[str], base_ref: str) -> None:
    """Every `sft.lora.target_modules` entry names modules of the model (PEFT matches by name suffix); else one line
    listing the linear layers the model has."""
    import torch

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TunebuildError(f"sft.lora.target_modules: {', '.join(map(repr, missing))} match(es) no module of "
                             f"{base_ref}; its linear layers are named {', '.join(linear)}")


def _precision(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def run(out_dir: Path, *, base_model: str, base_ref: str, data: dict, chat_template: Path, config: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pipeline.hf import load_causal_lm

    c = config
    precision = _precision(c["precision"])
    model, tokenizer = load_causal_lm(base_model, dtype="float32")
    tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    rows, counts = tokenize_conversations(load_mixture(data, c["data"]), tokenizer, c["max_length"], chat_template)
    print(f"sft: {counts['examples']} training conversations: {counts['kept']} kept, {counts['truncated']} truncated "
          f"to max_length {c['max_length']}, {counts['dropped']} dropped (no answer token within max_length)",
          flush=True)
    if counts["dropped"] > c["max_dropped_fraction"] * counts["examples"]:
        raise TunebuildError(f"sft.max_length: {counts['dropped']} of {counts['examples']} training conversations "
                             f"have no answer token within {c['max_length']} tokens (more than "
                             f"sft.max_dropped_fraction = {c['max_dropped_fraction']}): raise max_length")
    dataset = Dataset.from_list(rows)

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
        check_target_modules(model, c["lora"]["target_modules"], base_ref)
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
    if isinstance(cfg.get("target_modules"), list):  # PEFT keeps a set: its order follows PYTHONHASHSEED
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    with open(out_dir / "train_log.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    summary = {"steps": result.global_step, "train_loss": round(float(result.training_loss), 6),
               **counts, "precision": precision}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
