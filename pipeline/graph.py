"""The task graph: recipes in, pydoit task dicts out. No heavy imports here (dodo.py loads this module).

Every stage task of recipe R writes `artifacts/R/<stage>/` and declares as its target the folder's manifest;
its `file_dep` are the upstream manifests and the recipe files it reads, its `uptodate` is `config_changed` on
its own config section. Paths are relative to the project root, which is doit's working directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.recipe import Recipe, RecipeError, load_recipes

ARTIFACTS = Path("artifacts")
DB = ARTIFACTS / "scores.duckdb"
LEDGER = ARTIFACTS / ".ledger.sqlite"
MANIFEST = "manifest.json"
TINY_CONFIG = {"seed": 0}

DOIT_CONFIG = {
    "backend": "sqlite3",                 # unlike dbm, safe for several doit processes and `doit -n 2`
    "dep_file": str(ARTIFACTS / ".doit.sqlite"),
    "continue": True,                     # one recipe that cannot be built does not stop the others
    "default_tasks": ["build"],
}


def _run(stage: str, label: str, out: Path, *, inputs: dict | None = None, params: dict | None = None,
         unkeyed: dict | None = None, config: dict | None = None, cache: bool = True):
    """The doit action that runs one stage (imported lazily by the runner)."""
    from pipeline.runner import run_stage  # light: the runner imports stage modules only when a task runs

    return (run_stage, [], {"stage": stage, "label": label, "out": str(out), "inputs": inputs or {},
                            "params": params or {}, "unkeyed": unkeyed or {}, "config": config or {},
                            "cache": cache})


class config_changed:
    """doit `uptodate` check on a task's config section, like `doit.tools.config_changed`, but it also keeps the
    config itself in doit's state, so `doit why` can say which key changed from what to what. State written by
    `doit.tools.config_changed` (an md5 only) is still honoured."""

    KEY = "_config"

    def __init__(self, config: dict):
        self.config = config

    def _json(self) -> str:
        import json

        return json.dumps(self.config, sort_keys=True)

    def configure_task(self, task):
        task.value_savers.append(lambda: {self.KEY: self._json()})

    def __call__(self, task, values):
        saved = values.get(self.KEY)
        if saved is not None:
            return saved == self._json()
        legacy = values.get("_config_changed")
        if legacy is not None:
            import hashlib

            return legacy == hashlib.md5(self._json().encode("utf-8")).hexdigest()
        return False

    def __repr__(self):
        return f"config_changed({self.config!r})"


def _clean(out: Path):
    from pipeline.runner import remove_output

    return (remove_output, [str(out)])


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: the built-in model's folder, a local folder, or a hub id."""
    ref: str
    folder: Path | None      # an artifact folder with a manifest (builtin), else None
    external: str | None     # a local folder path or hub id, passed through as is

    @property
    def file_dep(self) -> list[str]:
        return [str(self.folder / MANIFEST)] if self.folder else []

    def as_arg(self, name: str) -> tuple[dict, dict]:
        """(inputs, params) entries handing this model to a stage as argument `name`."""
        return ({name: str(self.folder)}, {}) if self.folder else ({}, {name: self.external})


def model_source(ref: str) -> ModelSource:
    if ref.startswith("builtin:"):
        return ModelSource(ref, ARTIFACTS / "models" / ref.replace(":", "-"), None)
    return ModelSource(ref, None, ref)


def _add_model(src: ModelSource, name: str, inputs: dict, params: dict, deps: list) -> None:
    """Hand model `src` to a stage as argument `name`: an artifact folder is an input (and a file_dep through
    its manifest), an external reference a plain parameter."""
    i, p = src.as_arg(name)
    inputs.update(i)
    params.update(p)
    deps += src.file_dep


_FILES_UNDER: dict[tuple[Path, Path], list[str]] = {}


def _files_under(root: Path, folder: Path) -> list[str]:
    key = (root, folder)
    if key not in _FILES_UNDER:
        _FILES_UNDER[key] = sorted(str(p.relative_to(root)) for p in (root / folder).rglob("*") if p.is_file())
    return list(_FILES_UNDER[key])


