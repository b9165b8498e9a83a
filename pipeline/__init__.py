"""tunebuild: a declarative, incremental build system for LLM fine-tuning experiments, on pydoit."""
