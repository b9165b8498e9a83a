"""The SFT and DPO stages against bare TRL scripts with the same model, data and settings (the built-in tiny model,
LoRA, CPU). Prints the wall time of each (best of --repeat) and the ratio (goal <= 1.05x).

    python benchmarks/training.py [--steps 60] [--repeat 3]

The stage's time includes what it does beyond TRL: reading the canonical dataset, rendering and masking every
assistant turn itself, checking the LoRA targets, and saving the adapter with its logs. Both sides run in this
process after a warm-up, so imports and the first-call costs of torch do not count.

The real-shape case (`--real-shape`, `benchmarks/training_real.py`): a random-init model with Qwen1.5-0.5B's
architecture, the Alpaca sample, SFT LoRA unpacked and packed, the stage vs a bare TRL script vs LLaMA-Factory:

    python benchmarks/training.py --real-shape [--steps 2] [--llamafactory /path/to/llamafactory-cli]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = Path(__file__).resolve().parents[1]


def settings(steps: int, method: str) -> dict:
    from pipeline.core.recipe.schema import SCHEMA, Key

    def defaults(schema):
        return {k: defaults(v) if isinstance(v, dict) else v.default for k, v in schema.items()
                if isinstance(v, (dict, Key))}
    t = defaults(SCHEMA["train"].schema)
    t.update(method=method, max_steps=steps, batch_size=4, max_length=512, logging_steps=10, learning_rate=1e-3,
             precision="float32", data=[{"name": "d", "limit": 0, "weight": 1.0}])
    return t


def dataset(folder: Path, file: str, fmt: str) -> Path:
    from pipeline.stages import import_data

    out = folder / fmt
    out.mkdir()
    from pipeline.core.recipe.schema import SCHEMA

    cfg = {k: v.default for k, v in SCHEMA["data"].schema.items() if k != "source"}
    cfg.update(format=fmt, heldout_fraction=0.0)
    import_data.run(out, config=cfg, where="bench", file=ROOT / "recipes/data" / file)
    return out


def _bare(model_dir: Path, data: Path, t: dict, template: str, trainer_cls, config_cls, to_row, **extra) -> None:
    """A bare TRL script: the model, its tokenizer with the template, the records as TRL's conversational format,
    the trainer with a LoraConfig, train, save the adapter."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as out:
        args = config_cls(output_dir=out, max_steps=t["max_steps"], per_device_train_batch_size=t["batch_size"],
                          learning_rate=t["learning_rate"], max_length=t["max_length"], logging_steps=10,
                          save_strategy="no", report_to="none", bf16=False, seed=t["seed"],
                          activation_checkpointing=False, **extra)   # as the stage (TRL's default is on)
        lora = LoraConfig(r=t["lora"]["r"], lora_alpha=t["lora"]["alpha"], lora_dropout=t["lora"]["dropout"],
                          target_modules=t["lora"]["target_modules"], task_type="CAUSAL_LM")
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list([to_row(r) for r in rows]),
                              processing_class=tok, peft_config=lora)
        trainer.train()
        trainer.model.save_pretrained(out)


def bare_sft(model_dir: Path, data: Path, t: dict, template: str) -> None:
    from trl import SFTConfig, SFTTrainer

    _bare(model_dir, data, t, template, SFTTrainer, SFTConfig,
          lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]})


def bare_dpo(model_dir: Path, data: Path, t: dict, template: str) -> None:
    from trl import DPOConfig, DPOTrainer

    _bare(model_dir, data, t, template, DPOTrainer, DPOConfig,
          lambda r: {k: r[k] for k in ("prompt", "chosen", "rejected")}, beta=0.1)


def best(k: int, fn) -> float:
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--real-shape", action="store_true", help="the Qwen1.5-0.5B-shaped case (training_real.py)")
    ap.add_argument("--llamafactory", default=None, help="real shape: llamafactory-cli to compare with")
    args, rest = ap.parse_known_args()
    if args.real_shape:
        from benchmarks import training_real

        training_real.main(["--steps", str(args.steps if "--steps" in sys.argv else 2)] +
                           (["--llamafactory", args.llamafactory] if args.llamafactory else []) + rest)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from pipeline.models import tiny
    from pipeline.stages import dpo, sft

    template_path = ROOT / "recipes/templates/chatml.jinja"
    template = template_path.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "tiny"
        model_dir.mkdir()
        tiny.build(model_dir, {"seed": 0})
        sft_data = dataset(tmp, "alpaca_sample.json", "alpaca")
        dpo_data = dataset(tmp, "dpo_pairs_sample.jsonl", "preference")
        for name, stage, bare, data, method in (("SFT", sft, bare_sft, sft_data, "sft"),
                                                ("DPO", dpo, bare_dpo, dpo_data, "dpo")):
            t = settings(args.steps, method)
            counter = iter(range(10 ** 6))

            def ours():
                out = tmp / f"{method}-{next(counter)}"
                out.mkdir()
                stage.run(out, base_model=str(model_dir), base_ref="builtin:tiny", stage_name=method,
                          data={"d": data}, chat_template=template_path, config=t)

            ours()  # warm-up
            bare(model_dir, data, t, template)
            a = best(args.repeat, ours)
            b = best(args.repeat, lambda: bare(model_dir, data, t, template))
            print(f"{name}: stage {a:.2f} s, bare TRL {b:.2f} s, ratio {a / b:.3f}x "
                  f"({args.steps} steps, batch 4, LoRA r={t['lora']['r']}; goal <= 1.05x)", flush=True)


if __name__ == "__main__":
    main()
