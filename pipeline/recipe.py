"""Recipe schema: the one place that says which keys a recipe may hold, their types and defaults.

A recipe is `recipes/<name>.toml`. It may `extends = "other.toml"` and override any key. Validation happens when
`dodo.py` loads, before any task runs; every problem is reported as `<file>: <dotted.key>: <what was expected>`.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import TunebuildError

REQUIRED = object()
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny",)


def _copy(obj):
    """A deep copy of TOML data (dicts, lists, scalars): several times faster than copy.deepcopy."""
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
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
        "packing": Key(bool, False, doc="sft: pack whole conversations best-fit into max_length rows (TRL's bfd, "
                                        "padding-free; attention stays inside each conversation): fewer steps per "
                                        "epoch, more tokens per step"),
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


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path                 # the recipe file
    files: tuple[Path, ...]    # the recipe files it was merged from (itself and what it extends)
    config: dict               # validated, defaults filled; file keys stay relative to the recipes folder
    sweep: dict | None = None  # for a sweep variant: {"name", "axes": [{axis, key, label, value}], "baseline"}

    def section(self, name: str) -> dict:
        return _copy(self.config[name])


def _type_name(t) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    return names.get(t, getattr(t, "__name__", str(t)))


def _check_value(where: str, key: Key, value):
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and key.type is not bool:
        raise RecipeError(f"{where}: expected {_type_name(key.type)}, got {value!r}")
    if not isinstance(value, key.type):
        raise RecipeError(f"{where}: expected {_type_name(key.type)}, got {value!r}")
    if key.choices and value not in key.choices:
        raise RecipeError(f"{where}: expected one of {', '.join(map(repr, key.choices))}, got {value!r}")
    if key.type is list and not all(isinstance(v, key.items) for v in value):
        kinds = " or ".join("strings" if t is str else "tables" for t in key.items)
        raise RecipeError(f"{where}: expected a list of {kinds}, got {value!r}")
    if key.type is dict and not all(isinstance(v, str) for v in value.values()):
        raise RecipeError(f"{where}: expected a table of strings, got {value!r}")
    return value


def _validate(table: dict, schema: dict, prefix: str, file: Path, recipes_dir: Path) -> dict:
    out = {}
    for k in table:
        if k not in schema:
            from pipeline.formats import did_you_mean

            hint = did_you_mean(ALIASES.get(k, k) if ALIASES.get(k) in schema else k, schema)
            raise RecipeError(f"{file}: unknown key '{prefix}{k}'{hint} (known keys here: "
                              f"{', '.join(sorted(schema))})")
    for k, spec in schema.items():
        dotted = f"{prefix}{k}"
        where = f"{file}: {dotted}"
        if isinstance(spec, dict):
            sub = table.get(k, {})
            if not isinstance(sub, dict):
                raise RecipeError(f"{where}: expected a table [{dotted}], got {sub!r}")
            out[k] = _validate(sub, spec, dotted + ".", file, recipes_dir)
        elif isinstance(spec, TableOf):
            sub = table.get(k, {})
            if not isinstance(sub, dict):
                raise RecipeError(f"{where}: expected a table of named entries, got {sub!r}")
            out[k] = {}
            for name, entry in sub.items():
                if not isinstance(entry, dict):
                    raise RecipeError(f"{where}.{name}: expected a table, got {entry!r}")
                if not NAME_RE.match(name):
                    raise RecipeError(f"{where}.{name}: names may hold letters, digits, '_', '.', '-' only")
                out[k][name] = _validate(entry, spec.schema, f"{dotted}.{name}.", file, recipes_dir)
        elif k in table:
            value = _check_value(where, spec, table[k])
            problem = spec.check_range(value)
            if problem:
                raise RecipeError(f"{where}: {problem}")
            if spec.file:
                _check_path(where, value, spec.folder, recipes_dir)
            out[k] = value
        elif spec.default is REQUIRED:
            raise RecipeError(f"{where}: required key is missing ({spec.doc or _type_name(spec.type)})")
        else:
            out[k] = _copy(spec.default)
    return out


def _check_path(where: str, value: str, folder: bool, recipes_dir: Path) -> None:
    """A file key names a file (or, for `folder` keys, a folder) inside the recipes folder."""
    path = recipes_dir / value
    if Path(value).is_absolute() or not path.resolve().is_relative_to(recipes_dir.resolve()):
        raise RecipeError(f"{where}: '{value}' is outside {recipes_dir} (paths are relative to it and stay inside)")
    if not path.exists():
        raise RecipeError(f"{where}: file '{value}' does not exist (paths are relative to {recipes_dir})")
    if folder and not path.is_dir():
        raise RecipeError(f"{where}: '{value}' is a file; expected a folder (of lm-eval task YAML)")
    if not folder and path.is_dir():
        raise RecipeError(f"{where}: '{value}' is a folder; expected a file")


def _deep_merge(base: dict, over: dict) -> dict:
    merged = _copy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = _copy(v)
    return merged


_TOML: dict[bytes, dict] = {}    # parsed TOML by content: 50 recipes extending one file parse it once
_TEMPLATES: set[str] = set()     # chat templates (their text) already checked


def _read_toml(path: Path) -> dict:
    try:
        data = Path(path).read_bytes()
        if data not in _TOML:
            _TOML[data] = tomllib.loads(data.decode("utf-8"))
        return _copy(_TOML[data])
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read: {e.strerror}") from None


def _resolve_extends(path: Path, recipes_dir: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, tuple[Path, ...]]:
    """The recipe merged with what it extends (relative to the extending file, inside `recipes_dir`), and the
    files it was merged from."""
    shown, path = path, path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise RecipeError(f"{seen[0]}: extends: circular ({chain})")
    if not seen and not path.is_relative_to(Path(recipes_dir).resolve()):  # e.g. a link to a file elsewhere
        link = f" (a link to {path})" if Path(shown).absolute() != path else ""
        raise RecipeError(f"{shown}: the recipe file is outside {recipes_dir}{link}: recipes and the files they "
                          f"name stay inside it")
    raw = _read_toml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, (path,)
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a string naming a recipe file, got {parent!r}")
    parent_path = path.parent / parent
    if Path(parent).is_absolute() or not parent_path.resolve().is_relative_to(Path(recipes_dir).resolve()):
        raise RecipeError(f"{path}: extends: '{parent}' is outside {recipes_dir} (expected a recipe file inside "
                          f"it, relative to {path.parent})")
    if not parent_path.exists():
        raise RecipeError(f"{path}: extends: file '{parent}' does not exist")
    base, files = _resolve_extends(parent_path, recipes_dir, (*seen, path))
    return _deep_merge(base, raw), (path, *files)


def load_recipe(path: Path, recipes_dir: Path) -> Recipe:
    """Read, merge (extends) and validate one recipe file (a sweep: use `load_recipe_variants`)."""
    return load_recipe_variants(path, recipes_dir)[0]


def load_recipe_variants(path: Path, recipes_dir: Path) -> list[Recipe]:
    """One recipe, or the variants of a recipe with a [sweep] table, each validated like a recipe of its own."""
    path = Path(path)
    name = path.stem
    if not NAME_RE.match(name) or "." in name:
        raise RecipeError(f"{path}: recipe file names may hold letters, digits, '_' and '-' only")
    raw, files = _resolve_extends(path, recipes_dir)
    sweep = raw.pop("sweep", None)
    if sweep is None:
        return [_load(path, name, raw, files, recipes_dir)]
    return [_load(path, f"{name}.{label}", variant, files, recipes_dir, info)
            for label, variant, info in expand_sweep(path, name, raw, sweep)]


SWEEP_KEYS = ("exclude", "sort_by", "descending")


def _set_dotted(table: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        table = table.setdefault(p, {})
        if not isinstance(table, dict):
            raise KeyError(dotted)
    table[last] = value


def _label(axis: str, value) -> str:
    if isinstance(value, bool):
        return f"{axis}{str(value).lower()}"
    if isinstance(value, (int, float)):
        return re.sub(r"[^A-Za-z0-9_]+", "_", f"{axis}{value:g}")  # 0.01 -> lr0_01, 1e-05 -> lr1e_05
    text = Path(str(value)).stem if "/" in str(value) or "." in str(value) else str(value)
    return re.sub(r"[^A-Za-z0-9_]+", "_", text)


def expand_sweep(path: Path, name: str, raw: dict, sweep) -> list[tuple[str, dict, dict]]:
    """The grid of a [sweep] table: `[sweep.<axis>] key = "dotted.key", values = [...], labels = [...]` per axis
    (labels default to `<axis><number>` for numbers and the file stem or value for strings), optionally
    `exclude = [{<axis> = "<label>", ...}]`. Returns (variant label, raw config, sweep info) per variant, the
    first value of every axis being the baseline."""
    import itertools

    where = f"{path}: sweep"
    if not isinstance(sweep, dict):
        raise RecipeError(f"{where}: expected a table of axes, e.g. [sweep.size] key = \"generate.num_instructions\", "
                          f"values = [100, 338]")
    axes = []
    for axis, spec in sweep.items():
        if axis in SWEEP_KEYS:
            continue
        if not isinstance(spec, dict) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", axis):
            raise RecipeError(f"{where}.{axis}: expected a table [sweep.{axis}] with key and values (axis names: "
                              f"letters, digits, '_')")
        unknown = sorted(set(spec) - {"key", "values", "labels"})
        if unknown:
            raise RecipeError(f"{where}.{axis}.{unknown[0]}: unknown key (known: key, values, labels)")
        key, values = spec.get("key"), spec.get("values")
        if not isinstance(key, str) or not key or key.split(".")[0] in ("sweep", "extends"):
            raise RecipeError(f"{where}.{axis}.key: expected the dotted recipe key to vary, e.g. 'train.sft.learning_rate'")
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{where}.{axis}.values: expected a non-empty list of values for {key}")
        labels = spec.get("labels") or [_label(axis, v) for v in values]
        if not isinstance(labels, list) or len(labels) != len(values) or len(set(labels)) != len(labels) or \
                not all(isinstance(x, str) and re.fullmatch(r"[A-Za-z0-9_]+", x) for x in labels):
            raise RecipeError(f"{where}.{axis}.labels: expected {len(values)} distinct short labels (letters, "
                              f"digits, '_'), one per value, got {labels!r}")
        axes.append({"axis": axis, "key": key, "values": values, "labels": labels})
    if not axes:
        raise RecipeError(f"{where}: no axis: add [sweep.<axis>] tables with key and values")
    exclude = sweep.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        raise RecipeError(f"{where}.exclude: expected a list of tables {{<axis> = \"<label>\", ...}}")
    known = {a["axis"]: set(a["labels"]) for a in axes}
    for e in exclude:
        for axis, label in e.items():
            if axis not in known or label not in known[axis]:
                raise RecipeError(f"{where}.exclude: {axis} = {label!r} names no axis label (axes: "
                                  f"{', '.join(f'{a}: {sorted(v)}' for a, v in known.items())})")
    out = []
    baseline = "-".join(a["labels"][0] for a in axes)
    for combo in itertools.product(*(range(len(a["values"])) for a in axes)):
        picked = {a["axis"]: a["labels"][i] for a, i in zip(axes, combo)}
        if any(all(picked.get(k) == v for k, v in e.items()) for e in exclude):
            continue
        variant = _copy(raw)
        for a, i in zip(axes, combo):
            try:
                _set_dotted(variant, a["key"], _copy(a["values"][i]))
            except KeyError:
                raise RecipeError(f"{where}.{a['axis']}.key: {a['key']!r} does not name a recipe key") from None
        label = "-".join(picked.values())
        info = {"name": name, "baseline": f"{name}.{baseline}", "sort_by": sweep.get("sort_by"),
                "descending": bool(sweep.get("descending", True)),
                "axes": [{"axis": a["axis"], "key": a["key"], "label": a["labels"][i], "value": a["values"][i]}
                         for a, i in zip(axes, combo)]}
        out.append((label, variant, info))
    return out


def _load(path: Path, name: str, raw: dict, files, recipes_dir: Path, sweep: dict | None = None) -> Recipe:
    if "sft" in raw:
        raise RecipeError(f"{path}: [sft] is now a training stage: rename the table to [train.sft] (method = 'sft' "
                          f"and finetuning = 'lora' are the defaults; its keys stay the same, [sft.lora] becomes "
                          f"[train.sft.lora])")
    template = raw.get("model", {}).get("chat_template") if isinstance(raw.get("model"), dict) else None
    if isinstance(template, str):
        from pipeline.templates import resolve, unknown

        if (why := unknown(template, recipes_dir)) is not None:
            raise RecipeError(f"{path}: model.chat_template: {why}")
        raw["model"]["chat_template"] = resolve(template)  # a short name (`chatml`, `llama3`, ...) or a file
    config = _validate(raw, SCHEMA, "", path, recipes_dir)
    config.pop("extends", None)
    # settings that do not apply are refused where they are written (not when a parent recipe set them)
    own = _read_toml(path)
    own.pop("sweep", None)
    _check_data(path, own, config, recipes_dir)
    _check_semantics(path, config)
    _check_models(path, config, recipes_dir)
    return Recipe(name=name, path=path, files=files, config=config, sweep=sweep)


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FILE_SUFFIX_RE = re.compile(r"\.(?!v\d)[A-Za-z][A-Za-z0-9]{0,7}$")  # .txt, .tsv, .gz, .bz2; not .v2 or -2.5
IMPORT_ONLY = ("format", "columns", "split", "subset", "revision", "limit", "shuffle_seed", "heldout_fraction",
               "dedup", "rouge_threshold", "language", "on_bad_row")


def is_local_source(source: str) -> bool:
    return source.lower().endswith(DATA_FILE_SUFFIXES)


def _file_like(src: str, recipes_dir: Path) -> bool:
    """A data source that names a file (not a hub id): a path that exists under recipes/, a path-like spelling, or a
    name ending in a file suffix."""
    if src.startswith(("./", "../", "/", "~")) or "\\" in src or src.count("/") > 1 or FILE_SUFFIX_RE.search(src):
        return True
    file = Path(recipes_dir) / src
    return file.resolve().is_relative_to(Path(recipes_dir).resolve()) and \
        (file.exists() or (Path(recipes_dir) / Path(src).parts[0]).is_dir())


def _check_data(path: Path, raw: dict, c: dict, recipes_dir: Path) -> None:
    from pipeline.formats import FormatError, check_columns

    raw_data = raw.get("data", {})
    for name, d in c["data"].items():
        where = f"{path}: data.{name}"
        src = d["source"]
        if src == "generate":
            extra = [k for k in IMPORT_ONLY if k in raw_data.get(name, {})]
            if extra:
                raise RecipeError(f"{where}.{extra[0]}: not used with source = 'generate' (the [filter] section "
                                  f"sets the rules and heldout_fraction of a generated dataset)")
            continue
        if is_local_source(src):
            file = recipes_dir / src
            if not file.resolve().is_relative_to(recipes_dir.resolve()):
                raise RecipeError(f"{where}.source: '{src}' is outside {recipes_dir} (data files live under recipes/)")
            if not file.is_file():
                raise RecipeError(f"{where}.source: file '{src}' does not exist (paths are relative to {recipes_dir})")
        elif _file_like(src, recipes_dir):
            file = recipes_dir / src
            if Path(src).is_absolute() or not file.resolve().is_relative_to(recipes_dir.resolve()):
                raise RecipeError(f"{where}.source: '{src}' is outside {recipes_dir} (data files live under recipes/)")
            suffix = Path(src).suffix
            what = "is a folder" if file.is_dir() else f"is a {suffix or 'suffix-less'} file" if file.exists() else \
                f"ends in {suffix}, not a data file suffix" if suffix else f"is no file (tried {file})"
            raise RecipeError(f"{where}.source: '{src}' {what}; expected a file under recipes/ ending in "
                              f"{', '.join(DATA_FILE_SUFFIXES)}, or a hub dataset id like 'owner/name' (no file "
                              f"suffix)")
        elif not HUB_ID_RE.match(src):
            raise RecipeError(f"{where}.source: expected 'generate', a file under recipes/ ending in "
                              f"{', '.join(DATA_FILE_SUFFIXES)}, or a hub dataset id like 'owner/name', got {src!r}")
        if d["format"] != "auto" or d["columns"]:
            try:
                check_columns(d["format"], d["columns"])
            except FormatError as e:
                raise RecipeError(f"{where}.columns: {e}") from None
    _check_train(path, raw.get("train", {}), c)
    _check_train_data_kinds(path, c, recipes_dir)


DPO_ONLY = ("beta", "loss_type", "precompute_ref_log_probs")
SFT_ONLY = ("packing",)  # TRL 1.16's DPOTrainer has padding_free disabled (it warns and pads): no DPO packing


def _check_train(path: Path, raw_train: dict, c: dict) -> None:
    """[train.<name>]: data names exist, `from` names an earlier stage (no cycle), each method's own keys only."""
    stages = c["train"]
    for name, t in stages.items():
        where = f"{path}: train.{name}"
        raw = raw_train.get(name, {})
        misplaced = [k for k in (DPO_ONLY if t["method"] != "dpo" else SFT_ONLY) if k in raw]
        if misplaced:
            why = " (packing is TRL's SFT packing; its DPOTrainer has padding_free disabled: it would warn and pad)" \
                if misplaced[0] == "packing" else ""
            raise RecipeError(f"{where}.{misplaced[0]}: not a setting of method = '{t['method']}'{why}")
        if t["processes"] is not None and t["gpus"] and t["processes"] != t["gpus"]:
            raise RecipeError(f"{where}.processes: {t['processes']}, but gpus = {t['gpus']}: one process per GPU "
                              f"(leave processes unset to follow gpus)")
        if t["finetuning"] != "freeze" and "freeze" in raw:
            raise RecipeError(f"{where}.freeze: only for finetuning = 'freeze'")
        if t["finetuning"] not in ("lora", "qlora") and "lora" in raw:
            raise RecipeError(f"{where}.lora: only for finetuning = 'lora' or 'qlora'")
        if t["finetuning"] == "freeze" and not (t["freeze"]["trainable_modules"] or t["freeze"]["last_layers"]):
            raise RecipeError(f"{where}.freeze: name the trainable_modules or the last_layers to train")
        if t["from"] != "base" and t["from"] not in stages:
            raise RecipeError(f"{where}.from: expected 'base' or a [train.<name>] of this recipe "
                              f"({', '.join(sorted(stages))}), got {t['from']!r}")
        seen, cur = [name], t["from"]
        while cur != "base":
            if cur in seen:
                raise RecipeError(f"{where}.from: circular ({' <- '.join(seen + [cur])})")
            seen.append(cur)
            cur = stages[cur]["from"]
        if name in ("base",) or name in c["eval"]["models"]:
            raise RecipeError(f"{where}: a training stage may not be called {name!r} (a model of the same name exists)")
        for i, item in enumerate(t["data"]):
            dwhere = f"{where}.data[{i}]"
            if isinstance(item, dict):
                unknown = sorted(set(item) - {"name", "limit", "weight"})
                if unknown:
                    raise RecipeError(f"{dwhere}.{unknown[0]}: unknown key (known: name, limit, weight)")
                if not isinstance(item.get("name"), str):
                    raise RecipeError(f"{dwhere}.name: expected the name of a [data.<name>] table")
                limit, weight = item.get("limit", 0), item.get("weight", 1.0)
                if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                    raise RecipeError(f"{dwhere}.limit: expected 0 (all) or a positive number of examples, "
                                      f"got {limit!r}")
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
                    raise RecipeError(f"{dwhere}.weight: expected a number > 0, got {weight!r}")
                dname = item["name"]
            else:
                dname = item
            if dname not in c["data"]:
                known = ", ".join(sorted(c["data"])) or "none"
                raise RecipeError(f"{dwhere}: no dataset named {dname!r} (the recipe's [data.<name>] tables: "
                                  f"{known})")


