"""tunebuild tasks. `doit build:<recipe>` builds a recipe end to end, `doit eval` scores every recipe's models.

This file only declares tasks: recipes are loaded and validated by `pipeline.recipe`, task dicts come from
`pipeline.graph`, and nothing heavy (torch, transformers, ...) is imported until a task runs.
"""
import sys
from pathlib import Path

from pipeline.errors import TunebuildError
from pipeline.graph import DOIT_CONFIG, Project  # noqa: F401  (doit reads DOIT_CONFIG from here)

try:
    PROJECT = Project(Path(__file__).resolve().parent)
except TunebuildError as error:
    sys.exit(f"tunebuild: {error}")


def task_model():
    """Build the built-in models the recipes name (builtin:tiny)."""
    yield from PROJECT.model_tasks()


def task_generate():
    """Self-instruct: grow the seed tasks into instructions and instances through the LLM ledger."""
    yield from PROJECT.stage_tasks("generate")


def task_filter():
    """Rule and ROUGE-L filtering of the generated pool into train/held-out sets."""
    yield from PROJECT.stage_tasks("filter")


def task_sft():
    """LoRA supervised fine-tuning with TRL's SFTTrainer."""
    yield from PROJECT.stage_tasks("sft")


def task_merge():
    """Merge the LoRA adapter into the base model."""
    yield from PROJECT.stage_tasks("merge")


def task_evaluate():
    """Evaluate one model on one suite (lm-eval tasks, or the held-out loss)."""
    yield from PROJECT.stage_tasks("evaluate")


def task_answers():
    """A model's answers to the LLM judge's instruction set."""
    yield from PROJECT.stage_tasks("answers")


def task_judge():
    """LLM-as-judge: tuned vs base answers, both orders (or single-answer grading)."""
    yield from PROJECT.stage_tasks("judge")


def task_scores():
    """Load a recipe's evaluation results into artifacts/scores.duckdb."""
    yield from PROJECT.stage_tasks("scores")


def task_report():
    """Print and write a recipe's base-vs-tuned comparison."""
    yield from PROJECT.stage_tasks("report")


def task_build():
    """Build recipes end to end (`doit build:<recipe>` for one)."""
    yield from PROJECT.build_tasks()


def task_eval():
    """Evaluate every recipe's models and refresh the scores (`doit eval:<recipe>` for one)."""
    yield from PROJECT.eval_tasks()
