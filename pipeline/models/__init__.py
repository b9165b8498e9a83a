"""Models library: hf.py (hub references and commits, loading models and tokenizers, a model's identity, hub
datasets) and tiny.py (the built-in tiny model)."""