def _check_train_data_kinds(path: Path, c: dict, recipes_dir: Path) -> None:
    """Each training stage's datasets are of the kind its method trains on (what their format says, or what the
    first rows of a local file show), so a DPO stage on conversations fails here, not after its upstream built."""
    from pipeline.dataset import declared_kind
    from pipeline.formats import PREFERENCE_FORMATS

    words = {"sft": "conversations (SFT data)", "preference": "preference pairs (prompt, chosen, rejected)"}
    for name, t in sorted(c["train"].items()):
        kind = "preference" if t["method"] == "dpo" else "sft"
        other = "dpo" if kind == "sft" else "sft"
        items = [(f"data[{i}]", x if isinstance(x, str) else x["name"]) for i, x in enumerate(t["data"])] or \
            [("data", n) for n, d in sorted(c["data"].items())
             if (d["format"] in PREFERENCE_FORMATS) == (kind == "preference") or d["format"] == "auto"]
        for key, dname in items:
            found, how = declared_kind(c["data"][dname], recipes_dir)
            if found is not None and found != kind:
                picked = "" if t["data"] else " (empty: every dataset that may hold them)"
                raise RecipeError(f"{path}: train.{name}.{key}: dataset {dname!r} holds {words[found]} ({how}); "
                                  f"method = '{t['method']}' trains on {words[kind]}{picked}: name a dataset of "
                                  f"that kind, or set method = '{other}'")


