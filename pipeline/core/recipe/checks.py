"""The checks across a recipe's keys, once each value has its type and range (`pipeline.core.recipe.load`): data
sources, training stages (their `from` chain, their datasets' kind, each method's own keys), the chat template,
model references (folders inside recipes/ or hub ids), generation and evaluation settings. `check` runs them all;
each problem is one `RecipeError` naming the file and the dotted key.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.recipe.schema import BUILTIN_MODELS, BUILTIN_PREFIX, NAME_RE, RecipeError

_TEMPLATES: set[str] = set()     # chat templates (their text) already checked


def check(path: Path, own: dict, config: dict, recipes_dir: Path) -> None:
    """Every check of a validated recipe `config`; `own` is the recipe file's own table (without what it extends):
    settings that do not apply are refused where they are written, not when a parent recipe set them."""
    _check_data(path, own, config, recipes_dir)
    _check_semantics(path, config)
    _check_models(path, config, recipes_dir)


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
    from pipeline.data.formats import FormatError, check_columns

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
    from pipeline.data.dataset import declared_kind
    from pipeline.data.formats import PREFERENCE_FORMATS

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
    _check_engine(path, "generate", g, g["engine"] == "vllm")
    if g["engine"] == "vllm" and g["backend"] != "local":
        raise RecipeError(f"{path}: generate.engine: 'vllm' runs a local model; expected backend = 'local' (an "
                          f"OpenAI-compatible endpoint, vLLM's own server included, generates on its side)")
    if g["style"] == "alpaca" and not 0 < g["num_prompt_instructions"] < 20:
        raise RecipeError(f"{path}: generate.num_prompt_instructions: expected 1..19 seed tasks in an alpaca "
                          f"prompt of 20 tasks")


def _check_engine(path: Path, section: str, c: dict, used: bool) -> None:
    """A section's [vllm] settings apply only where its engine is vllm, and split the model over at most the
    GPUs its tasks hold."""
    settings = {k: v for k, v in c["vllm"].items() if v is not None}
    if settings and not used:
        where = "eval.engine or an eval.suites.<name>.engine" if section == "eval" else "generate.engine"
        raise RecipeError(f"{path}: {section}.vllm.{sorted(settings)[0]}: only for the vllm engine (set {where} "
                          f"= 'vllm')")
    tp = settings.get("tensor_parallel_size")
    if tp and c["gpus"] is not None and tp > c["gpus"]:
        raise RecipeError(f"{path}: {section}.vllm.tensor_parallel_size: expected at most {section}.gpus "
                          f"({c['gpus']}, the GPUs each task holds), got {tp}")


def _check_eval(path: Path, c: dict) -> None:
    j = c["eval"]["judge"]
    ev = c["eval"]
    engines = {name: sc["engine"] or ev["engine"] for name, sc in ev["suites"].items()}
    vllm_generates = ev["engine"] == "vllm" and j["enabled"]
    _check_engine(path, "eval", ev, vllm_generates or "vllm" in engines.values())
    if ev["engine"] == "vllm" and not vllm_generates and "vllm" not in engines.values():
        raise RecipeError(f"{path}: eval.engine: 'vllm' but nothing in [eval] generates with it (no suite on it and "
                          f"eval.judge.enabled = false; the held-out loss is always computed with transformers)")
    if ev["device"] != "auto" and engines and "hf" not in engines.values():
        raise RecipeError(f"{path}: eval.device: only for suites on the hf engine (every suite runs on vllm, which "
                          f"picks the device it was built for)")
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
