"""Stage `evaluate`: one model on one lm-eval suite, with `simple_evaluate` and a `TaskManager`.

A suite is a list of lm-eval task names plus, for local suites, an `include_path` folder of task YAML and data
under `recipes/evals/` (its `data_files` paths are relative to that folder; the stage runs lm-eval from there).
Every path its YAML names (`include`, a local `dataset_path`, `data_dir`, `data_files`) stays inside recipes/:
`check_suite_paths`, when the graph is made and again before lm-eval runs. Hub suites (`mmlu`, `cmmlu`, ...) need no include_path. Output: `results.json` (per task and metric: value,
stderr, n; the resolved task configs, package versions and the eval settings) and
`samples/<task>.jsonl` with every scored document. Nothing time-dependent and no absolute path is written, so a
repeated evaluation, in any folder, gives an identical artifact.

The suite runs on its engine (`eval.suites.<name>.engine`, else `eval.engine`): lm-eval's `hf` model type, or its
`vllm` one (`pipeline.evaluation.vllm_lm_eval`, with `[eval.vllm]`). A vLLM evaluation's `eval_config` names the engine and
its version (so its scores are never paired with an HF evaluation's) and its `packages` vLLM's version.

Contract: reads `[eval]` (batch_size, device, engine, vllm) and `[eval.suites.<name>]`; consumes every model of
the recipe (base, the trained models, `[eval.models]`); writes `artifacts/<recipe>/eval/<model>-<suite>/` and
provides it as an `evaluation` for the scores stage.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

from pipeline.llm import engines
from pipeline.errors import TunebuildError
from pipeline.core.stage import Stage

STAGE = Stage(name="evaluate", version=3, phase="eval", section="eval", gpus="eval.gpus",
              doc="Evaluate one model on one suite (lm-eval tasks, or the held-out loss).")


def tasks(plan):
    ev = plan.section("eval")
    for role, src in plan.models().items():
        for suite, sc in sorted(ev["suites"].items()):
            # categories: used by scores only; the engine: below, keyed only when it is not the default one
            run_settings = {k: v for k, v in sc.items() if k not in ("categories", "engine")}
            engine = sc["engine"] or ev["engine"]
            keyed, engine_run = engines.task_settings(engine, ev["vllm"])
            config = {"batch_size": ev["batch_size"], "device": ev["device"], "suite": run_settings, **keyed}
            inputs, params = src.as_arg("model")
            params["suite"] = run_settings
            if sc["include_path"]:
                inputs["include_path"] = plan.rel(sc["include_path"])
                # like a recipe's file keys: a path leaving recipes/ stops `doit list`, with one line
                check_suite_paths_once(plan.project.recipes_dir / sc["include_path"], plan.project.recipes_dir)
            categories = plan.rel(sc["categories"]) if sc["categories"] else None
            yield plan.task(STAGE, f"{plan.name}.{role}.{suite}", plan.out("eval", f"{role}-{suite}"),
                            inputs=inputs, params=params, config=config, engine=engine,
                            unkeyed={"engine_run": engine_run} if engine_run else None,
                            gpus=engines.task_gpus(ev["gpus"], engine_run),
                            file_dep=[categories] if categories else (),
                            provides=("evaluation", f"{role}.{suite}",
                                      {"role": role, "suite": suite, "model": src, "categories": categories}),
                            doc=f"{suite} on the {role} model of {plan.name}")


def _yaml_loader():
    """A safe YAML loader that accepts lm-eval's `!function` (and any other) tags without running anything."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return Loader


class YamlError(TunebuildError):
    """A task YAML that cannot be read as YAML."""