def train_order(c: dict) -> list[str]:
    """The training stages, each after the one it starts `from` (then by name)."""
    stages, order = c["train"], []

    def depth(n):
        return 0 if stages[n]["from"] == "base" else 1 + depth(stages[n]["from"])
    return sorted(stages, key=lambda n: (depth(n), n)) if stages else order


def _check_semantics(path: Path, c: dict) -> None:
    import jinja2

    template = path.parent / c["model"]["chat_template"]
    try:
        text = template.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: model.chat_template: {template} is not UTF-8 text (byte {e.start})") from None
    if text not in _TEMPLATES:
        try:
            jinja2.Environment().parse(text)
        except jinja2.TemplateSyntaxError as e:
            raise RecipeError(f"{path}: model.chat_template: {template} is not a valid Jinja template "
                              f"(line {e.lineno}: {e.message})") from None
        if "add_generation_prompt" not in text:
            raise RecipeError(f"{path}: model.chat_template: {template} has no add_generation_prompt branch, so "
                              f"evaluation, the judge's answers and the chat app could not open the assistant's "
                              f"turn (end the template with {{% if add_generation_prompt %}}...{{% endif %}})")
        if "messages" not in text:
            raise RecipeError(f"{path}: model.chat_template: {template} never reads `messages`, so it renders no "
                              f"conversation")
        _TEMPLATES.add(text)
    ref = c["model"]["base"]
    if ref.startswith(BUILTIN_PREFIX) and ref not in BUILTIN_MODELS:
        raise RecipeError(f"{path}: model.base: unknown built-in model {ref!r} (known: {', '.join(BUILTIN_MODELS)})")
    if any(d["source"] == "generate" for d in c["data"].values()):
        _check_generate(path, c)
    _check_eval(path, c)


