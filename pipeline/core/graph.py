"""The task graph: recipes in, pydoit task dicts out. No heavy imports here (dodo.py loads this module through
`pipeline.core.tasklist`).

The graph knows no stage by name. It imports every module of `pipeline/stages/`, orders them by the phase each
declares (`pipeline.core.stage.PHASES`: datasets → training → models → evaluations → scores → report), and walks
each recipe through them: every stage's `tasks(plan)` declares its tasks and what they provide (a dataset, a
model, an evaluation, ...); later stages find what they consume among the plan's products.

Every stage task of recipe R writes `artifacts/R/<stage>[/<name>]/` and declares as its target the folder's
manifest. Its `file_dep` are derived from its inputs (the manifests of upstream artifact folders, the recipe files
and folders it reads), its `uptodate` is `config_changed` on the config it is given. Paths are relative to the
project root, which is doit's working directory.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.recipe.load import Recipe, load_recipes
from pipeline.core.recipe.schema import RecipeError
from pipeline.core.stage import EVAL_PHASES, PHASES, Product, Stage
from pipeline.core.uptodate import config_changed

ARTIFACTS = Path("artifacts")
DB = ARTIFACTS / "scores.duckdb"
LEDGER = ARTIFACTS / ".ledger.sqlite"
MANIFEST = "manifest.json"
_ARTIFACTS_PREFIX = str(ARTIFACTS) + "/"


def _clean(out: Path):
    from pipeline.core.runner import remove_output

    return (remove_output, [str(out)])


class HubRef(str):
    """A hub model handed to a stage (`<id>[@<revision>]`): `Plan.task` finds these among a task's params, keys it
    by the commit each resolves to and watches that commit (`config_changed`). A plain string in the task list."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: a folder (an artifact with a manifest: the built-in model, a trained model;
    or a local model folder under recipes/), which a stage gets as an input, so its content digest enters the
    run-cache key and its files the up-to-date check; or a hub id (with the revision asked for), passed as a
    keyed value."""
    ref: str
    folder: Path | None
    external: str | None
    datasets: tuple[str, ...] = ()   # the dataset artifacts a trained model was trained on
    task: str | None = None          # the doit task that trains it (None for the base and external models)
    revision: str | None = None      # a hub model's branch, tag or commit (`model.revision`)

    def as_arg(self, name: str) -> tuple[dict, dict]:
        """(inputs, params) entries handing this model to a stage as argument `name`."""
        return ({name: str(self.folder)}, {}) if self.folder else ({}, {name: HubRef(self.location)})

    @property
    def location(self) -> str:
        """The folder (relative to the project root), or `<hub id>[@<revision>]` (`pipeline.models.hf.split_ref`)."""
        if self.folder:
            return str(self.folder)
        return f"{self.external}@{self.revision}" if self.revision else self.external


def _trained_model(p: Product) -> ModelSource:
    """The ModelSource of a `model` product (a training stage's model folder)."""
    return ModelSource(p.info["ref"], Path(p.out), None, tuple(p.info.get("datasets", ())), p.task)


def builtin_folder(ref: str) -> Path:
    return ARTIFACTS / "models" / ref.replace(":", "-")


def discover_stages() -> list[tuple[Stage, object]]:
    """Every stage module under pipeline/stages/, in phase order (then by name)."""
    import pipeline.stages as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        stage = getattr(module, "STAGE", None)
        if isinstance(stage, Stage):
            found.append((stage, module))
    return sorted(found, key=lambda sm: (PHASES.index(sm[0].phase), sm[0].name))


_FILES_UNDER: dict[tuple[Path, Path], list[str]] = {}


def _files_under(root: Path, folder: Path) -> list[str]:
    key = (root, folder)
    if key not in _FILES_UNDER:
        _FILES_UNDER[key] = sorted(str(p.relative_to(root)) for p in (root / folder).rglob("*") if p.is_file())
    return list(_FILES_UNDER[key])


def _paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return [str(value)]


@dataclass
class Plan:
    """One recipe's walk through the stages: its tasks and their products. `recipe` is None for the project-level
    plan (the built-in models)."""
    project: "Project"
    recipe: Recipe | None
    tasks: list[dict] = field(default_factory=list)
    products_: list[Product] = field(default_factory=list)
    phases_done: int = 0
    task_phase: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.recipe.name if self.recipe else ""

    def section(self, name: str) -> dict:
        return self.recipe.section(name)

    # -- paths ------------------------------------------------------------------------------------------------
    ledger = str(LEDGER)     # the LLM ledger (an unkeyed input of the stages that call LLMs)
    db = str(DB)             # the scores database

    def out(self, stage: Stage | str, name: str | None = None) -> Path:
        """`artifacts/<recipe>/<stage or folder>[/<name>]`: a stage's own folder, or a shared one (`data`)."""
        base = ARTIFACTS / self.name / (stage if isinstance(stage, str) else stage.name)
        return base / name if name else base

    def rel(self, recipe_path: str) -> str:
        """A recipe-relative file path as a project-relative one."""
        return str(Path("recipes") / recipe_path)

    # -- what earlier stages made -----------------------------------------------------------------------------
    def products(self, kind: str) -> list[Product]:
        return [p for p in self.products_ if p.kind == kind]

    def product(self, kind: str, name: str) -> Product | None:
        return next((p for p in self.products_ if p.kind == kind and p.name == name), None)

    def model(self, ref: str, revision: str | None = None) -> ModelSource:
        """A model reference as a ModelSource: `builtin:<name>` is an artifact the project builds; a folder under
        recipes/ (the recipe validated it: `pipeline.core.recipe.checks._check_model_ref`) is a local model, counted
        by its files; anything else a hub id, at `revision`."""
        if ref.startswith("builtin:"):
            self.project.builtin_refs.add(ref)
            return ModelSource(ref, builtin_folder(ref), None)
        if (self.project.recipes_dir / ref).is_dir():
            return ModelSource(ref, Path(self.rel(ref)), None)
        return ModelSource(ref, None, ref, revision=revision)

    def base_model(self) -> ModelSource:
        """The recipe's `model.base` (at `model.revision`)."""
        m = self.recipe.config["model"]
        return self.model(m["base"], m["revision"])

    def artifact_model(self, ref: str, folder: Path, datasets=()) -> ModelSource:
        """A model that is an artifact folder of this project (a trained model)."""
        return ModelSource(ref, Path(folder), None, tuple(datasets))

    def models(self) -> dict[str, ModelSource]:
        """The models a recipe evaluates, by role: `base`, each training stage's model by the stage's name (in
        training order), then the extra models of `[eval.models]` (`recipe:<name>` is that recipe's final model)."""
        from pipeline.core.recipe.load import train_order

        out = {"base": self.base_model()}
        trained = {p.name: p for p in self.products("model")}
        for name in train_order(self.recipe.config):
            if name in trained:
                p = trained[name]
                out[name] = _trained_model(p)
        for name, mc in sorted(self.recipe.config["eval"]["models"].items()):
            ref = mc["model"]
            if ref.startswith("recipe:"):
                out[name] = self.project.final_model(self.recipe, f"eval.models.{name}.model", ref[len("recipe:"):])
            else:
                out[name] = self.model(ref, mc["revision"])
        return out

    def final(self) -> str:
        """The role of the recipe's final model: its last training stage, or `base` when it trains nothing."""
        from pipeline.core.recipe.load import train_order

        order = train_order(self.recipe.config)
        return order[-1] if order else "base"

    def comparisons(self) -> list[tuple[str, str]]:
        """The pairs of models the recipe compares: each training stage with the model it started from (base →
        sft → dpo), then the final model with each `[eval.models]` model."""
        from pipeline.core.recipe.load import train_order

        train = self.recipe.config["train"]
        pairs = [(train[n]["from"], n) for n in train_order(self.recipe.config)]
        return pairs + [(self.final(), x) for x in sorted(self.recipe.config["eval"]["models"])]

    # -- declaring tasks --------------------------------------------------------------------------------------
    def task(self, stage: Stage, name: str, out: Path, *, inputs: dict | None = None, params: dict | None = None,
             unkeyed: dict | None = None, config: dict | None = None, provides: tuple[str, str, dict] | None = None,
             doc: str = "", uptodate: tuple = (), file_dep: tuple = (), gpus: int | None = None,
             meta: dict | None = None, engine: str | None = None) -> dict:
        """One doit task dict running `stage` into `out`.

        inputs: argument name -> path (or a dict of name -> path): artifact folders (their manifest becomes a
        file_dep and their digest part of the run-cache key) and recipe files or folders (every file in them).
        params: keyed plain values; unkeyed: values that do not enter the run-cache key (the ledger, the DB).
        provides: (kind, name, info) registered as a Product for later stages.
        gpus: how many GPUs a heavy stage's task needs (None: the stage's config key, else the machine's default);
        it never enters the run-cache key or the up-to-date check: where a task runs is not what it is.
        meta: what the build's summary reads about the task (doit's task `meta`): `recipe` (default: the plan's),
        `summary` (a text file of its output whose lines the build ends with). Never part of the key.
        engine: the generation engine the task runs (`pipeline.llm.engines`) when it is not the default one: its
        version (`engines.identity`, found when the task is checked or run, never when it is declared) enters the
        run-cache key and the up-to-date check, as a hub model's commit does."""
        inputs, params, config = inputs or {}, params or {}, config if config is not None else {}
        if stage.gpus_key and stage.gpus_key in config:
            config = dict(config)
            found = config.pop(stage.gpus_key)
            gpus = found if gpus is None else gpus
        if isinstance(stage.gpus, int):
            gpus = stage.gpus
        deps = list(file_dep)
        for path in _paths(inputs):
            deps += self.project.deps_of(path)
        hub = {k: str(v) for k, v in params.items() if isinstance(v, HubRef)}
        from pipeline.llm.engines import DEFAULT as DEFAULT_ENGINE

        engine = engine if engine not in (None, DEFAULT_ENGINE) else None
        from_ = f"{stage.task_basename}:{name}"
        action = _action({
            "module": self.project.module_of[stage.name], "stage": stage.name, "version": stage.version,
            "label": from_, "out": str(out), "inputs": inputs, "params": params, "unkeyed": unkeyed or {},
            "config": config, "cache": stage.cache, **({"hub": hub} if hub else {}),
            **({"engine": engine} if engine else {}), **({"heavy": True, "gpus": gpus} if stage.heavy else {})})
        watched = {"stage_version": stage.version, **config, **({config_changed.HUB: hub} if hub else {}),
                   **({config_changed.ENGINE: engine} if engine else {})}
        task = {"basename": stage.task_basename, "name": name, "doc": doc or stage.doc,
                "file_dep": sorted(set(deps)), "targets": [str(out / MANIFEST)],
                "actions": [action], "uptodate": [config_changed(watched), *uptodate],
                "clean": [_clean(out)], "verbosity": stage.verbosity}
        meta = {**({"recipe": self.name} if self.name else {}), **(meta or {})}
        if meta:
            task["meta"] = meta
        if provides:
            kind, pname, info = provides
            self.products_.append(Product(kind, pname, str(out), from_, info))
        return task

    def walk(self, until: str = PHASES[-1]) -> None:
        """Ask every stage of the phases up to `until` (included) for its tasks, once."""
        stop = PHASES.index(until) + 1
        for stage, module in self.project.stages:
            index = PHASES.index(stage.phase)
            if index < self.phases_done or index >= stop or (stage.phase == "project") != (self.recipe is None):
                continue
            for t in module.tasks(self):
                self.tasks.append(t)
                if stage.in_build:
                    self.task_phase[f"{t['basename']}:{t['name']}"] = stage.phase
        self.phases_done = max(self.phases_done, stop)


def _action(kwargs: dict):
    """The doit python-action running one stage (the runner imports the stage's heavy libraries only then)."""
    from pipeline.core.runner import run_stage

    return (run_stage, [], kwargs)


class Project:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.recipes_dir = self.root / "recipes"
        # a bad recipe file is reported in one line and left out; the other recipes still work
        self.errors: list[str] = []
        self.recipes: list[Recipe] = load_recipes(self.recipes_dir, self.errors)
        self.by_name = {r.name: r for r in self.recipes}
        self.stages = discover_stages()
        self.module_of = {s.name: m.__name__ for s, m in self.stages}
        self.builtin_refs: set[str] = set()
        self.plans: dict[str, Plan] = {}
        self._deps: dict[str, list[str]] = {}
        (self.root / ARTIFACTS).mkdir(exist_ok=True)  # doit's state file lives there
        for r in list(self.recipes):
            try:
                self.plan(r.name).walk()
            except RecipeError as e:  # its tasks are left out, and so are those of recipes that need it
                self.errors.append(str(e))
                self._drop(r.name)
        self.errors = list(dict.fromkeys(self.errors))
        if self.errors and not self.recipes:
            raise RecipeError("\ntunebuild: ".join(self.errors))
        self.project_plan = Plan(self, None)
        self.project_plan.walk()

    def _drop(self, name: str) -> None:
        self.recipes = [r for r in self.recipes if r.name != name]
        self.by_name.pop(name, None)
        self.plans.pop(name, None)
        for other in list(self.plans):  # a plan that walked into the dropped one (`recipe:<name>`)
            if any(t.get("file_dep") and any(f"artifacts/{name}/" in d for d in t["file_dep"])
                   for t in self.plans[other].tasks):
                self.errors.append(f"{self.by_name[other].path}: needs recipe {name!r}, which is invalid")
                self._drop(other)

    def deps_of(self, path: str) -> list[str]:
        """The file_dep an input path stands for: an artifact folder's manifest, every file of a recipe folder,
        or the recipe file itself."""
        deps = self._deps.get(path)
        if deps is None:
            if path.startswith(_ARTIFACTS_PREFIX):
                deps = [f"{path}/{MANIFEST}"]
            elif (self.root / path).is_dir():
                deps = _files_under(self.root, Path(path))
            else:
                deps = [path]
            self._deps[path] = deps
        return deps

    def plan(self, name: str, until: str = PHASES[-1]) -> Plan:
        if name not in self.plans:
            self.plans[name] = Plan(self, self.by_name[name])
        self.plans[name].walk(until)
        return self.plans[name]

    def final_model(self, recipe: Recipe, dotted: str, other: str) -> ModelSource:
        """Another recipe's final model (its last training stage's), for `recipe:<name>` references."""
        if other not in self.by_name:
            raise RecipeError(f"{recipe.path}: {dotted}: no recipe named {other!r} "
                              f"(known: {', '.join(sorted(self.by_name))})")
        if other == recipe.name:
            raise RecipeError(f"{recipe.path}: {dotted}: a recipe cannot compare with its own tuned model")
        plan = self.plan(other, until="models")
        final = plan.final()
        p = plan.product("model", final)
        if p is None:
            raise RecipeError(f"{recipe.path}: {dotted}: recipe {other!r} trains no model")
        return _trained_model(p)

    # -- what dodo.py exposes ---------------------------------------------------------------------------------
    def all_tasks(self) -> list[dict]:
        return self.project_plan.tasks + [t for r in self.recipes for t in self.plans[r.name].tasks]

    def task_table(self) -> list[tuple[str, str, list[dict]]]:
        """(basename, doc, task dicts) per stage basename, then `build` and `eval`: everything doit is given."""
        docs: dict[str, str] = {}
        for stage, _ in self.stages:
            docs.setdefault(stage.task_basename, stage.doc)
        by_base: dict[str, list[dict]] = {b: [] for b in docs}
        for t in self.all_tasks():
            by_base[t["basename"]].append({k: v for k, v in t.items() if k != "basename"})
        return [*((base, docs[base], by_base[base]) for base in docs),
                ("build", "Build recipes end to end (`doit build:<recipe>` for one).", list(self.build_tasks())),
                ("eval", "Evaluate every recipe's models and refresh the scores (`doit eval:<recipe>` for one).",
                 list(self.eval_tasks()))]

    def sweeps(self) -> dict[str, list[Recipe]]:
        """Each sweep's variants, by the sweep's (recipe file's) name."""
        out: dict[str, list[Recipe]] = {}
        for r in self.recipes:
            if r.sweep:
                out.setdefault(r.sweep["name"], []).append(r)
        return out

    def _sweep_summary_tasks(self, name: str) -> list[str]:
        return [p.task for p in self.project_plan.products_ if p.info.get("group") == name]

    def build_tasks(self):
        for r in self.recipes:
            yield {"name": r.name, "doc": f"build {r.name} end to end: {r.config['description']}",
                   "actions": None, "task_dep": list(self.plans[r.name].task_phase), "meta": {"recipe": r.name}}
        for name, variants in sorted(self.sweeps().items()):
            yield {"name": name, "doc": f"build the {len(variants)} variants of the sweep {name} and its table",
                   "actions": None,
                   "task_dep": [f"build:{v.name}" for v in variants] + self._sweep_summary_tasks(name)}

    def eval_tasks(self):
        for r in self.recipes:
            plan = self.plans[r.name]
            yield {"name": r.name, "doc": f"evaluate {r.name}'s models and refresh the scores", "actions": None,
                   "task_dep": [t for t, phase in plan.task_phase.items() if phase in EVAL_PHASES],
                   "meta": {"recipe": r.name}}
        for name, variants in sorted(self.sweeps().items()):
            yield {"name": name, "doc": f"evaluate the variants of the sweep {name} and write its table",
                   "actions": None,
                   "task_dep": [f"eval:{v.name}" for v in variants] + self._sweep_summary_tasks(name)}
