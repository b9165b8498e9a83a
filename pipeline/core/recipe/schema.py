"""Recipe schema: the one place that says which keys a recipe may hold, their types, defaults, allowed values and
meaning. `SCHEMA` is the table; `Key` and `TableOf` are what it is made of.

A recipe is `recipes/<name>.toml`. Loading it (`pipeline.core.recipe.load`: `extends`, `[sweep]` variants,
validation against this table) happens when `dodo.py` loads, before any task runs; the checks across keys are in
`pipeline.core.recipe.checks`; `pipeline.core.recipe.reference` writes the table as `recipes/REFERENCE.md`. Every
problem is reported as `<file>: <dotted.key>: <what was expected>`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import TunebuildError

REQUIRED = object()
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny",)


def copy_toml(obj):
    """A deep copy of TOML data (dicts, lists, scalars): several times faster than copy.deepcopy."""
    if isinstance(obj, dict):
        return {k: copy_toml(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_toml(v) for v in obj]
    return obj


class RecipeError(TunebuildError):
    """A recipe is invalid. The message names the file and the dotted key."""


@dataclass(frozen=True)
class Key:
    type: type | tuple
    default: object = REQUIRED
    choices: tuple = ()
    file: bool = False  # a path relative to the recipes folder that must exist (inside it)
    doc: str = ""
    items: tuple = (str,)  # for lists: the types an item may have (a dict item is an inline table)
    min: float | None = None       # numbers: the smallest value allowed; lists: the fewest items
    max: float | None = None       # numbers: the largest value allowed
    above: float | None = None     # numbers: the value must be greater than this (an open lower bound)
    below: float | None = None     # numbers: the value must be less than this (an open upper bound)
    folder: bool = False           # with file=True: the path must be a folder (else a file)

    def range_text(self) -> str:
        """The allowed range, as the README's recipe reference shows it ('' when unbounded)."""
        if self.type is list:
            return f"at least {self.min:g} item(s)" if self.min else ""
        lo = f"> {self.above:g}" if self.above is not None else (f">= {self.min:g}" if self.min is not None else "")
        hi = f"< {self.below:g}" if self.below is not None else (f"<= {self.max:g}" if self.max is not None else "")
        return ", ".join(x for x in (lo, hi) if x)

    def check_range(self, value) -> str | None:
        """What is wrong with `value`'s size, or None."""
        if self.type is list:
            ok = self.min is None or len(value) >= self.min
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = ((self.min is None or value >= self.min) and (self.max is None or value <= self.max) and
                  (self.above is None or value > self.above) and (self.below is None or value < self.below))
        else:
            ok = True
        return None if ok else f"expected {self.range_text()}, got {value!r}"


@dataclass(frozen=True)
class TableOf:
    """A table whose keys the user names (e.g. eval suites); every value follows `schema`."""
    schema: dict


BLOCKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


def _gpus(what: str) -> Key:
    return Key(int, None, min=0, doc=f"GPUs {what} holds (unset: 1 where GPUs exist, 0 on a CPU machine); where "
                                    "a task runs, not what it computes: outside the run-cache key")

def _engine(what: str) -> Key:
    return Key(str, "hf", choices=("hf", "vllm"),
               doc=f"{what}: hf (transformers, batched; always installed) or vllm (pip install vllm, see README: "
                   f"Generation engines); the engine and its version are part of what a task computes")


def _vllm(section: str) -> dict:
    return {
        "tensor_parallel_size": Key(int, None, min=1, doc=f"GPUs vLLM splits the model over (unset: the task's GPUs, "
                                                          f"{section}.gpus; 1 on a CPU); outside the run-cache key"),
        "gpu_memory_utilization": Key(float, None, above=0, max=1,
                                      doc="share of each GPU's memory vLLM may take (unset: vLLM's 0.9); on a CPU "
                                          "the KV cache holds vLLM's batch of 256 sequences, at most a quarter of the free "
                                          "RAM, instead; outside the run-cache key"),
        "max_model_len": Key(int, None, min=16, doc="the context vLLM allocates; a longer prompt is cut from the "
                                                    "left (unset: the model's for lm-eval suites; what the prompts "
                                                    "need, at most the model's, for answers and generation)"),
    }


