"""Runs one stage as a doit action: run-cache lookup, atomic output, one-line errors.

The runner knows no stage by name: the task's action names the stage module, its version, its inputs and its
config; the module's `run(out_dir, *, config, **inputs)` computes the output. A module may also define
`localize(out_dir, **inputs)`: the files of a finished output that are this task's own (an adapter naming its
recipe's start folder); the run cache keeps the portable content and the task's folder gets those files
(`pipeline.core.store.localize`).
"""
from __future__ import annotations

import importlib
import inspect
import shutil
import sys
from pathlib import Path

from doit.exceptions import TaskFailed

from pipeline.core.store import build_cached, cache_key, is_complete
from pipeline.digests import input_digest
from pipeline.errors import TunebuildError, Unavailable

CACHE = Path("artifacts") / ".cache"
SCRATCH = Path("artifacts") / ".scratch"   # resumable progress of long stages, keyed like the run cache
UNAVAILABLE = "unavailable"   # the `how` of a task this machine cannot run (no model, no key, no server)


class CannotRunHere(TaskFailed):
    """A task failed for what this machine lacks (`Unavailable`), not for a fault: the build's summary says
    `cannot run here`, and such failures alone do not make a build fail."""


def failure(error: str | None, how: str):
    """The doit result of a task: None, or its failure (a `CannotRunHere` when this machine lacks something)."""
    if not error:
        return None
    return CannotRunHere(error) if how == UNAVAILABLE else TaskFailed(error)


def _digest(value):
    if isinstance(value, dict):
        return {k: _digest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    return input_digest(Path(value))


def _as_paths(value):
    if isinstance(value, dict):
        return {k: _as_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_paths(v) for v in value]
    return Path(value)


def stage_key(*, stage: str, version: int, config: dict, inputs: dict, params: dict, hub: dict | None = None,
              engine: str | None = None, **_) -> str:
    """The run-cache key of a stage task: (stage, version, config, input digests, params), for its hub models the
    commit each resolves to in the local Hugging Face cache, and for a task on another engine than the default
    one that engine and its version (`pipeline.llm.engines.identity`). Content only: a folder by its digest, never by
    its path, so the same work under another recipe's name has the same key."""
    extra = {}
    if hub:
        from pipeline.models.hf import hub_commits

        extra = {f"hub:{k}": v["commit"] for k, v in hub_commits(hub).items()}
    if engine:
        from pipeline.llm.engines import identity

        extra["engine"] = identity(engine)
    return cache_key(stage, version, config, {**_digest(inputs), **params, **extra})


_DOIT_KEYWORDS = ("task", "targets", "dependencies", "changed")  # what doit passes a **kwargs action


def run_stage(**kwargs):
    """The doit action of every stage task. A light stage runs here, in the doit process; a heavy one (its
    contract asks for GPUs) goes to the executor, which runs `compute_stage` in a child process or a Slurm job
    holding the task's GPUs. Either way one line goes to `artifacts/runs.jsonl`."""
    from pipeline.core import executor

    task = {k: v for k, v in kwargs.items() if k not in _DOIT_KEYWORDS}
    if task.get("heavy") and not executor.in_child():
        return executor.run_heavy(task)
    started = executor.now()
    error, how = compute_stage(**task)
    executor.log_run(task["label"], started, executor.now(), "doit", "failed" if error else how)
    return failure(error, how)


def compute_stage(*, module: str, stage: str, version: int, label: str, out: str, inputs: dict, params: dict,
                  unkeyed: dict, config: dict, cache: bool = True, hub: dict | None = None,
                  engine: str | None = None, **_) -> tuple[str | None, str]:
    """Restore the task's output from the run cache or compute it, atomically. Returns (one-line error or None,
    "restored" | "computed")."""
    how = "computed"
    try:
        if not module.startswith("pipeline.stages."):  # the task list names stage modules only
            raise TunebuildError(f"{module!r} is not a stage module")
        key = stage_key(stage=stage, version=version, config=config, inputs=inputs, params=params, hub=hub,
                        engine=engine)
        stage_module = importlib.import_module(module)
        entry = stage_module.run
        kwargs = {**_as_paths(inputs), **params, **unkeyed}
        local = None
        if hasattr(stage_module, "localize"):  # files of the output that are this task's own (see store.localize)
            def local(folder: Path, kwargs=dict(kwargs)):
                return stage_module.localize(folder, **kwargs)
        scratch = None
        if "scratch" in inspect.signature(entry).parameters:  # the stage keeps resumable progress (checkpoints)
            scratch = SCRATCH / stage / key
            scratch.mkdir(parents=True, exist_ok=True)
            kwargs["scratch"] = scratch

        def compute(tmp: Path):
            entry(tmp, config=config, **kwargs)

        how = build_cached(Path(out), CACHE if cache else None, stage, key, compute, local)
        if scratch is not None:  # the artifact is complete: its progress is no longer needed
            shutil.rmtree(scratch, ignore_errors=True)
        if how == "restored":
            # stderr: shown at every verbosity, also for tasks whose stdout doit captures
            print(f"{label}: restored from the run cache ({CACHE / stage / key})", file=sys.stderr, flush=True)
    except Unavailable as e:
        return f"{label}: cannot run here: {e}", UNAVAILABLE
    except TunebuildError as e:
        return f"{label}: {e}", how
    except FileNotFoundError as e:
        return f"{label}: missing input {e.filename}", how
    return None, how


def cached(*, stage: str, version: int, config: dict, inputs: dict, params: dict, cache: bool = True,
           hub: dict | None = None, engine: str | None = None, **_) -> bool:
    """True when the run cache holds this task's output (restoring it needs no GPU and no child process)."""
    if not cache:
        return False
    try:
        key = stage_key(stage=stage, version=version, config=config, inputs=inputs, params=params, hub=hub,
                        engine=engine)
    except OSError:
        return False
    return is_complete(CACHE / stage / key)


def remove_output(out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