REVISION_RE = re.compile(r"^[\w./-]+$")


def _check_model_ref(where: str, ref: str, recipes_dir: Path, revision: str | None = None) -> None:
    """A model reference: a model folder is a path relative to recipes/ that stays inside it (the rules of every
    file key); a value that is no such folder must be a hub id. Each refusal names the path it tried."""
    if ref.startswith((BUILTIN_PREFIX, "recipe:")):
        kind = "builtin"
    else:
        folder = Path(recipes_dir) / ref
        tried = f"tried {folder}; model folders are relative to {recipes_dir}, like every path in a recipe"
        looks_like_path = Path(ref).is_absolute() or ref.startswith(("./", "../", "~")) or "\\" in ref \
            or ".." in Path(ref).parts or ref.count("/") > 1
        if Path(ref).is_absolute() or not folder.resolve().is_relative_to(Path(recipes_dir).resolve()):
            raise RecipeError(f"{where}: '{ref}' is outside {recipes_dir} (model folders are relative to it and stay "
                              f"inside; links leading out are refused)")
        if folder.is_dir():
            kind = "folder"
        elif folder.exists():
            raise RecipeError(f"{where}: '{ref}' is a file ({folder}); expected a model folder or a hub id")
        elif looks_like_path or not HUB_ID_RE.match(ref) or (Path(recipes_dir).parent / ref).is_dir() \
                or (Path(recipes_dir) / Path(ref).parts[0]).is_dir():
            raise RecipeError(f"{where}: no model folder '{ref}' ({tried}) and not a Hugging Face hub id either")
        else:
            kind = "hub"
    if revision is not None:
        if kind != "hub":
            raise RecipeError(f"{where.rsplit('.', 1)[0]}.revision: only for a hub model ({ref!r} is "
                              f"{'a local folder' if kind == 'folder' else 'not a hub id'})")
        if not REVISION_RE.match(revision):
            raise RecipeError(f"{where.rsplit('.', 1)[0]}.revision: expected a branch, tag or commit, got "
                              f"{revision!r}")


