"""A recipe's `[sweep]`: one recipe expanded over a grid of keys, each variant validated like a recipe of its own
(`pipeline.core.recipe.load.load_recipe_variants`); the variants share every upstream artifact they agree on.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.recipe.schema import RecipeError, copy_toml


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
        variant = copy_toml(raw)
        for a, i in zip(axes, combo):
            try:
                _set_dotted(variant, a["key"], copy_toml(a["values"][i]))
            except KeyError:
                raise RecipeError(f"{where}.{a['axis']}.key: {a['key']!r} does not name a recipe key") from None
        label = "-".join(picked.values())
        info = {"name": name, "baseline": f"{name}.{baseline}", "sort_by": sweep.get("sort_by"),
                "descending": bool(sweep.get("descending", True)),
                "axes": [{"axis": a["axis"], "key": a["key"], "label": a["labels"][i], "value": a["values"][i]}
                         for a, i in zip(axes, combo)]}
        out.append((label, variant, info))
    return out
