"""SFT at a real model's shape: the stage vs a bare TRL script vs LLaMA-Factory, unpacked and packed.

    python benchmarks/training.py --real-shape [--steps 2] [--llamafactory /path/to/llamafactory-cli]

The model is random-init with Qwen1.5-0.5B's architecture (Qwen2: hidden 1024, 24 layers, 16 heads, intermediate
2816, vocab 151,936; `benchmarks/generation.py` makes it, with its byte-level BPE tokenizer of Qwen2's class),
saved as a local folder. The rows are the Alpaca sample (`recipes/data/alpaca_sample.json`, real alpaca-gpt4
rows), rendered with ChatML. Every run: the same steps, batch 4, lr 1e-3, max_length (cutoff_len) 512, LoRA r 8 /
alpha 16 / dropout 0.05 on q,k,v,o, float32, seed 42, on the CPU. Each run is its own process (measured with
wait4), so its peak RSS is its own. Printed per run: non-pad tokens trained, the trainer's train_runtime, tokens/s,
the whole process's wall time (load, tokenize, train, save), CPU time and peak RSS, then the two goals: the packed
stage at >= 1.0x LLaMA-Factory's packed tokens/s, and at <= 1.05x bare TRL's packed wall time.

Tokens: the stage's `tokens_trained` (train_summary.json); TRL's own `num_tokens` metric for the bare script (the
same count: the attention mask's ones, or the padding-free row's length); LLaMA-Factory's `num_input_tokens_seen`
with `include_num_input_tokens_seen: non_padding`. Packed, neat packing hands the model a 4D block mask whose sum
means nothing, so transformers' count is taken there (through a `sitecustomize` on the LLaMA-Factory process's
path, `LF_COUNT`) as the query positions that attend to anything: its rows are padded to `cutoff_len`, and a pad
position attends to nothing.

LLaMA-Factory pins its own transformers / TRL, so it runs from a venv of its own (`python -m venv
/work/venv-llamafactory && .../pip install torch llamafactory`), named by `--llamafactory`. Its packed run uses
`neat_packing` (attention kept inside each conversation, as the stage's). No run checkpoints activations (the
stage's default; TRL's and LLaMA-Factory's defaults are on, so both are turned off).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS, BATCH, LR, MAX_LENGTH, SEED = 2, 4, 1e-3, 512, 42
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TEMPLATE = ROOT / "recipes/templates/chatml.jinja"
ALPACA = ROOT / "recipes/data/alpaca_sample.json"


def make_model(folder: Path) -> None:
    """`benchmarks/generation.py`'s Qwen1.5-0.5B-shaped model, with its byte-level BPE tokenizer of Qwen2's class
    whose last three ids are ChatML's special tokens, as Qwen's are (so every side renders the same ChatML, and
    LLaMA-Factory's `chatml` template finds its `<|im_end|>` without growing the vocabulary)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    from benchmarks import generation

    generation.make_model(folder)
    vocab_size = generation.VOCAB
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = {c: i for i, c in enumerate(alphabet)}, []
    for a in alphabet:
        for b in alphabet:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for ab in list(vocab)[len(alphabet):]:
        for c in alphabet:
            if len(vocab) == vocab_size - 3:
                break
            vocab[ab + c] = len(vocab)
            merges.append((ab, c))
    for i, special in enumerate(("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
        vocab[special] = vocab_size - 3 + i
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.save_pretrained(folder)


def stage_config(steps: int, packing: bool) -> dict:
    from benchmarks.training import settings

    t = settings(steps, "sft")
    t.update(batch_size=BATCH, learning_rate=LR, max_length=MAX_LENGTH, logging_steps=1, seed=SEED, packing=packing,
             lora=dict(LORA), processes=1)
    return t


def run_stage(model: Path, data: Path, steps: int, packing: bool) -> dict:
    """The SFT stage as a build runs it (one process)."""
    import contextlib
    import io

    from pipeline.stages import sft

    out = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = sft.run(out, base_model=str(model), base_ref="qwen-shaped", stage_name="sft", data={"d": data},
                          chat_template=TEMPLATE, config=stage_config(steps, packing))
    runtime = float(re.search(r"train.sft: \d+ steps.*?, ([\d.]+) s", printed.getvalue()).group(1))
    return {"tokens": summary["tokens_trained"], "train_runtime": runtime}


def run_bare(model: Path, steps: int, packing: bool) -> dict:
    """A bare TRL script: the model, its tokenizer with the template, Alpaca rows as TRL's prompt-completion
    conversations, SFTTrainer with a LoraConfig (and TRL's packing), train, save the adapter."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TEMPLATE.read_text()
    lm = AutoModelForCausalLM.from_pretrained(model)
    rows = []
    for r in json.loads(ALPACA.read_text()):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        rows.append({"prompt": [{"role": "user", "content": user}],
                     "completion": [{"role": "assistant", "content": r["output"]}]})
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                         max_length=MAX_LENGTH, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                         seed=SEED, packing=packing, use_cpu=True,
                         activation_checkpointing=False)   # the same settings: TRL's default is on
        lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=lm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=lora)
        result = trainer.train()
        trainer.model.save_pretrained(out)
    tokens = max(int(x["num_tokens"]) for x in trainer.state.log_history if "num_tokens" in x)
    return {"tokens": tokens, "train_runtime": result.metrics["train_runtime"]}


def llamafactory_config(folder: Path, model: Path, steps: int, packing: bool) -> Path:
    data = folder / "data"
    data.mkdir(exist_ok=True)
    (data / "dataset_info.json").write_text(json.dumps({"alpaca_bench": {"file_name": str(ALPACA)}}))
    out = folder / f"out-{packing}"
    lines = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
             "lora_target": ",".join(LORA["target_modules"]), "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"],
             "lora_dropout": LORA["dropout"], "dataset": "alpaca_bench", "dataset_dir": str(data),
             "template": "chatml", "cutoff_len": MAX_LENGTH, "per_device_train_batch_size": BATCH,
             "gradient_accumulation_steps": 1, "learning_rate": LR, "lr_scheduler_type": "linear",
             "max_steps": steps, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "output_dir": str(out),
             "seed": SEED, "bf16": False, "fp16": False, "packing": packing, "neat_packing": packing,
             "include_num_input_tokens_seen": "non_padding",   # packed: counted by LF_COUNT
             "preprocessing_num_workers": 1,
             "dataloader_num_workers": 0, "use_cpu": True, "trust_remote_code": False,
             "disable_gradient_checkpointing": True}   # LLaMA-Factory checkpoints by default; the others do not
    cfg = folder / f"lf-{packing}.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    return cfg


LF_COUNT = """# benchmarks/training_real.py: LLaMA-Factory's non-pad tokens under neat packing's 4D mask
import torch
from transformers import trainer as _trainer

_track = _trainer.Trainer._track_num_input_tokens


def _track_4d(self, inputs):
    mask = inputs.get("attention_mask")
    if self.args.include_num_input_tokens_seen != "non_padding" or mask is None or mask.dim() != 4:
        return _track(self, inputs)
    tokens = torch.as_tensor((mask[:, 0] == 0).any(-1).sum(), device=self.args.device, dtype=torch.int64)
    self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()


_trainer.Trainer._track_num_input_tokens = _track_4d
"""


def llamafactory_result(cfg: Path) -> dict:
    out = Path(re.search(r'output_dir: "(.*)"', cfg.read_text()).group(1))
    state = json.loads((out / "trainer_state.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    tokens = max((x.get("num_input_tokens_seen", 0) for x in state["log_history"]), default=0)
    return {"tokens": int(tokens or results.get("num_input_tokens_seen", 0)), "train_runtime": results["train_runtime"]}


def measured(command: list[str], env: dict | None = None) -> tuple[int, float, float, float, str]:
    """(exit code, wall seconds, CPU seconds (user + system), peak RSS in MiB, output) of one process. CPU seconds
    say what a run cost where the wall clock also counts the other users of a shared machine."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (proc.returncode, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
            output)


def case(argv: list[str]) -> None:
    """One run in this process: `--case stage|bare MODEL DATA STEPS PACKED`; prints its result as JSON."""
    kind, model, data, steps, packed = argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if kind == "stage":
        result = run_stage(Path(model), Path(data), int(steps), packed == "1")
    else:
        result = run_bare(Path(model), int(steps), packed == "1")
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--llamafactory", default=None, help="llamafactory-cli of LLaMA-Factory's own venv")
    ap.add_argument("--model-dir", default=None, help="reuse (or keep) the random-init model folder here")
    ap.add_argument("--case", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        return case(args.case)
    from benchmarks.training import dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-real-"))
    model = Path(args.model_dir) if args.model_dir else tmp / "qwen-shaped"
    if not (model / "config.json").exists():
        model.mkdir(parents=True, exist_ok=True)
        make_model(model)
    data = dataset(tmp, "alpaca_sample.json", "alpaca")
    me = [sys.executable, str(Path(__file__).resolve()), "--case"]
    env = {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for packed in (False, True):
        for name in ("stage", "bare TRL", "LLaMA-Factory"):
            if name == "LLaMA-Factory":
                if not args.llamafactory:
                    continue
                cfg = llamafactory_config(tmp, model, args.steps, packed)
                count = tmp / "lf-count"
                count.mkdir(exist_ok=True)
                (count / "sitecustomize.py").write_text(LF_COUNT)
                code, wall, cpu, rss, out = measured([args.llamafactory, "train", str(cfg)],
                                                {"DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": "",
                                                 "PYTHONPATH": str(count)})
                result = llamafactory_result(cfg) if code == 0 else None
            else:
                kind = "stage" if name == "stage" else "bare"
                code, wall, cpu, rss, out = measured(me + [kind, str(model), str(data), str(args.steps),
                                                      str(int(packed))],
                                                env)
                found = re.search(r"^RESULT (.*)$", out, re.M)
                result = json.loads(found.group(1)) if code == 0 and found else None
            if result is None:
                print(f"{name} ({'packed' if packed else 'unpacked'}) failed ({code}):\n{out[-3000:]}", flush=True)
                continue
            runs.append({"run": name, "packed": packed, **result, "wall": wall, "cpu": cpu, "rss": rss})
            r = runs[-1]
            print(f"{name:14} {'packed' if packed else 'unpacked':8} {r['tokens']:6d} tokens  "
                  f"train {r['train_runtime']:6.1f} s  {r['tokens'] / r['train_runtime']:6.1f} tok/s  "
                  f"wall {wall:6.1f} s  CPU {cpu:6.1f} s  peak RSS {rss:6.0f} MiB", flush=True)
    print(f"\nQwen1.5-0.5B shape, {args.steps} steps, batch {BATCH}, max_length {MAX_LENGTH}, LoRA r {LORA['r']}, "
          f"float32, CPU ({os.cpu_count()} cores)")
    print("| run | batches | tokens trained | train_runtime (s) | tokens/s | wall (s) | CPU (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['run']} | {'packed' if r['packed'] else 'unpacked'} | {r['tokens']} | {r['train_runtime']:.1f} | "
              f"{r['tokens'] / r['train_runtime']:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss']:.0f} |")
    get = {(r["run"], r["packed"]): r for r in runs}
    stage, bare, lf = get.get(("stage", True)), get.get(("bare TRL", True)), get.get(("LLaMA-Factory", True))
    if stage and lf:
        ratio = (stage["tokens"] / stage["train_runtime"]) / (lf["tokens"] / lf["train_runtime"])
        print(f"packed stage vs LLaMA-Factory packed: {ratio:.2f}x the tokens/s (goal >= 1.0x)")
    if stage and bare:
        print(f"packed stage vs bare TRL packed: {stage['wall'] / bare['wall']:.3f}x the wall time, "
              f"{stage['cpu'] / bare['cpu']:.3f}x the CPU time (goal <= 1.05x)")


if __name__ == "__main__":
    main(sys.argv[1:])
