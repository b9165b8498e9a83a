"""tunebuild stages: one module each, declaring its contract (`STAGE`), its tasks (`tasks(plan)`) and its work
(`run`). See pipeline/core/stage.py."""
