"""Stage `merge`: fold a LoRA / QLoRA adapter into the model it was trained from.

The base is loaded in full precision, never 4-bit (merging into a quantised base re-quantises and loses quality):
in its own dtype on a GPU (bfloat16 for most checkpoints: half the memory of float32), in float32 on a CPU; the
adapter applied and merged with `merge_and_unload`, then the result is cast to `merge.dtype` and
saved with the tokenizer, the chat template used in training and a generation_config.json whose EOS ids include
the template's end-of-turn token, so the folder loads anywhere with `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained` (no bitsandbytes needed) and generation stops at the end of the assistant's turn.

Contract: reads `[merge]`; consumes every `trained` adapter and the model it started from; writes
`artifacts/<recipe>/models/<name>/` and provides it as the `model` `<name>`, which the evaluation stages compare.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.stage import Stage

STAGE = Stage(name="merge", version=2, phase="models", section="merge", verbosity=1, gpus="merge.gpus",
              doc="Merge a LoRA / QLoRA adapter into the full-precision model it was trained from.")


def tasks(plan):
    from pipeline.core.train_tasks import model_folder

    for trained in plan.products("trained"):
        base = trained.info["base"]
        inputs, params = base.as_arg("base_model")
        inputs.update(adapter=trained.out, chat_template=plan.rel(plan.recipe.config["model"]["chat_template"]))
        yield plan.task(STAGE, f"{plan.name}.{trained.name}", model_folder(plan, trained.name), inputs=inputs,
                        params=params, config=plan.section("merge"),
                        provides=("model", trained.name, trained.info),
                        doc=f"merge {trained.name}'s adapter into {base.ref} for {plan.name}")


def run(out_dir: Path, *, base_model: str, adapter: Path, chat_template: Path, config: dict) -> dict:
    from peft import PeftModel

    from pipeline.models.hf import load_causal_lm, load_tokenizer
    from pipeline.finetuning.precision import merge_dtype
    from pipeline.finetuning.training import save_model_folder

    base, _ = load_causal_lm(base_model, dtype=merge_dtype(), with_tokenizer=False)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    save_model_folder(merged, load_tokenizer(str(adapter)), out_dir,
                      Path(chat_template).read_text(encoding="utf-8"), config["dtype"])
    return {"dtype": config["dtype"]}
