"""The task-list cache, `artifacts/.tasks.json`: data only, never code.

`artifacts/` is restored from CI caches and shared between machines, so whoever can write it must not be able to
run code on the next `doit list`. The cache therefore holds plain JSON, and reading it back builds tasks only out
of a fixed set of callables named here (the runner's actions, the stages' `run`, `config_changed`, `os.path.exists`)
with arguments that pass the same checks as what the graph itself produces: output and clean paths inside
`artifacts/`, inputs and dependencies relative and inside the project, stage modules under `pipeline.stages`.
Anything else (an unknown callable, a shell-command string where doit would run it, a path outside the project, a
malformed file) makes the whole cache invalid: it is ignored and rebuilt from the recipes.

Encoded forms: a callable is `{"$fn": "module:name"}`, a tuple `{"$tuple": [...]}`, a `config_changed` check
`{"$config_changed": {...}}`; every other value is JSON as it is (a dict key starting with `$` is refused).
Callables and checks are accepted only where a task holds them (an action, an uptodate or a clean entry): one
anywhere else, inside a config or a keyword argument, invalidates the file.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import PurePosixPath

_STAGE_RUN = re.compile(r"pipeline\.stages\.[a-z_][a-z0-9_]*:run")
_FIXED = {"pipeline.core.runner:run_stage", "pipeline.core.runner:remove_output", "os.path:exists"}
TASK_KEYS = {"name", "doc", "file_dep", "targets", "actions", "uptodate", "clean", "verbosity", "task_dep", "meta"}
META_KEYS = {"recipe", "summary"}


class CacheInvalid(ValueError):
    """The cache file is not one this code wrote: ignore it."""


def _ref(fn) -> str:
    ref = f"{fn.__module__}:{fn.__qualname__}"
    if ref == "posixpath:exists" or ref == "genericpath:exists":
        ref = "os.path:exists"
    if ref not in _FIXED and not _STAGE_RUN.fullmatch(ref):
        raise CacheInvalid(f"cannot cache callable {ref}")
    return ref


@functools.lru_cache(maxsize=None)
def _resolve(ref: str):
    import importlib

    if not isinstance(ref, str) or (ref not in _FIXED and not _STAGE_RUN.fullmatch(ref)):
        raise CacheInvalid(f"callable {ref!r} is not one the task cache may name")
    module, name = ref.split(":")
    if module.startswith("pipeline.stages."):
        import pipeline.stages as package

        if not os.path.isfile(os.path.join(package.__path__[0], module.rsplit(".", 1)[1] + ".py")):
            raise CacheInvalid(f"no stage module {module}")
    return getattr(importlib.import_module(module), name)


def encode(obj):
    from pipeline.core.uptodate import config_changed

    if isinstance(obj, config_changed):
        return {"$config_changed": encode(obj.config)}
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        if any(not isinstance(k, str) or k.startswith("$") for k in obj):
            raise CacheInvalid("a dict key that is not a plain string")
        return {k: encode(v) for k, v in obj.items()}
    if callable(obj):
        return {"$fn": _ref(obj)}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise CacheInvalid(f"cannot cache a {type(obj).__name__}")


class _Fn:
    """A callable named in the file, resolved only where a task may hold one (see `check_task`)."""
    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref


class _Decoder:
    """json object_hook turning the tagged forms back into what they stand for, counting the callables and checks
    it makes so that `load` can tell whether any of them sat where only data may be (a config, a kwarg)."""

    def __init__(self):
        self.made = 0

    def __call__(self, obj: dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag.startswith("$"):
                if tag == "$tuple" and isinstance(value, list):
                    return tuple(value)
                self.made += 1
                if tag == "$fn" and isinstance(value, str):
                    return _Fn(value)
                if tag == "$config_changed" and isinstance(value, dict):
                    from pipeline.core.uptodate import config_changed

                    return config_changed(value)
                raise CacheInvalid(f"unknown tag {tag}")
        return obj


def _relative(path, *, under: str | None = None) -> str:
    if not isinstance(path, str) or not path:
        raise CacheInvalid(f"path {path!r} is not a string")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path:
        raise CacheInvalid(f"path {path!r} leaves the project")
    if under is not None and p.parts[:1] != (under,):
        raise CacheInvalid(f"path {path!r} is not under {under}/")
    return path


def _strings(value, check):
    if isinstance(value, dict):
        for v in value.values():
            _strings(v, check)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strings(v, check)
    elif value is not None:
        check(value)


def _check_call(item, *, what: str):
    """An action or clean entry: (callable, args[, kwargs]) with the arguments the graph gives that callable.
    Returns it with its callable resolved."""
    if not isinstance(item, tuple) or not 2 <= len(item) <= 3 or not isinstance(item[0], _Fn):
        raise CacheInvalid(f"{what}: not a (callable, args, kwargs) tuple")
    fn, args = _resolve(item[0].ref), item[1]
    kwargs = item[2] if len(item) == 3 else {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CacheInvalid(f"{what}: malformed arguments")
    ref = _ref(fn)
    if ref == "pipeline.core.runner:run_stage":
        if args or not isinstance(kwargs.get("module"), str) or not _STAGE_RUN.fullmatch(kwargs["module"] + ":run"):
            raise CacheInvalid(f"{what}: run_stage of {kwargs.get('module')!r}")
        _relative(kwargs.get("out"), under="artifacts")
        _strings(kwargs.get("inputs", {}), _relative)
        _strings(kwargs.get("unkeyed", {}), lambda v: _relative(v) if isinstance(v, str) else v)  # ledger, db, logs
    elif ref == "pipeline.core.runner:remove_output":
        if len(args) != 1 or kwargs:
            raise CacheInvalid(f"{what}: remove_output arguments")
        _relative(args[0], under="artifacts")
    elif ref == "os.path:exists":
        if len(args) != 1 or kwargs:
            raise CacheInvalid(f"{what}: exists arguments")
        _relative(args[0])
    elif args:  # a stage's own run (an action that is not a run_stage, e.g. serving an app): keywords only
        raise CacheInvalid(f"{what}: positional arguments")
    return (fn, *item[1:])


def check_task(task: dict) -> tuple[dict, int]:
    """The task with its callables resolved, and how many tagged values it holds in the places a task may hold
    them; raise CacheInvalid unless it is made only of what the graph makes."""
    from pipeline.core.uptodate import config_changed

    if not isinstance(task, dict) or set(task) - TASK_KEYS or not isinstance(task.get("name"), str):
        raise CacheInvalid("not a task")
    for key in ("file_dep", "targets"):
        for path in task.get(key, []):
            _relative(path)
    for t in task.get("targets", []):
        _relative(t, under="artifacts")
    if not all(isinstance(d, str) for d in task.get("task_dep", [])):
        raise CacheInvalid("task_dep")
    if not isinstance(task.get("verbosity", 0), int) or not isinstance(task.get("doc", ""), str):
        raise CacheInvalid("verbosity/doc")
    meta = task.get("meta", {})
    if not isinstance(meta, dict) or set(meta) - META_KEYS or not all(isinstance(v, str) for v in meta.values()):
        raise CacheInvalid("meta")
    if "summary" in meta:
        _relative(meta["summary"], under="artifacts")
    used = 0
    if task.get("actions") is not None:
        task["actions"] = [_check_call(a, what="action") for a in task["actions"]]
        used += len(task["actions"])
    uptodate = []
    for u in task.get("uptodate", []):
        if isinstance(u, config_changed):
            used += 1
        elif isinstance(u, tuple):
            u = _check_call(u, what="uptodate")
            used += 1
        elif u is not None and not isinstance(u, bool):  # a string would be a shell command
            raise CacheInvalid(f"uptodate {u!r}")
        uptodate.append(u)
    if "uptodate" in task:
        task["uptodate"] = uptodate
    if "clean" in task:
        task["clean"] = [_check_call(c, what="clean") for c in task["clean"]]
        used += len(task["clean"])
    return task, used


def load(path, key: str):
    """The cached task table if `path` holds one for `key`, else None (missing, stale, or not ours)."""
    try:
        with open(path, encoding="utf-8") as f:
            prefix = '{"key":' + json.dumps(key) + ","
            head = f.read(len(prefix))
            if head != prefix:  # another key: stale, do not even parse it
                return None
            decoder = _Decoder()
            data = json.loads(head + f.read(), object_hook=decoder)
        if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("table"), list):
            return None
        table, used = [], 0
        for base, doc, tasks in data["table"]:
            if not isinstance(base, str) or not isinstance(doc, str) or not isinstance(tasks, list):
                raise CacheInvalid("table row")
            checked = [check_task(t) for t in tasks]
            used += sum(n for _, n in checked)
            table.append((base, doc, [t for t, _ in checked]))
        if used != decoder.made:  # a callable or a check where only data may be
            raise CacheInvalid("a tagged value inside data")
        return table
    except (OSError, ValueError, TypeError, AttributeError, ImportError):
        return None


def save(path, key: str, table) -> bool:
    """Write the table (atomically); False, writing nothing, when it holds something JSON cannot say."""
    try:
        text = json.dumps({"key": key, "table": [[b, d, [encode(t) for t in ts]] for b, d, ts in table]},
                          ensure_ascii=False, separators=(",", ":"))
    except (CacheInvalid, TypeError, ValueError):
        return False
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return True
