"""The build core: what turns recipes into doit tasks and runs them. It knows no stage by name and imports a library
only inside a function (see pipeline/__init__.py).

- recipe/: the recipe schema (schema.py), loading with extends and validation (load.py), sweeps (sweep.py), the
  checks across keys (checks.py) and the generated reference (reference.py)
- graph.py: recipes walked through the stages into task dicts; tasklist.py: what dodo.py hands doit;
  task_cache.py: the task list kept as data; uptodate.py: doit's up-to-date checks (content, config)
- stage.py: the stage contract; train_tasks.py: the training stages' task declaration (sft, dpo, merge)
- runner.py: one stage task (run cache, atomic output, one-line errors); store.py: manifests, atomic folders, the run
  cache; executor.py, gpus.py, slurm.py: where a heavy task runs
- console.py: the build's output and `doit run`; doit_commands.py, gc_command.py: why, runs, info, list, gc
"""