def _check_models(path: Path, c: dict, recipes_dir: Path) -> None:
    """Every model reference of the recipe: model.base (with model.revision), [eval.models], and the local
    generator and judge models."""
    base = c["model"]
    _check_model_ref(f"{path}: model.base", base["base"], recipes_dir, base["revision"])
    for name, mc in sorted(c["eval"]["models"].items()):
        _check_model_ref(f"{path}: eval.models.{name}.model", mc["model"], recipes_dir, mc["revision"])
    g, j = c["generate"], c["eval"]["judge"]
    if g["backend"] == "local" and g["model"] and any(d["source"] == "generate" for d in c["data"].values()):
        _check_model_ref(f"{path}: generate.model", g["model"], recipes_dir)
    if j["enabled"] and j["backend"] == "local":
        _check_model_ref(f"{path}: eval.judge.model", j["model"], recipes_dir)


def _check_generate(path: Path, c: dict) -> None:
    g = c["generate"]
    needed = ["model", "seeds", "prompt"]
    if g["style"] == "self_instruct":
        needed += ["classify_prompt", "instance_prompt", "instance_prompt_output_first"]
    for key in needed:
        if g[key] is None:
            raise RecipeError(f"{path}: generate.{key}: required key is missing (a dataset has source = 'generate')")
    if g["model"].startswith(BUILTIN_PREFIX) and g["model"] not in BUILTIN_MODELS:
        raise RecipeError(f"{path}: generate.model: unknown built-in model {g['model']!r} "
                          f"(known: {', '.join(BUILTIN_MODELS)})")
    if g["backend"] == "openai" and g["model"].startswith(BUILTIN_PREFIX):
        raise RecipeError(f"{path}: generate.model: {g['model']!r} is a built-in model; set generate.backend = 'local'")
    if g["style"] == "self_instruct" and not 0 < g["num_machine_in_prompt"] < g["num_prompt_instructions"]:
        raise RecipeError(f"{path}: generate.num_machine_in_prompt: expected 1..num_prompt_instructions-1")
    if g["style"] == "alpaca" and not 0 < g["num_prompt_instructions"] < 20:
        raise RecipeError(f"{path}: generate.num_prompt_instructions: expected 1..19 seed tasks in an alpaca "
                          f"prompt of 20 tasks")


