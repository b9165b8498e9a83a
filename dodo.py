"""tunebuild tasks. `doit build:<recipe>` builds a recipe end to end, `doit eval` scores every recipe's models.

This file only declares tasks: recipes are loaded and validated by `pipeline.core.recipe`, the graph
(`pipeline.core.graph`) walks each recipe through the stages of `pipeline/stages/`, and `pipeline.core.tasklist` hands
doit one task creator per stage (`task_generate`, `task_import`, `task_sft`, ...) plus `build` and `eval`. Nothing
heavy (torch, transformers, ...) is imported until a task runs.
"""
import sys
from pathlib import Path

from pipeline.core.tasklist import DOIT_CONFIG, creators  # noqa: F401  (doit reads DOIT_CONFIG from here)
from pipeline.errors import TunebuildError

try:
    globals().update(creators(Path(__file__).resolve().parent))
except TunebuildError as error:
    sys.exit(f"tunebuild: {error}")