def _read_yaml(path: Path, loader):
    import yaml

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except UnicodeDecodeError as e:
        raise YamlError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise YamlError(f"{path}: cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise YamlError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None


def _recipes_dir_of(folder: Path) -> Path:
    """The `recipes` folder a suite folder lies in (the nearest one), else the suite folder itself."""
    folder = Path(folder).absolute()
    return next((p for p in (folder, *folder.parents) if p.name == "recipes"), folder)


def _is_url(value: str) -> bool:
    return "://" in value or "::" in value  # http(s)://, hf://, file://, zip://...::..., fsspec chains


def _inside(value, base: Path, recipes_dir: Path, where: str, what: str) -> Path:
    """The local path `value` names, resolved as lm-eval / datasets resolve it (against `base` unless absolute);
    one line naming `where` unless it stays inside `recipes_dir`."""
    if not isinstance(value, str) or not value:
        raise TunebuildError(f"{where}: expected {what} (a path relative to {base}), got {value!r}")
    if _is_url(value):
        raise TunebuildError(f"{where}: '{value}' is a URL; expected {what} inside {recipes_dir} (relative to "
                             f"{base})")
    target = Path(value) if Path(value).is_absolute() else base / value
    if not target.resolve().is_relative_to(Path(recipes_dir).resolve()):
        raise TunebuildError(f"{where}: '{value}' is outside {recipes_dir} (expected {what} inside it, relative "
                             f"to {base})")
    return target


def _suite_config(path: Path, recipes_dir: Path, loader, seen: tuple = ()) -> tuple[object, dict]:
    """A task YAML as lm-eval reads it: its `include`s (relative to its folder, each inside `recipes_dir`) merged
    under its own keys. Returns (config, key -> the file that sets it)."""
    doc = _read_yaml(path, loader)
    if not isinstance(doc, dict) or "include" not in doc:
        return doc, {k: path for k in doc} if isinstance(doc, dict) else {}
    includes = doc["include"]
    merged, origin = {}, {}
    for inc in includes if isinstance(includes, list) else [includes]:
        target = _inside(inc, path.resolve().parent, recipes_dir, f"{path}: include", "a task YAML file")
        if not target.is_file():
            raise TunebuildError(f"{path}: include: '{inc}' does not exist (include is relative to {path.parent})")
        if target.resolve() in seen or target.resolve() == path.resolve():
            raise TunebuildError(f"{path}: include: '{inc}' is circular")
        inc_doc, inc_origin = _suite_config(target, recipes_dir, loader, (*seen, path.resolve()))
        if not isinstance(inc_doc, dict):
            raise TunebuildError(f"{target}: expected a task config (a YAML mapping), as {path} includes it")
        inc_doc.pop("task_list", None)
        merged.update(inc_doc)
        origin.update({k: inc_origin.get(k, target) for k in inc_doc})
    merged.update({k: v for k, v in doc.items() if k != "include"})
    origin.update({k: path for k in doc if k != "include"})
    return merged, origin


def _task_configs(doc: dict, origin: dict, path: Path):
    """(config, where its keys are written, key prefix) for a task YAML and the inline tasks its `task:` list holds."""
    yield doc, origin, ""
    todo = [(doc, "")]
    while todo:
        cfg, prefix = todo.pop()
        items = cfg.get("task")
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            if isinstance(item, dict):
                where = f"{prefix}task[{i}]."
                yield item, {k: origin.get("task", path) for k in item}, where
                todo.append((item, where))


# `datasets` builder names: a `dataset_path` like these is a file format, not a folder to read
BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "sql", "xml", "webdataset", "imagefolder",
            "audiofolder", "videofolder", "pdffolder", "niftifolder", "hdf5", "lance", "eval", "cache"}


