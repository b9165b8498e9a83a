"""What a stage module declares about itself, and the helpers stages share to declare their tasks.

A stage is one module in `pipeline/stages/` holding, next to its code, its contract:

    STAGE = Stage(name="filter", version=3, phase="data", section="filter", doc="...")

    def tasks(plan):          # declare this stage's tasks for one recipe (`plan` is a `pipeline.core.graph.Plan`)
        ...yield plan.task(STAGE, name, out, inputs=..., config=..., provides=...)

    def run(out_dir, *, config, **inputs):   # compute the output into out_dir (heavy imports inside)

The graph imports every stage module when dodo.py loads, so a stage module imports nothing heavy at its top.
Stages never import each other: what one stage produces reaches the next through the plan's products.
"""
from __future__ import annotations

from dataclasses import dataclass

# The order in which the graph walks a recipe. A stage may use the products of earlier phases only.
PHASES = ("project", "source", "data", "train", "models", "eval", "compare", "scores", "report")
# Phases whose tasks `doit eval` runs (with what they need).
EVAL_PHASES = ("eval", "compare", "scores", "report")


@dataclass(frozen=True)
class Stage:
    name: str              # the artifact folder under artifacts/<recipe>/ and, by default, the doit basename
    version: int           # bump when the code changes what the stage writes: old run-cache entries stop matching
    phase: str             # one of PHASES
    doc: str               # `doit list` help for the basename
    section: str | None = None   # the recipe section the stage reads
    basename: str | None = None  # doit basename when several stages share one (`evaluate:` holds heldout too)
    cache: bool = True           # keep finished outputs in the run cache
    verbosity: int = 2           # doit verbosity of its tasks (1: doit captures stdout)
    in_build: bool = True        # part of `doit build:<recipe>` (False: run only when named, e.g. `chat:<recipe>`)
    # What its work needs. None: a light stage; it runs in the doit process and never holds a GPU. Otherwise a heavy
    # stage, run by the executor (`pipeline.core.executor`) in a child process or a Slurm job: an int is a fixed
    # number of GPUs; a string is the recipe key that gives the number ("train.<name>.gpus"): its last part is read
    # from the task's config section (and kept out of its run-cache key), or the stage hands it to
    # `plan.task(gpus=...)`.
    # Unset in the recipe: 1 where GPUs exist, 0 on a CPU machine (decided when the task runs).
    gpus: int | str | None = None

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"stage {self.name}: phase {self.phase!r} is not one of {PHASES}")

    @property
    def heavy(self) -> bool:
        return self.gpus is not None

    @property
    def gpus_key(self) -> str | None:
        """The key of the task's config section holding its GPU count, when that varies by recipe."""
        return self.gpus.rsplit(".", 1)[-1] if isinstance(self.gpus, str) else None

    @property
    def task_basename(self) -> str:
        return self.basename or self.name


@dataclass(frozen=True)
class Product:
    """Something a task makes that later stages consume: a dataset, a trained adapter, a model, an evaluation."""
    kind: str
    name: str
    out: str               # the artifact folder
    task: str              # the doit task that makes it
    info: dict             # whatever the consumers need (role, suite, the datasets a model was trained on, ...)
