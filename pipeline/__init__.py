"""tunebuild: a declarative, incremental build system for LLM fine-tuning experiments, on pydoit.

The package stands on a ground and has three floors:

    errors.py, digests.py   the ground: the errors a user can act on ("did you mean"), content digests (files,
                            folders, manifests, JSON values) and the digest cache
    core/                   the build system: recipes (recipe/: schema, load, sweep, checks, reference), the task graph,
                            the task list dodo.py hands doit and its cache, doit's up-to-date checks, the runner, the
                            artifact store, the stage contract (stage.py), declaring the training stages' tasks, the
                            doit commands (why, gc, runs, info, list, run), the executors and GPU leases
    stages/                 one module per stage: its contract (STAGE), its tasks (tasks(plan)) and its work (run)
    data/, finetuning/,     the libraries the stages use, grouped by what they serve: data (reading files, detecting
    evaluation/, llm/,      and converting formats, canonical datasets, the ROUGE-L filter), finetuning (training,
    models/                 chat templates), evaluation (paired statistics, plots, the chat app), llm (clients,
                            ledger, prompt templates, generation engines), models (loading Hugging Face models, the
                            built-in tiny model)

Who may import whom (tests/test_stages.py walks every import, those inside functions too):
- the ground imports nothing else from pipeline;
- a library imports other libraries and the ground; never the core, never a stage;
- the core imports the core and the ground, a library only inside a function (so that dodo.py stays light: the
  recipe checks ask the data formats and the chat templates, the run-cache key asks which commit a hub model
  resolves to), and no stage by name: the graph discovers the modules of pipeline/stages/;
- a stage imports the core (its contract, the store, recipe helpers), the libraries and the ground; never another
  stage: what two stages share is a library, or the core when it declares tasks (core/train_tasks.py).
No module is longer than about 400 lines.
"""