def _dataset_paths(cfg: dict, origin: dict, prefix: str, path: Path, folder: Path,
                   recipes_dir: Path) -> list[tuple[Path, str, Path, Path]]:
    """Check every local path that `datasets.load_dataset` would read for this task config, resolved as it
    resolves them (lm-eval runs in the suite folder): a local folder as `dataset_path`, `dataset_kwargs.data_dir`
    and each of `dataset_kwargs.data_files` (a path, a list, or a table split -> path or list). Returns (file
    whose key it is, the value, its path, the folder it is relative to) per data file."""
    base = folder
    dataset_path = cfg.get("dataset_path")
    if isinstance(dataset_path, str) and dataset_path and not _is_url(dataset_path) and dataset_path not in BUILDERS:
        local = Path(dataset_path) if Path(dataset_path).is_absolute() else folder / dataset_path
        if local.exists():  # datasets reads a local folder of that name (else it is a hub dataset id)
            base = _inside(dataset_path, folder, recipes_dir,
                           f"{origin.get('dataset_path', path)}: {prefix}dataset_path", "a data folder")
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict):
        return []
    where = f"{origin.get('dataset_kwargs', path)}: {prefix}dataset_kwargs"
    if kwargs.get("data_dir") is not None:
        data_dir = kwargs["data_dir"]
        expanded = str(Path(data_dir).expanduser()) if isinstance(data_dir, str) else data_dir  # as datasets does
        base = _inside(expanded, base, recipes_dir, f"{where}.data_dir", "a data folder")
    files = kwargs.get("data_files")
    if files is None:
        return []
    named = [(f"{where}.data_files.{split}", v) for split, v in files.items()] if isinstance(files, dict) \
        else [(f"{where}.data_files", files)]
    out = []
    for key, value in named:
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise TunebuildError(f"{key}: expected a data file, a list of them, or a table split -> file(s) "
                                 f"(paths relative to {base}), got {value!r}")
        for i, rel in enumerate(value if isinstance(value, list) else [value]):
            at = f"{key}[{i}]" if isinstance(value, list) else key
            out.append((origin.get("dataset_kwargs", path), rel,
                        _inside(rel, base, recipes_dir, at, "a data file"), base))
    return out


def check_suite_paths(folder: Path, recipes_dir: Path | None = None) -> list[tuple[Path, dict, list, dict]]:
    """Every path a local suite's task YAML names stays inside `recipes_dir` (default: the `recipes` folder the
    suite lies in): each YAML itself, its `include`s (relative to its folder), a local `dataset_path` and the
    `dataset_kwargs` `data_dir` and `data_files` (relative to the suite folder, where lm-eval runs). Each problem
    is one line naming the YAML file and the key. Returns (YAML, its merged config, its data files, key -> the file
    that sets it) per task YAML."""
    folder = Path(folder)
    recipes_dir = Path(recipes_dir) if recipes_dir is not None else _recipes_dir_of(folder)
    loader = _yaml_loader()
    out = []
    for path in sorted(folder.rglob("*.yaml")):  # the files lm-eval's TaskManager indexes
        if not path.resolve().is_relative_to(recipes_dir.resolve()):
            raise TunebuildError(f"{path}: a link to {path.resolve()}, outside {recipes_dir} (a suite's task YAML "
                                 f"stays inside it)")
        doc, origin = _suite_config(path, recipes_dir, loader)
        if not isinstance(doc, dict):
            continue
        files = [f for cfg, orig, prefix in _task_configs(doc, origin, path)
                 for f in _dataset_paths(cfg, orig, prefix, path, folder, recipes_dir)]
        out.append((path, doc, files, origin))
    return out


_CHECKED: dict[tuple, None] = {}  # suite folders whose paths were checked in this process, by their YAML files


def check_suite_paths_once(folder: Path, recipes_dir: Path) -> None:
    """`check_suite_paths` for the graph (every recipe's every model names the same few suites): once per folder
    and state of its YAML files. A YAML that does not parse is left to the evaluation, which names it."""
    key = (str(Path(folder).resolve()), str(Path(recipes_dir).resolve()),
           tuple((str(p), p.lstat().st_mtime_ns, p.lstat().st_size) for p in sorted(Path(folder).rglob("*.yaml"))))
    if key not in _CHECKED:
        try:
            check_suite_paths(folder, recipes_dir)
        except YamlError:
            pass
        _CHECKED[key] = None


