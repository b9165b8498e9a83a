"""Loading recipes: read the TOML, merge what a recipe `extends`, expand a `[sweep]` into its variants, validate
each against the schema (`pipeline.core.recipe.schema`) and run the checks across keys
(`pipeline.core.recipe.checks`).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.recipe.checks import check
from pipeline.core.recipe.schema import ALIASES, NAME_RE, REQUIRED, SCHEMA, Key, RecipeError, TableOf, copy_toml
from pipeline.core.recipe.sweep import expand_sweep
from pipeline.errors import did_you_mean


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path                 # the recipe file
    files: tuple[Path, ...]    # the recipe files it was merged from (itself and what it extends)
    config: dict               # validated, defaults filled; file keys stay relative to the recipes folder
    sweep: dict | None = None  # for a sweep variant: {"name", "axes": [{axis, key, label, value}], "baseline"}

    def section(self, name: str) -> dict:
        return copy_toml(self.config[name])


def train_order(c: dict) -> list[str]:
    """The training stages, each after the one it starts `from` (then by name)."""
    stages, order = c["train"], []

    def depth(n):
        return 0 if stages[n]["from"] == "base" else 1 + depth(stages[n]["from"])
    return sorted(stages, key=lambda n: (depth(n), n)) if stages else order


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
            out[k] = copy_toml(spec.default)
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
    merged = copy_toml(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = copy_toml(v)
    return merged


_TOML: dict[bytes, dict] = {}    # parsed TOML by content: 50 recipes extending one file parse it once


def _read_toml(path: Path) -> dict:
    try:
        data = Path(path).read_bytes()
        if data not in _TOML:
            _TOML[data] = tomllib.loads(data.decode("utf-8"))
        return copy_toml(_TOML[data])
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


def _load(path: Path, name: str, raw: dict, files, recipes_dir: Path, sweep: dict | None = None) -> Recipe:
    if "sft" in raw:
        raise RecipeError(f"{path}: [sft] is now a training stage: rename the table to [train.sft] (method = 'sft' "
                          f"and finetuning = 'lora' are the defaults; its keys stay the same, [sft.lora] becomes "
                          f"[train.sft.lora])")
    template = raw.get("model", {}).get("chat_template") if isinstance(raw.get("model"), dict) else None
    if isinstance(template, str):
        from pipeline.finetuning.chat_templates import resolve, unknown

        if (why := unknown(template, recipes_dir)) is not None:
            raise RecipeError(f"{path}: model.chat_template: {why}")
        raw["model"]["chat_template"] = resolve(template)  # a short name (`chatml`, `llama3`, ...) or a file
    config = _validate(raw, SCHEMA, "", path, recipes_dir)
    config.pop("extends", None)
    # settings that do not apply are refused where they are written (not when a parent recipe set them)
    own = _read_toml(path)
    own.pop("sweep", None)
    check(path, own, config, recipes_dir)
    return Recipe(name=name, path=path, files=files, config=config, sweep=sweep)


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
