"""Stage `merge`: fold the LoRA adapter into the base model.

The base is loaded in full precision (float32), the adapter applied and merged with `merge_and_unload`, then the
result is cast to `merge.dtype` and saved together with the tokenizer and the chat template used in training,
so the folder loads anywhere with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

from pathlib import Path


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