SCHEMA: dict = {
    "description": Key(str, ""),
    "extends": Key(str, None, doc="another recipe file (relative to this one) whose keys this one overrides"),
    "model": {
        "base": Key(str, doc="'builtin:tiny', a model folder under recipes/ (relative to it, like every path in a "
                             "recipe; counted by its files' content) or a Hugging Face hub id"),
        "revision": Key(str, None, doc="hub models: a branch, tag or commit of model.base (part of the run-cache "
                                       "key; the commit it resolves to is recorded with what it built)"),
        "chat_template": Key(str, file=True, doc="Jinja chat template used for training and saved with the model: a "
                                                 "file, or a shipped one by name: default, qwen, chatml, llama3, "
                                                 "llama2, mistral, gemma, alpaca"),
    },
    "data": TableOf({
        "source": Key(str, doc="'generate' (self-instruct with [generate] and [filter]), a file under recipes/ "
                               "(.json, .jsonl, .ndjson, .parquet, .csv; a path that exists there is a file, and "
                               "another suffix is refused) or a Hugging Face hub dataset id ('owner/name', no file "
                               "suffix)"),
        "format": Key(str, "auto", choices=("auto", "alpaca", "sharegpt", "dolly", "messages", "preference",
                                            "alpaca_ranking", "sharegpt_ranking", "orca_dpo"),
                      doc="auto: recognised from the first rows. SFT: alpaca, sharegpt, dolly, messages; preference "
                          "pairs: preference (TRL prompt/chosen/rejected), alpaca_ranking (LLaMA-Factory's alpaca "
                          "form with ranking: true: instruction, input, chosen, rejected strings; the prompt is "
                          "instruction + blank line + input, as in alpaca), sharegpt_ranking, orca_dpo. A DPO stage "
                          "takes preference data only, an SFT stage SFT data only"),
        "columns": Key(dict, {}, doc="the format's field names -> this file's column names (LLaMA-Factory's "
                                     "dataset_info.json 'columns' and 'tags'). An `input` column no mapping reads "
                                     "is never dropped: with a string prompt (e.g. {prompt = \"instruction\"}) it "
                                     "follows the prompt after a blank line, as in alpaca"),
        "split": Key(str, "train", doc="hub datasets: the split"),
        "subset": Key(str, None, doc="hub datasets: the configuration (subset) name"),
        "revision": Key(str, None, doc="hub datasets: a branch, tag or commit (the resolved commit is recorded)"),
        "limit": Key(int, 0, min=0, doc="keep the first N rows (after shuffling, if shuffle_seed is set); 0: all"),
        "shuffle_seed": Key(int, None, doc="shuffle the rows with this seed before limit; unset: file order"),
        "heldout_fraction": Key(float, 0.1, min=0, below=1, doc="records held out (stable content-hash split)"),
        "dedup": Key(bool, False, doc="drop instructions whose ROUGE-L against an earlier kept one is above "
                                      "rouge_threshold (the filter's exact rule)"),
        "rouge_threshold": Key(float, 0.7, above=0, max=1),
        "language": Key(str, "en", choices=("en", "zh"), doc="zh: CJK-aware ROUGE tokens for dedup"),
        "on_bad_row": Key(str, "error", choices=("error", "skip"),
                          doc="error: stop at the first bad rows, naming them; skip: drop and count them"),
    }),
    "generate": {
        "backend": Key(str, "openai", choices=("openai", "local")),
        "model": Key(str, None, doc="endpoint model name (openai) or model reference (local)"),
        "api": Key(str, "completions", choices=("completions", "chat")),
        "base_url": Key(str, None),
        "api_key_env": Key(str, "OPENAI_API_KEY"),
        "concurrency": Key(int, 4, min=1),
        "price_per_1k_tokens": Key(float, 0.0, min=0),
        "style": Key(str, "self_instruct", choices=("self_instruct", "alpaca"),
                     doc="self_instruct: list of instructions, then classification check and instances per task; "
                         "alpaca: one prompt asks for 20 tasks with input and output"),
        "seeds": Key(str, None, file=True),
        "prompt": Key(str, None, file=True),
        "classify_prompt": Key(str, None, file=True),
        "instance_prompt": Key(str, None, file=True),
        "instance_prompt_output_first": Key(str, None, file=True),
        "num_instructions": Key(int, 100, min=1, doc="stop once this many machine instructions were parsed"),
        "max_requests": Key(int, 1000, min=1, doc="request budget for instruction generation"),
        "request_batch_size": Key(int, 5, min=1),
        "num_prompt_instructions": Key(int, 8, min=1),
        "num_machine_in_prompt": Key(int, 2, min=0),
        "temperature": Key(float, 0.7, min=0, max=2),
        "top_p": Key(float, 0.5, above=0, max=1),
        "max_tokens": Key(int, 1024, min=1),
        "instance_max_tokens": Key(int, 300, min=1),
        "seed": Key(int, 42),
        "gpus": _gpus("a generation task with backend = 'local'"),
        "engine": _engine("what runs the local generator (backend = 'local')"),
        "vllm": _vllm("generate"),
    },
    "filter": {
        "rouge_threshold": Key(float, 0.7, above=0, max=1),
        "min_words": Key(int, 4, min=0, doc="instructions with fewer words are dropped"),
        "max_words": Key(int, 150, min=1),
        "blocklist": Key(list, BLOCKLIST),
        "language": Key(str, "en", choices=("en", "zh")),
        "max_instances_per_task": Key(int, 5, min=1),
        "heldout_fraction": Key(float, 0.1, min=0, below=1),
    },
    "train": TableOf({
        "method": Key(str, "sft", choices=("sft", "dpo"), doc="sft: supervised fine-tuning on conversations; "
                                                             "dpo: direct preference optimisation on pairs"),
        "from": Key(str, "base", doc="'base' or another [train.<name>] whose model this stage starts from"),
        "finetuning": Key(str, "lora", choices=("lora", "qlora", "full", "freeze"),
                          doc="lora; qlora (4-bit nf4 base, bitsandbytes); full; freeze (train only [freeze] modules)"),
        "data": Key(list, [], items=(str, dict),
                    doc="datasets to train on: names, or tables {name, limit, weight}; empty: every dataset of the "
                        "method's kind"),
        "max_steps": Key(int, -1, min=-1, doc="-1: train num_epochs epochs"),
        "num_epochs": Key(float, 3.0, above=0),
        "learning_rate": Key(float, 2e-4, above=0),
        "batch_size": Key(int, 4, min=1),
        "gradient_accumulation_steps": Key(int, 1, min=1),
        "max_length": Key(int, 1024, min=8),
        "max_dropped_fraction": Key(float, 0.1, min=0, max=1, doc="fail when more training examples (sft: "
                                                                  "conversations, dpo: pairs) than this share have "
                                                                  "no answer token within max_length"),
        "warmup_steps": Key(int, 0, min=0),
        "lr_scheduler": Key(str, "linear"),
        "logging_steps": Key(int, 10, min=1),
        "seed": Key(int, 42),
        "precision": Key(str, "auto", choices=("auto", "float32", "bfloat16", "float16"),
                         doc="what the model loads and trains in; auto: bfloat16 where the GPU supports it, else "
                             "float32 (CPU); float16 keeps full / freeze weights in float32 (mixed precision); QLoRA "
                             "computes in it; part of the run-cache key as written"),
        "gradient_checkpointing": Key(bool, False, doc="recompute activations in the backward pass: less memory, "
                                                       "slower; the same gradients, so outside the run-cache key"),
        "attn_implementation": Key(str, "auto", choices=("auto", "sdpa", "flash_attention_2", "eager"),
                                   doc="the attention kernel; auto: flash_attention_2 where a GPU, flash-attn and a "
                                       "16-bit precision are there, else transformers' default (sdpa)"),
        "packing": Key(bool, False, doc="sft: pack whole conversations best-fit into max_length rows (TRL's bfd; "
                                        "attention stays inside each conversation; padding-free under flash "
                                        "attention): fewer steps per epoch, more tokens per step"),
        "liger_kernel": Key(bool, False, doc="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear "
                                             "cross-entropy): a GPU and pip install -e '.[liger]'"),
        "save_steps": Key(int, 0, min=0, doc="checkpoint every N steps into artifacts/.scratch, so a killed "
                                            "training resumes there (0: no checkpoints)"),
        "report_to": Key(str, "none", choices=("none", "tensorboard", "wandb", "trackio"),
                         doc="the trainer's live logging; not part of the run-cache key"),
        "beta": Key(float, 0.1, above=0, doc="dpo: strength of the KL penalty (TRL's beta)"),
        "loss_type": Key(str, "sigmoid", choices=("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust",
                                                  "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                                  "apo_down", "discopop", "sigmoid_norm"), doc="dpo: TRL's loss_type"),
        "precompute_ref_log_probs": Key(bool, False, doc="dpo: compute the reference log-probs once, up front"),
        "gpus": _gpus("this training stage's task"),
        "processes": Key(int, None, min=1, doc="training processes, one per GPU (unset: the task's gpus, else 1); "
                                               "each trains batch_size rows, so the global batch is batch_size x "
                                               "gradient_accumulation_steps x processes: part of the run-cache key"),
        "strategy": Key(str, "ddp", choices=("ddp", "fsdp", "zero2", "zero3"),
                        doc="how several processes share the work, under accelerate launch: ddp (replicas; gloo on "
                            "a CPU); fsdp (FSDP2 shards, GPUs); zero2 / zero3 (DeepSpeed, GPUs, the deepspeed "
                            "extra); part of the run-cache key"),
        "lora": {
            "r": Key(int, 8, min=1),
            "alpha": Key(int, 16, min=1),
            "dropout": Key(float, 0.05, min=0, below=1),
            "target_modules": Key(list, ["q_proj", "k_proj", "v_proj", "o_proj"], min=1),
        },
        "freeze": {
            "trainable_modules": Key(list, [], doc="freeze: names (suffixes) of the modules to train"),
            "last_layers": Key(int, 0, min=0, doc="freeze: also train the last N decoder layers"),
        },
    }),
    "merge": {
        "dtype": Key(str, "float32", choices=("float32", "bfloat16", "float16")),
        "gpus": _gpus("a merge task"),
    },
    "eval": {
        "batch_size": Key(int, 8, min=1),
        "device": Key(str, "auto"),
        "heldout": Key(bool, True, doc="score mean loss/perplexity of held-out reference responses"),
        "heldout_max_items": Key(int, 200, min=1),
        "gpus": _gpus("each evaluation, answers or local-judge task"),
        "engine": _engine("what generates in [eval]: the lm-eval suites (lm-eval's hf or vllm model type), the "
                          "judge's answers and a local judge (the held-out loss is always transformers')"),
        "vllm": _vllm("eval"),
        "judge": {
            "enabled": Key(bool, False, doc="LLM-as-judge: tuned vs base answers on an instruction set"),
            "mode": Key(str, "pairwise", choices=("pairwise", "single")),
            "reference": Key(str, "base", doc="the model the final model is judged against: 'base' or any model "
                                              "the recipe evaluates (a training stage, an [eval.models] name)"),
            "instructions": Key(str, None, file=True, doc="JSONL: id, instruction, input (optional)"),
            "prompt": Key(str, None, file=True, doc="judge prompt: {instruction}, {answer_a}, {answer_b} "
                                                    "(pairwise) or {instruction}, {answer} (single)"),
            "backend": Key(str, "openai", choices=("openai", "local")),
            "model": Key(str, "gpt-4o-mini", doc="judge model: endpoint model name, or model reference (local)"),
            "api": Key(str, "chat", choices=("completions", "chat")),
            "base_url": Key(str, None),
            "api_key_env": Key(str, "OPENAI_API_KEY"),
            "concurrency": Key(int, 8, min=1),
            "price_per_1k_tokens": Key(float, 0.0, min=0),
            "answer_max_tokens": Key(int, 256, min=1, doc="answer length of the compared models"),
            "judge_max_items": Key(int, 0, min=0, doc="0: every instruction"),
            "max_no_verdict_rate": Key(float, 0.2, min=0, max=1, doc="warn (build output and report) when the "
                                       "judge gives no verdict on more than this share of instructions"),
        },
        "models": TableOf({
            "model": Key(str, doc="'builtin:tiny', a model folder under recipes/, a hub id, or 'recipe:<name>' "
                                  "(that recipe's tuned model)"),
            "revision": Key(str, None, doc="hub models: a branch, tag or commit"),
        }),
        "suites": TableOf({
            "tasks": Key(list, min=1, doc="lm-eval task or group names"),
            "include_path": Key(str, None, file=True, folder=True, doc="folder of lm-eval task YAML (+ data) under recipes/"),
            "num_fewshot": Key(int, 0, min=0),
            "limit": Key(int, 0, min=0, doc="0: all documents"),
            "apply_chat_template": Key(bool, False),
            "max_gen_toks": Key(int, 0, min=0, doc="0: each task's own generation_kwargs"),
            "engine": Key(str, None, choices=("hf", "vllm"), doc="this suite's engine (unset: eval.engine)"),
            "categories": Key(str, None, file=True,
                              doc="JSON file: subject (lm-eval task name) -> category or list of categories"),
        }),
    },
}

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# what the same setting is called elsewhere (transformers' TrainingArguments, PEFT, LLaMA-Factory): for "did you mean"
ALIASES = {"num_train_epochs": "num_epochs", "epochs": "num_epochs", "per_device_train_batch_size": "batch_size",
           "gradient_accumulation": "gradient_accumulation_steps", "cutoff_len": "max_length",
           "max_seq_length": "max_length", "max_len": "max_length", "lr_scheduler_type": "lr_scheduler",
           "finetuning_type": "finetuning", "stage": "method", "dataset": "data", "pref_beta": "beta",
           "pref_loss": "loss_type", "lora_rank": "r", "rank": "r", "lora_r": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "lora_target": "target_modules", "model_name_or_path": "base",
           "template": "chat_template", "formatting": "format", "file_name": "source", "hf_hub_url": "source"}
