"""The build core: recipes, the task graph, the runner, the artifact store, doit commands and executors."""
