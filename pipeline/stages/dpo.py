"""Stage `dpo`: direct preference optimisation with TRL's `DPOTrainer` (LoRA, QLoRA, full or freeze).

Contract: reads every `[train.<name>]` with `method = "dpo"` (`beta`, `loss_type`, `precompute_ref_log_probs`,
`max_length` and the trainer keys; `model.chat_template`); consumes the start model (`from`: usually an SFT
stage's model, `artifacts/<recipe>/models/<from>/`) and the canonical preference datasets named in `data` (every
preference dataset of the recipe when empty); writes `artifacts/<recipe>/dpo/<name>/` (an adapter, provided as
`trained` for the merge stage) or, for full and freeze fine-tuning, `artifacts/<recipe>/models/<name>/` (the model,
provided as `model`).

The reference model is the start model: for LoRA / QLoRA it is the policy with its adapter disabled (TRL's way,
no second copy in memory); for full and freeze fine-tuning it is loaded again, frozen. The prompt and both answers
are rendered with the recipe's chat template by TRL. A pair longer than `max_length` is truncated (TRL keeps the
start: the end of an answer is cut off); one whose prompt alone fills `max_length` has no answer token left and is
dropped (TRL would drop it silently). The pairs are tokenized here exactly as TRL's DPOTrainer does and only those
it keeps are handed to it; read, kept, truncated and dropped counts (checked against the dataset TRL prepared) go
to `train_summary.json` and the console, and the stage fails when more than `max_dropped_fraction` is dropped.
`train_log.jsonl` holds loss, learning rate, grad norm and rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies per logging step. Several processes (`processes`, one per GPU the task holds by default;
`strategy`: ddp, fsdp, zero2, zero3) run `train` in every rank under `accelerate launch` (`pipeline.finetuning.launch`); rank 0
alone writes the output.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.errors import TunebuildError
from pipeline.finetuning.chat_templates import common_prefix

STAGE = Stage(name="dpo", version=3, phase="train", section="train.<name>", gpus="train.<name>.gpus",
              doc="Direct preference optimisation with TRL's DPOTrainer (LoRA, QLoRA, full, freeze).")


def localize(out_dir: Path, *, base_model: str, **_) -> dict:
    """This task's own adapter_config.json: the adapter names its recipe's start folder (the run cache keeps it
    portable; see `pipeline.finetuning.training.localize_adapter`)."""
    from pipeline.finetuning.training import localize_adapter

    return localize_adapter(out_dir, base_model)


def tasks(plan):
    from pipeline.core.train_tasks import train_tasks

    yield from train_tasks(plan, STAGE, "dpo", "preference", "training stage {name}: DPO ({finetuning}) from {base}")


def tokenize_pairs(pairs, tokenizer) -> list[dict]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` per pair, the way TRL's DPOTrainer tokenizes them
    (`DPOTrainer._prepare_dataset`, trl 1.x): conversational pairs through the chat template (the prompt with the
    generation prompt, then prompt + each answer), plain-text ones with the EOS appended to the answers; the
    answers start where the prompt and both prompt + answer sequences stop agreeing. `pairs` are the rows as TRL
    reads them (a `datasets.Dataset`)."""
    from trl.data_utils import is_conversational

    def ids(x, **kw) -> list[int]:
        if isinstance(x, list):
            out = tokenizer.apply_chat_template(x, tokenize=True, return_dict=True, tools=None, **kw)
        else:
            out = tokenizer(text=x)
        return list(out["input_ids"])

    rows = []
    for ex in pairs:
        if is_conversational(ex):
            prompt = ids(ex["prompt"], add_generation_prompt=True)
            chosen, rejected = ids(ex["prompt"] + ex["chosen"]), ids(ex["prompt"] + ex["rejected"])
        else:
            eos = tokenizer.eos_token
            prompt = ids(ex["prompt"])
            chosen, rejected = (ids(ex["prompt"] + (a if a.endswith(eos) else a + eos))
                                for a in (ex["chosen"], ex["rejected"]))
        n = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))
        rows.append({"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    return rows


def pair_counts(rows: list[dict], pairs: int, max_length: int) -> dict:
    """Counts under TRL's rule (`truncation_mode = "keep_start"`): a pair whose prompt alone has `max_length`
    tokens or more is dropped (no answer token left); a kept one whose prompt + chosen or prompt + rejected is
    longer than `max_length` is truncated (the end of that answer is cut off). `rows` may be the kept ones only:
    the dropped count is `pairs` minus the kept."""
    kept = [r for r in rows if len(r["prompt_ids"]) < max_length]
    truncated = sum(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > max_length
                    for r in kept)
    return {"pairs": pairs, "kept": len(kept), "truncated": truncated, "dropped": pairs - len(kept)}


def too_many_dropped(counts: dict, config: dict) -> bool:
    return counts["dropped"] > config["max_dropped_fraction"] * counts["pairs"] or not counts["kept"]


def check_dropped(counts: dict, rows: list[dict], where: str, stage_name: str, config: dict) -> None:
    """Print the counts (one line); fail when more than `max_dropped_fraction` of the pairs, or all, are dropped."""
    n, length, frac = counts["pairs"], config["max_length"], config["max_dropped_fraction"]
    print(f"dpo {stage_name}: {n} preference pairs: {counts['kept']} kept, {counts['truncated']} of them truncated "
          f"to max_length {length} (an answer cut off), {counts['dropped']} dropped (the prompt alone fills "
          f"max_length)", flush=True)
    if too_many_dropped(counts, config):
        why = "none is left to train on" if not counts["kept"] else f"more than max_dropped_fraction = {frac}"
        longest = max((len(r["prompt_ids"]) for r in rows), default=0)
        whole = max((len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows),
                    default=0)
        raise TunebuildError(f"{where}.max_length: {counts['dropped']} of {n} preference pairs have a prompt of "
                             f"max_length = {length} tokens or more, so no answer token left ({why}): raise "
                             f"{where}.max_length (the longest prompt has {longest} tokens, the longest pair "
                             f"{whole})")


def run(out_dir: Path, *, scratch: Path | None = None, **kwargs) -> dict:
    """`train` in this process, or in `processes` ranks under `accelerate launch` (`pipeline.finetuning.launch`); rank 0
    writes `out_dir`."""
    from pipeline.finetuning import launch

    return launch.run(train, out_dir, {**kwargs, "scratch": scratch}, f"train.{kwargs['stage_name']}")


def train(out_dir: Path, *, base_model: str, base_ref: str, stage_name: str, data: dict, chat_template: Path,
        config: dict, scratch: Path | None = None, report_to: str = "none",
        gradient_checkpointing: bool = False) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipeline.finetuning import training
    from pipeline.models.hf import load_causal_lm
    from pipeline.finetuning.precision import load_dtype, load_kwargs

    c = config
    where, prec, model, tokenizer, peft_config, template = training.prepare(base_model, base_ref, stage_name, c,
                                                                            chat_template, gradient_checkpointing)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
             for r in training.load_mixture(data, c["data"], "preference", where)]
    try:
        rows = tokenize_pairs(Dataset.from_list(pairs), tokenizer)
    except Exception as e:  # a chat template that cannot render the pairs, ...
        raise TunebuildError(f"{where}: preparing the preference pairs failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    counts = pair_counts(rows, len(pairs), c["max_length"])
    if too_many_dropped(counts, c):
        check_dropped(counts, rows, where, stage_name, c)  # raises, before a reference model is loaded
    kept = [p for p, r in zip(pairs, rows) if len(r["prompt_ids"]) < c["max_length"]]
    ref_model = None
    if peft_config is None:  # full / freeze: the start model, frozen, is the reference
        # in the dtype the policy loaded in, where it loaded, with the same attention kernel
        ref_model, _ = load_causal_lm(base_model, dtype=load_dtype(prec, c["finetuning"]), with_tokenizer=False,
                                      **load_kwargs(c, prec, where))
        ref_model.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory(prefix="tunebuild-dpo-") as tmp:
        output_dir = str(scratch) if scratch is not None else tmp
        args = DPOConfig(**training.common_args(c, output_dir, prec, report_to, gradient_checkpointing),
                         max_length=c["max_length"], beta=c["beta"], loss_type=[c["loss_type"]],
                         precompute_ref_log_probs=c["precompute_ref_log_probs"])
        try:
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(kept),
                                 processing_class=tokenizer, peft_config=peft_config)
        except Exception as e:  # a chat template TRL cannot apply to the pairs, ...
            if isinstance(e, TunebuildError):
                raise
            raise TunebuildError(f"{where}: preparing the preference pairs failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        # the counts of what TRL prepared (its own tokenization and filter): the same as ours unless another TRL
        # version tokenizes or drops differently, and then the ones that hold
        prepared = trainer.train_dataset
        counts = pair_counts([{"prompt_ids": p, "chosen_ids": ch, "rejected_ids": rj} for p, ch, rj in
                              zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])],
                             len(pairs), c["max_length"])
        check_dropped(counts, rows, where, stage_name, c)
        fitted = training.fit(trainer, scratch, where)
    return training.finish(out_dir, trainer, tokenizer, peft_config, base_model, template, fitted,
                           {"method": "dpo", "finetuning": c["finetuning"], **counts, "precision": prec,
                            "beta": c["beta"], "loss_type": c["loss_type"]})
