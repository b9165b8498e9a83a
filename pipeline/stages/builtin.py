"""Stage `builtin`: the built-in models recipes name (`builtin:tiny`), built once per project.

Contract: reads no recipe section (task `builtin:<name>`); consumes nothing; writes `artifacts/models/<builtin-name>/`, an ordinary
Hugging Face model folder (see `pipeline.models.tiny`) that every later stage loads with `from_pretrained`. The graph
records each `builtin:` reference a recipe's stages ask for; this stage builds those.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.stage import Stage

STAGE = Stage(name="builtin", version=1, phase="project", gpus=0,
              doc="Build the built-in models the recipes name (builtin:tiny).")
TINY_CONFIG = {"seed": 0}


def tasks(plan):
    for ref in sorted(plan.project.builtin_refs):
        folder = plan.model(ref).folder
        yield plan.task(STAGE, ref.split(":", 1)[1], folder, config=TINY_CONFIG, doc=f"build the built-in model {ref}")


def run(out_dir: Path, *, config: dict) -> None:
    from pipeline.models import tiny

    tiny.build(out_dir, config)