class Project:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.recipes_dir = self.root / "recipes"
        self.recipes: list[Recipe] = load_recipes(self.recipes_dir)
        (self.root / ARTIFACTS).mkdir(exist_ok=True)  # doit's state file lives there

    def rel(self, recipe_path: str) -> str:
        """A recipe-relative file path as a project-relative one."""
        return str(Path("recipes") / recipe_path)

    # -- tasks -------------------------------------------------------------------------------------------------
    def model_tasks(self):
        refs = sorted({r.config["model"]["base"] for r in self.recipes} |
                      {r.config["generate"]["model"] for r in self.recipes if r.config["generate"]["backend"] == "local"} |
                      {m["model"] for r in self.recipes for m in r.config["eval"]["models"].values()
                       if m["model"].startswith("builtin:")})
        for ref in refs:
            src = model_source(ref)
            if src.folder is None:
                continue
            yield {"name": src.folder.name, "doc": f"build the built-in model {ref}",
                   "actions": [_run("model", f"model:{src.folder.name}", src.folder, config=TINY_CONFIG)],
                   "targets": [str(src.folder / MANIFEST)], "uptodate": [config_changed(TINY_CONFIG)],
                   "clean": [_clean(src.folder)]}

    def stage_tasks(self, stage: str):
        for r in self.recipes:
            yield from getattr(self, f"_{stage}")(r)

    def _out(self, r: Recipe, stage: str) -> Path:
        return ARTIFACTS / r.name / stage

    def _task(self, r: Recipe, stage: str, name: str, out: Path, *, file_dep: list[str], config: dict,
              inputs=None, params=None, unkeyed=None, cache=True, verbosity=2, doc="", extra_uptodate=()):
        basename = "evaluate" if stage == "heldout" else stage  # both kinds of evaluation share `evaluate:`
        return {"name": name, "doc": doc, "file_dep": sorted(set(file_dep)), "targets": [str(out / MANIFEST)],
                "actions": [_run(stage, f"{basename}:{name}", out, inputs=inputs, params=params,
                                 unkeyed=unkeyed, config=config, cache=cache)],
                "uptodate": [config_changed(config), *extra_uptodate], "clean": [_clean(out)],
                "verbosity": verbosity}

    def _generate(self, r: Recipe):
        c = r.section("generate")
        prompts = ("prompt",) if c["style"] == "alpaca" else (
            "prompt", "classify_prompt", "instance_prompt", "instance_prompt_output_first")
        files = {k: self.rel(c[k]) for k in ("seeds", *prompts)}
        inputs, params, deps = dict(files), {}, list(files.values())
        if c["backend"] == "local":
            _add_model(model_source(c["model"]), "generator", inputs, params, deps)
        yield self._task(r, "generate", r.name, self._out(r, "generate"), file_dep=deps, config=c,
                         inputs=inputs, params=params, unkeyed={"ledger": str(LEDGER)},
                         doc=f"self-instruct generation for {r.name}")

    def _filter(self, r: Recipe):
        gen = self._out(r, "generate")
        yield self._task(r, "filter", r.name, self._out(r, "filter"), file_dep=[str(gen / MANIFEST)],
                         config=r.section("filter"), inputs={"instructions": str(gen / "instructions.jsonl")},
                         verbosity=1, doc=f"rule + ROUGE-L filtering into the training set for {r.name}")

    def _sft(self, r: Recipe):
        src = model_source(r.config["model"]["base"])
        data = self._out(r, "filter")
        template = self.rel(r.config["model"]["chat_template"])
        inputs, params = src.as_arg("base_model")
        inputs.update(train=str(data / "train.jsonl"), chat_template=template)
        params["base_ref"] = src.ref
        yield self._task(r, "sft", r.name, self._out(r, "sft"), config=r.section("sft"),
                         file_dep=[str(data / MANIFEST), template, *src.file_dep], inputs=inputs, params=params,
                         doc=f"LoRA SFT of {src.ref} for {r.name}")

    def _merge(self, r: Recipe):
        src = model_source(r.config["model"]["base"])
        adapter = self._out(r, "sft")
        inputs, params = src.as_arg("base_model")
        inputs["adapter"] = str(adapter)
        yield self._task(r, "merge", r.name, self._out(r, "merge"), config=r.section("merge"),
                         file_dep=[str(adapter / MANIFEST), *src.file_dep], inputs=inputs, params=params,
                         verbosity=1, doc=f"merge the adapter into {src.ref} for {r.name}")

    def models(self, r: Recipe) -> dict[str, ModelSource]:
        """The models a recipe evaluates, by role: base, tuned, then the extra models of `[eval.models]`."""
        out = {"base": model_source(r.config["model"]["base"]),
               "tuned": ModelSource(f"{r.name}/merge", self._out(r, "merge"), None)}
        names = {x.name for x in self.recipes}
        for name, mc in sorted(r.config["eval"]["models"].items()):
            ref = mc["model"]
            if ref.startswith("recipe:"):
                other = ref[len("recipe:"):]
                if other not in names:
                    raise RecipeError(f"{r.path}: eval.models.{name}.model: no recipe named {other!r} "
                                      f"(known: {', '.join(sorted(names))})")
                out[name] = ModelSource(f"{other}/merge", ARTIFACTS / other / "merge", None)
            else:
                out[name] = model_source(ref)
        return out

    def eval_entries(self, r: Recipe) -> list[dict]:
        """One entry per (model, suite): the evaluation task's name, output folder, and how to run it."""
        cache = self.__dict__.setdefault("_entries_by_recipe", {})
        if r.name not in cache:
            cache[r.name] = self._make_eval_entries(r)
        return cache[r.name]

    def _make_eval_entries(self, r: Recipe) -> list[dict]:
        ev = r.section("eval")
        suites = ev.pop("suites")
        entries = []
        for role, src in self.models(r).items():
            for suite, sc in sorted(suites.items()):
                run_settings = {k: v for k, v in sc.items() if k != "categories"}  # used by scores only
                entries.append({"role": role, "src": src, "suite": suite, "stage": "evaluate", "settings": sc,
                                "config": {**{k: ev[k] for k in ("batch_size", "device")}, "suite": run_settings}})
            if ev["heldout"]:
                entries.append({"role": role, "src": src, "suite": "heldout", "stage": "heldout", "settings": None,
                                "config": {"heldout_max_items": ev["heldout_max_items"]}})
        for e in entries:
            e["name"] = f"{r.name}.{e['role']}.{e['suite']}"
            e["out"] = self._out(r, "eval") / f"{e['role']}-{e['suite']}"
        return entries

    def _evaluate(self, r: Recipe):
        data = self._out(r, "filter")
        template = self.rel(r.config["model"]["chat_template"])
        for e in self.eval_entries(r):
            inputs, params = e["src"].as_arg("model")
            deps = list(e["src"].file_dep)
            if e["stage"] == "heldout":
                inputs.update(heldout=str(data / "heldout.jsonl"), chat_template=template)
                deps += [str(data / MANIFEST), template]
            else:
                params["suite"] = e["config"]["suite"]
                if e["settings"]["include_path"]:
                    folder = Path(self.rel(e["settings"]["include_path"]))
                    inputs["include_path"] = str(folder)
                    deps += _files_under(self.root, folder)
            yield self._task(r, e["stage"], e["name"], e["out"], file_dep=deps, config=e["config"],
                             inputs=inputs, params=params,
                             doc=f"{e['suite']} on the {e['role']} model of {r.name}")

    def _answers(self, r: Recipe):
        j = r.section("eval")["judge"]
        if not j["enabled"]:
            return
        models = self.models(r)
        for role in ("base", "tuned"):
            inputs, params = models[role].as_arg("model")
            inputs["instructions"] = self.rel(j["instructions"])
            yield self._task(r, "answers", f"{r.name}.{role}", self._out(r, "answers") / role,
                             file_dep=[*models[role].file_dep, self.rel(j["instructions"])],
                             config={k: j[k] for k in ("answer_max_tokens", "judge_max_items")},
                             inputs=inputs, params=params,
                             doc=f"the {role} model's answers to the judge's instructions for {r.name}")

    def _judge(self, r: Recipe):
        j = r.section("eval")["judge"]
        if not j["enabled"]:
            return
        answers = self._out(r, "answers")
        inputs = {"candidate": str(answers / "tuned"), "reference": str(answers / "base"),
                  "prompt": self.rel(j["prompt"])}
        params, deps = {}, [str(answers / "tuned" / MANIFEST), str(answers / "base" / MANIFEST),
                            self.rel(j["prompt"])]
        if j["backend"] == "local":
            _add_model(model_source(j["model"]), "generator", inputs, params, deps)
        config = {k: v for k, v in j.items() if k not in ("answer_max_tokens", "judge_max_items")}
        yield self._task(r, "judge", r.name, self._out(r, "judge"), file_dep=deps, config=config,
                         inputs=inputs, params=params, unkeyed={"ledger": str(LEDGER)},
                         doc=f"{j['mode']} LLM judging of tuned vs base answers for {r.name}")

    def _scores(self, r: Recipe):
        entries, deps = [], []
        for e in self.eval_entries(r):
            src = e["src"]
            dataset = str(self._out(r, "filter")) if e["role"] == "tuned" else None
            categories = (e["settings"] or {}).get("categories")
            entries.append({"role": e["role"], "model_ref": src.ref, "suite": e["suite"], "result": str(e["out"]),
                            "model": str(src.folder) if src.folder else src.external, "dataset": dataset,
                            "categories": self.rel(categories) if categories else None})
            deps.append(str(e["out"] / MANIFEST))
            if categories:
                deps.append(self.rel(categories))
        judge = None
        if r.config["eval"]["judge"]["enabled"]:
            judge = {"result": str(self._out(r, "judge")), "model": str(self._out(r, "merge")),
                     "model_ref": f"{r.name}/merge", "prompt": self.rel(r.config["eval"]["judge"]["prompt"])}
            deps.append(str(self._out(r, "judge") / MANIFEST))
        yield self._task(r, "scores", r.name, self._out(r, "scores"), file_dep=deps,
                         config={"entries": entries, "judge": judge},
                         params={"recipe": r.name, "entries": entries, "judge": judge}, unkeyed={"db": str(DB)},
                         cache=False,
                         verbosity=1, extra_uptodate=[DB.exists], doc=f"load {r.name}'s results into {DB}")

    def _report(self, r: Recipe):
        scores = self._out(r, "scores")
        yield self._task(r, "report", r.name, ARTIFACTS / "report" / r.name, file_dep=[str(scores / MANIFEST)],
                         config={}, inputs={"scores": str(scores)}, params={"recipe": r.name},
                         unkeyed={"db": str(DB)}, cache=False, doc=f"base vs tuned table for {r.name}")

    def recipe_stages(self, r: Recipe) -> list[str]:
        tasks = [f"{s}:{r.name}" for s in ("generate", "filter", "sft", "merge")]
        tasks += [f"evaluate:{e['name']}" for e in self.eval_entries(r)]
        if r.config["eval"]["judge"]["enabled"]:
            tasks += [f"answers:{r.name}.base", f"answers:{r.name}.tuned", f"judge:{r.name}"]
        return tasks + [f"scores:{r.name}", f"report:{r.name}"]

    def build_tasks(self):
        for r in self.recipes:
            yield {"name": r.name, "doc": f"build {r.name} end to end: {r.config['description']}",
                   "actions": None, "task_dep": self.recipe_stages(r)}

    def eval_tasks(self):
        for r in self.recipes:
            evals = [t for t in self.recipe_stages(r) if t.split(":")[0] in ("evaluate", "answers", "judge")]
            yield {"name": r.name, "doc": f"evaluate {r.name}'s models and refresh the scores",
                   "actions": None, "task_dep": [*evals, f"scores:{r.name}", f"report:{r.name}"]}
