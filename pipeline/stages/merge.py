"""Stage `merge`: fold the LoRA adapter into the base model.

The base is loaded in full precision (float32), the adapter applied and merged with `merge_and_unload`, then the
result is cast to `merge.dtype` and saved together with the tokenizer and the chat template used in training,
so the folder loads anywhere with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.

Contract: reads `[merge]`; consumes a `trained` adapter and the base model it was trained from; writes
`artifacts/<recipe>/merge/` and provides it as the `model` `tuned`, which the evaluation stages compare with base.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.stage import Stage

STAGE = Stage(name="merge", version=1, phase="models", section="merge", verbosity=1,
              doc="Merge the LoRA adapter into the base model.")


def tasks(plan):
    for trained in plan.products("trained"):
        base = trained.info["base"]
        inputs, params = base.as_arg("base_model")
        inputs["adapter"] = trained.out
        out = plan.out(STAGE)
        yield plan.task(STAGE, plan.name, out, inputs=inputs, params=params, config=plan.section("merge"),
                        provides=("model", "tuned", {"ref": f"{plan.name}/merge",
                                                     "datasets": trained.info["datasets"]}),
                        doc=f"merge the adapter into {base.ref} for {plan.name}")


def run(out_dir: Path, *, base_model: str, adapter: Path, config: dict) -> dict:
    import torch
    from peft import PeftModel

    from pipeline.hf import load_causal_lm, load_tokenizer

    base, _ = load_causal_lm(base_model, dtype="float32", with_tokenizer=False)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged = merged.to(getattr(torch, config["dtype"])).to("cpu")
    merged.save_pretrained(out_dir)
    load_tokenizer(str(adapter)).save_pretrained(out_dir)
    return {"dtype": config["dtype"]}