def _check_eval(path: Path, c: dict) -> None:
    j = c["eval"]["judge"]
    if j["enabled"]:
        for key in ("instructions", "prompt"):
            if not j[key]:
                raise RecipeError(f"{path}: eval.judge.{key}: required when eval.judge.enabled = true")
        if j["backend"] == "openai" and j["model"].startswith(BUILTIN_PREFIX):
            raise RecipeError(f"{path}: eval.judge.model: {j['model']!r} is a built-in model; set "
                              f"eval.judge.backend = 'local'")
    for name, mc in c["eval"]["models"].items():
        where = f"{path}: eval.models.{name}"
        if name in ("base", "tuned") or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise RecipeError(f"{where}: a model name holds letters, digits, '_' or '-' and is not 'base' or 'tuned'")
        ref = mc["model"]
        if ref.startswith(BUILTIN_PREFIX) and ref not in BUILTIN_MODELS:
            raise RecipeError(f"{where}.model: unknown built-in model {ref!r} (known: {', '.join(BUILTIN_MODELS)})")
        if ref.startswith("recipe:") and not NAME_RE.match(ref[len("recipe:"):]):
            raise RecipeError(f"{where}.model: expected 'recipe:<recipe name>', got {ref!r}")
    for suite, sc in c["eval"]["suites"].items():
        if sc["categories"]:
            _check_categories(path, f"eval.suites.{suite}.categories", path.parent / sc["categories"])
    if not c["eval"]["suites"] and not c["eval"]["heldout"] and not j["enabled"]:
        raise RecipeError(f"{path}: eval.suites: no suite and eval.heldout = false: nothing would be evaluated")


