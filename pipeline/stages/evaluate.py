"""Stage `evaluate`: one model on one lm-eval suite, with `simple_evaluate` and a `TaskManager`.

A suite is a list of lm-eval task names plus, for local suites, an `include_path` folder of task YAML and data
under `recipes/evals/` (its `data_files` paths are relative to that folder; the stage runs lm-eval from there).
Hub suites (`mmlu`, `cmmlu`, ...) need no include_path. Output: `results.json` (per task and metric: value,
stderr, n; the resolved task configs, package versions and the eval settings) and
`samples/<task>.jsonl` with every scored document. Nothing time-dependent and no absolute path is written, so a
repeated evaluation, in any folder, gives an identical artifact.

Contract: reads `[eval]` (batch_size, device) and `[eval.suites.<name>]`; consumes every model of the recipe
(base, the trained models, `[eval.models]`); writes `artifacts/<recipe>/eval/<model>-<suite>/` and provides it
as an `evaluation` for the scores stage.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

from pipeline.errors import TunebuildError
from pipeline.stage import Stage

STAGE = Stage(name="evaluate", version=2, phase="eval", section="eval",
              doc="Evaluate one model on one suite (lm-eval tasks, or the held-out loss).")


def tasks(plan):
    ev = plan.section("eval")
    for role, src in plan.models().items():
        for suite, sc in sorted(ev["suites"].items()):
            run_settings = {k: v for k, v in sc.items() if k != "categories"}  # categories: used by scores only
            config = {"batch_size": ev["batch_size"], "device": ev["device"], "suite": run_settings}
            inputs, params = src.as_arg("model")
            params["suite"] = run_settings
            if sc["include_path"]:
                inputs["include_path"] = plan.rel(sc["include_path"])
            categories = plan.rel(sc["categories"]) if sc["categories"] else None
            yield plan.task(STAGE, f"{plan.name}.{role}.{suite}", plan.out("eval", f"{role}-{suite}"),
                            inputs=inputs, params=params, config=config,
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


def check_local_suite(folder: Path) -> None:
    """Before lm-eval runs: every task YAML under `folder` parses, names data files that exist, whose JSON Lines
    parse and hold the fields `doc_to_target` reads. Each problem is one line naming the file (and line)."""
    import yaml

    loader = _yaml_loader()
    for path in sorted(Path(folder).rglob("*.yaml")):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        except UnicodeDecodeError as e:
            raise TunebuildError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise TunebuildError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(doc, dict):
            continue
        files = ((doc.get("dataset_kwargs") or {}).get("data_files")) if isinstance(doc.get("dataset_kwargs"), dict) \
            else None
        if isinstance(files, str):
            files = [files]
        elif isinstance(files, dict):
            files = [f for v in files.values() for f in ([v] if isinstance(v, str) else v or [])]
        target = doc.get("doc_to_target")
        fields = re.findall(r"{{\s*([A-Za-z_]\w*)\s*}}", target) if isinstance(target, str) else []
        for rel in files or []:
            data = Path(folder) / rel
            if not data.is_file():
                raise TunebuildError(f"{path}: data file '{rel}' does not exist (data_files are relative to {folder})")
            if data.suffix in (".jsonl", ".json"):
                _check_jsonl(data, fields, path.name)


def _check_jsonl(data: Path, fields: list[str], task_file: str) -> None:
    from pipeline.formats import read_rows

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


def run(out_dir: Path, *, model: str, suite: dict, include_path: Path | None = None, config: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipeline.hf import device, ensure_available, package_versions

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
    pretrained = str(Path(model).resolve()) if Path(model).exists() else str(model)
    with contextlib.chdir(workdir):
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": pretrained,
                        "dtype": "float32" if dev == "cpu" else "auto", "device": dev},
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
    result = {"eval_config": {"suite": suite, "batch_size": config["batch_size"]}, "metrics": metrics,
              "packages": package_versions(),
              "versions": res.get("versions", {}), "configs": _relative(res.get("configs", {}), str(Path.cwd()) + "/"),
              "higher_is_better": res.get("higher_is_better", {})}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    (out_dir / "samples").mkdir()
    for task, samples in sorted(res.get("samples", {}).items()):
        with open(out_dir / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False, sort_keys=True, default=str) + "\n")
    return {"metrics": len(metrics)}
