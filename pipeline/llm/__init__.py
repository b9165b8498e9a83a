"""LLM-call library: client.py (one client, two backends, every call through the ledger), openai_backend.py (any
OpenAI-compatible endpoint, with retries), ledger.py, prompts.py (prompt templates), generation.py (batched local
generation with transformers), vllm_engine.py (vLLM, optional)."""