def check_local_suite(folder: Path, recipes_dir: Path | None = None) -> None:
    """Before lm-eval runs: every task YAML under `folder` parses, names only paths inside recipes/
    (`check_suite_paths`) and data files that exist, whose JSON Lines parse, whose first row renders the
    templates (`check_templates`) and whose rows hold the fields `doc_to_target` reads. Each problem is one line
    naming the file (and line)."""
    for path, doc, files, origin in check_suite_paths(folder, recipes_dir):
        target = doc.get("doc_to_target")
        fields = re.findall(r"{{\s*([A-Za-z_]\w*)\s*}}", target) if isinstance(target, str) else []
        for where, rel, data, base in files:
            if not data.is_file():
                raise TunebuildError(f"{where}: data file '{rel}' does not exist (data_files are relative to {base})")
        data = [d for _, _, d, _ in files if d.suffix in (".jsonl", ".json", ".csv", ".parquet")]
        if data:
            check_templates(path, doc, origin, data[0])
        for d in data:
            if d.suffix in (".jsonl", ".json"):
                _check_jsonl(d, fields, path.name)


TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")


def check_templates(path: Path, doc: dict, origin: dict, data: Path) -> None:
    """Render the task's doc_to_text / doc_to_target / doc_to_choice on the first row of `data` as lm-eval does
    (Jinja with StrictUndefined; a value naming a column is that column), so a typo such as {{questoin}} is one
    line naming the YAML file, the key and the unknown name. Skipped when `process_docs` reshapes the rows."""
    import jinja2

    from pipeline.data.read import read_rows

    if "process_docs" in doc:
        return
    first = next(iter(read_rows(data)), None)
    if first is None:
        return
    _, row = first
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda text, pattern, repl, count=0: re.sub(pattern, repl, text, count=count)
    for key in TEMPLATE_KEYS:
        value = doc.get(key)
        if not isinstance(value, str) or value in row:
            continue
        where = f"{origin.get(key, path)}: {key}"
        try:
            env.from_string(value).render(**row)
        except jinja2.UndefinedError as e:
            raise TunebuildError(f"{where}: {e.message} in {value!r} (the rows of {data.name} have: "
                                 f"{', '.join(map(str, row))})") from None
        except jinja2.TemplateSyntaxError as e:
            raise TunebuildError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
        except Exception as e:
            raise TunebuildError(f"{where}: cannot be rendered on {data.name}:1 ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _check_jsonl(data: Path, fields: list[str], task_file: str) -> None:
    from pipeline.data.read import read_rows

    for n, row in read_rows(data):
        for field in fields:
            if row.get(field) is None:
                raise TunebuildError(f"{data}:{n}: {field}: missing (the answer that {task_file}'s doc_to_target "
                                     f"reads)")


def _relative(obj, root: str):
    """lm-eval's resolved task configs name their YAML by absolute path (metadata.config_source): make every
    path under the project root relative, so artifacts and eval-config digests do not depend on the folder."""
    if isinstance(obj, dict):
        return {k: _relative(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v, root) for v in obj]
    if isinstance(obj, str) and root in obj:
        return obj.replace(root, "")
    return obj


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(out_dir: Path, *, model: str, suite: dict, include_path: Path | None = None, config: dict,
        engine_run: dict | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipeline.models.hf import device, ensure_available, model_identity, package_versions, split_ref

    engine = config.get("engine", engines.DEFAULT)
    if engine == "vllm":  # before anything else: without vLLM, one line saying what to install
        from pipeline.evaluation import vllm_lm_eval

        vllm_lm_eval.patch_lm_eval_version()
    if include_path:
        check_local_suite(Path(include_path))
    ensure_available(str(model))
    dev = device() if config["device"] == "auto" else config["device"]
    manager = None
    if include_path:  # local tasks only: indexing lm-eval's ~15,000 own tasks takes ~15 s
        manager = TaskManager(include_path=str(Path(include_path).resolve()), include_defaults=False)
        if any(t not in manager.all_tasks for t in suite["tasks"]):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(Path(include_path).resolve()) if include_path else None)
    missing = [t for t in suite["tasks"] if t not in manager.all_tasks]
    if missing:
        where = f"in {include_path} or " if include_path else ""
        raise TunebuildError(f"lm-eval task(s) {', '.join(missing)} not found {where}among lm-eval's own tasks")
    workdir = Path(include_path).resolve() if include_path else Path.cwd()
    hub_id, revision = split_ref(model)
    pretrained = str(Path(model).resolve()) if Path(model).exists() else hub_id
    model_type, model_args, environment = _engine_args(engine, pretrained, revision, dev, config, engine_run or {})
    with contextlib.chdir(workdir), environment:
        res = lm_eval.simple_evaluate(
            model=model_type, model_args=model_args,
            tasks=list(suite["tasks"]), num_fewshot=suite["num_fewshot"], batch_size=config["batch_size"],
            limit=suite["limit"] or None, log_samples=True, task_manager=manager,
            apply_chat_template=suite["apply_chat_template"],
            gen_kwargs={"max_gen_toks": suite["max_gen_toks"]} if suite["max_gen_toks"] else None, random_seed=0, numpy_random_seed=1234,
            torch_random_seed=1234, fewshot_random_seed=1234,
        )
    metrics = []
    for task, values in sorted(res["results"].items()):
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in sorted(values.items()):
            if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = values.get(f"{metric}_stderr,{filt}")
            metrics.append({"task": task, "subject": "", "metric": metric, "filter": filt, "value": _clean(value),
                            "stderr": _clean(stderr) if isinstance(stderr, (int, float)) else None, "n": n})
    eval_config, packages = {"suite": suite, "batch_size": config["batch_size"]}, package_versions()
    if engine != engines.DEFAULT:  # the default engine's results stay as they were before engines were a setting
        eval_config.update(engine=engines.identity(engine), max_model_len=config.get("max_model_len"))
        packages["vllm"] = engines.identity(engine).split(" ", 1)[1]
    result = {"eval_config": eval_config, "metrics": metrics,
              "model_digest": model_identity(model), "packages": packages,
              "versions": res.get("versions", {}), "configs": _relative(res.get("configs", {}), str(Path.cwd()) + "/"),
              "higher_is_better": res.get("higher_is_better", {})}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    (out_dir / "samples").mkdir()
    for task, samples in sorted(res.get("samples", {}).items()):
        with open(out_dir / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False, sort_keys=True, default=str) + "\n")
    return {"metrics": len(metrics)}


def _engine_args(engine: str, pretrained: str, revision: str | None, dev: str, config: dict,
                 engine_run: dict) -> tuple[str, dict, object]:
    """lm-eval's model type, its `model_args`, and the context to run it in: `hf` (float32 on a CPU, the model's
    dtype on a GPU), or `vllm` (the same dtypes; `[eval.vllm]` settings; `pipeline.evaluation.vllm_lm_eval`)."""
    base = {"pretrained": pretrained, **({"revision": revision} if revision else {})}
    dtype = "float32" if dev == "cpu" else "auto"
    if engine == engines.DEFAULT:
        return "hf", {**base, "dtype": dtype, "device": dev}, contextlib.nullcontext()
    from pipeline.llm import vllm_engine
    from pipeline.evaluation import vllm_lm_eval

    tp = engines.tensor_parallel_size(engine_run.get("tensor_parallel_size"))
    args = vllm_lm_eval.model_args(pretrained, revision=revision, dtype=dtype,
                                   max_model_len=config.get("max_model_len"), batch_size=config["batch_size"],
                                   tensor_parallel_size=tp,
                                   gpu_memory_utilization=engine_run.get("gpu_memory_utilization"))
    return "vllm", {**base, **args}, vllm_engine.engine_environment(tp)