def _check_categories(path: Path, dotted: str, file: Path) -> None:
    import json

    try:
        mapping = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RecipeError(f"{path}: {dotted}: {file} is not valid JSON ({e})") from None
    ok = isinstance(mapping, dict) and all(
        isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))
        for v in mapping.values())
    if not ok or not mapping:
        raise RecipeError(f"{path}: {dotted}: {file} must map each subject (an lm-eval task name) to a category "
                          f"or a list of categories")


def load_recipes(recipes_dir: Path, errors: list[str] | None = None) -> list[Recipe]:
    """Every `*.toml` directly under `recipes_dir`, validated. Without `errors`, raises RecipeError on the first
    bad one; with it, a bad file's one-line error is appended there and the others still load."""
    files = sorted(Path(recipes_dir).glob("*.toml"))
    if not files:
        raise RecipeError(f"{recipes_dir}: no recipes (*.toml) here: write one, e.g. by copying demo.toml from "
                          f"the tunebuild repository")
    out = []
    for p in files:
        try:
            out += load_recipe_variants(p, recipes_dir)
        except RecipeError as e:
            if errors is None:
                raise
            errors.append(str(e))
    return out


def reference() -> str:
    """The recipe reference (recipes/REFERENCE.md), generated from SCHEMA: every key, its type, default, allowed
    values and meaning. `python -m pipeline.recipe > recipes/REFERENCE.md` rewrites it; a test keeps it current."""
    import json

    lines = ["# Recipe reference", "",
             "Generated from the schema (`pipeline/recipe.py`) by `python -m pipeline.recipe > recipes/REFERENCE.md`; "
             "a test fails when it is out of date. `<name>` stands for a name you choose. File keys are paths "
             "relative to `recipes/` and must stay inside it.", "",
             "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]

    def walk(schema: dict, prefix: str):
        for k, spec in schema.items():
            dotted = f"{prefix}{k}"
            if isinstance(spec, dict):
                walk(spec, dotted + ".")
            elif isinstance(spec, TableOf):
                walk(spec.schema, f"{dotted}.<name>.")
            else:
                short = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "table"}
                kind = "folder" if spec.folder else "file" if spec.file else short.get(spec.type, str(spec.type))
                default = "required" if spec.default is REQUIRED else (
                    "—" if spec.default is None else f"`{json.dumps(spec.default, ensure_ascii=False)}`")
                allowed = ", ".join(f"`{c}`" for c in spec.choices) if spec.choices else spec.range_text()
                lines.append(f"| `{dotted}` | {kind} | {default} | {allowed} | {spec.doc} |")

    walk(SCHEMA, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
