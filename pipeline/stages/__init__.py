"""tunebuild stages: one module each, declaring its contract (`STAGE`), its tasks (`tasks(plan)`) and its work
(`run`). See pipeline/core/stage.py. A stage imports the core, the libraries and the ground, never another stage
(pipeline/__init__.py)."""
