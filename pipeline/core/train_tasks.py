"""Declaring the training stages' tasks: what the sft and dpo stages share when the graph asks them for their tasks
(light: runs when dodo.py loads). Running them is the fine-tuning library's part (`pipeline.finetuning.training`).

Where a trained model lives is a convention both the training stages and the merge stage follow: the model of
training stage `<name>` is `artifacts/<recipe>/models/<name>/` (an adapter is merged there; full and freeze stages
write their weights there directly), so a stage can start `from` another whatever the order the graph asks them in.
"""
from __future__ import annotations

from pipeline.core.recipe.load import train_order
from pipeline.core.recipe.schema import RecipeError


def model_folder(plan, name: str):
    """The folder of training stage `name`'s model (merged or full), by the convention above."""
    return plan.out("models", name)


def start_model(plan, t: dict):
    """The ModelSource a training stage starts from: the recipe's base, or another stage's model folder."""
    if t["from"] == "base":
        return plan.base_model()
    return plan.artifact_model(f"{plan.name}/{t['from']}", model_folder(plan, t["from"]))


def mixture(recipe, t: dict, kind: str) -> list[dict]:
    """`data` as [{name, limit, weight}]; when empty, every dataset of the recipe whose format is of `kind`."""
    from pipeline.data.formats import PREFERENCE_FORMATS

    items = t["data"]
    if not items:
        items = [n for n, d in sorted(recipe.config["data"].items())
                 if (d["format"] in PREFERENCE_FORMATS) == (kind == "preference") or d["format"] == "auto"]
    return [{"name": i, "limit": 0, "weight": 1.0} if isinstance(i, str) else
            {"name": i["name"], "limit": i.get("limit", 0), "weight": float(i.get("weight", 1.0))} for i in items]


def train_tasks(plan, stage, method: str, kind: str, doc: str):
    """One task per `[train.<name>]` with this method: inputs are the start model, the datasets and the chat
    template; an adapter is provided as `trained` (the merge stage makes its model), full weights as `model`."""
    from pipeline.finetuning.training import ADAPTER_MODES, UNKEYED

    r = plan.recipe
    for name in train_order(r.config):
        t = plan.section("train")[name]
        if t["method"] != method:
            continue
        mix = mixture(r, t, kind)
        datasets = {}
        for m in mix:
            p = plan.product("dataset", m["name"])
            if p is None:
                raise RecipeError(f"{r.path}: train.{name}.data: no dataset named {m['name']!r}")
            datasets[m["name"]] = p.out
        if not datasets:
            raise RecipeError(f"{r.path}: train.{name}.data: the recipe has no {kind} dataset to train on")
        src = start_model(plan, t)
        inputs, params = src.as_arg("base_model")
        inputs.update(data=datasets, chat_template=plan.rel(r.config["model"]["chat_template"]))
        config = {**{k: v for k, v in t.items() if k not in UNKEYED}, "data": mix,
                  "processes": t["processes"] or t["gpus"] or 1}  # one per GPU unless set; keyed: the global batch
        adapter = t["finetuning"] in ADAPTER_MODES
        out = plan.out(stage, name) if adapter else model_folder(plan, name)
        info = {"base": src, "datasets": sorted(datasets.values()), "from": t["from"],
                "ref": f"{r.name}/{name}", "finetuning": t["finetuning"], "method": method, "log": str(out)}
        yield plan.task(stage, f"{r.name}.{name}", out, inputs=inputs, params=params, config=config,
                        # names, for messages only: the run-cache key holds the start model's content digest,
                        # never the recipe's or the stage's name, so copies and sweep variants share the training
                        unkeyed={**{k: t[k] for k in UNKEYED}, "base_ref": src.ref, "stage_name": name},
                        provides=("trained" if adapter else "model", name, info),
                        doc=doc.format(name=name, base=src.ref, finetuning=t["finetuning"]))
