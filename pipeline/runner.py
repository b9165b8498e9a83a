"""Runs one stage as a doit action: run-cache lookup, atomic output, one-line errors.

Stage modules are imported here, only when a task executes, so `doit list` never imports torch.
"""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

from doit.exceptions import TaskFailed

from pipeline.errors import TunebuildError
from pipeline.store import build_cached, cache_key, input_digest

CACHE = Path("artifacts") / ".cache"
MODULES = {"model": "tiny", "generate": "generate", "filter": "filter", "sft": "sft", "merge": "merge",
           "evaluate": "evaluate", "heldout": "heldout", "scores": "scores", "report": "report",
           "answers": "answers", "judge": "judge"}
# Bump a stage's version when its code changes what it writes: its run-cache entries then no longer match.
VERSIONS = {"model": 1, "generate": 1, "filter": 2, "sft": 1, "merge": 1, "evaluate": 1, "heldout": 1,
            "scores": 1, "report": 1, "answers": 1, "judge": 1}


def _entry(stage: str):
    module = importlib.import_module(f"pipeline.{MODULES[stage]}")
    if stage == "model":
        return lambda out_dir, config: module.build(out_dir, config)
    if stage == "judge":
        def judge(out_dir, *, ledger, recipe, generator=None, config, **kwargs):
            from pipeline.llm import make_client

            client = make_client(config, generator=generator, ledger=ledger, recipe=recipe)
            return module.run(out_dir, config=config, client=client, **kwargs)
        return judge
    if stage == "generate":
        def generate(out_dir, *, ledger, recipe, generator=None, config, **files):
            from pipeline.llm import make_client

            client = make_client(config, generator=generator, ledger=ledger, recipe=recipe)
            return module.run(out_dir, config=config, client=client, **files)
        return generate
    return module.run


def run_stage(*, stage: str, label: str, out: str, inputs: dict, params: dict, unkeyed: dict, config: dict,
              cache: bool = True):
    try:
        key = cache_key(stage, VERSIONS[stage], config,
                        {**{k: input_digest(Path(v)) for k, v in inputs.items()}, **params})
        entry = _entry(stage)
        kwargs = {**{k: Path(v) for k, v in inputs.items()}, **params, **unkeyed}
        if stage in ("generate", "judge"):
            kwargs["recipe"] = label.split(":", 1)[1]

        def compute(tmp: Path):
            entry(tmp, config=config, **kwargs)

        how = build_cached(Path(out), CACHE if cache else None, stage, key, compute)
        if how == "restored":
            # stderr: shown at every verbosity, also for tasks whose stdout doit captures
            print(f"{label}: restored from the run cache ({CACHE / stage / key})", file=sys.stderr, flush=True)
    except TunebuildError as e:
        return TaskFailed(f"{label}: {e}")
    except FileNotFoundError as e:
        return TaskFailed(f"{label}: missing input {e.filename}")
    return None


def remove_output(out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
