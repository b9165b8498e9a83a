"""LLM-call library: clients for OpenAI-compatible endpoints and local models, the ledger, prompt templates,
the batched HF and vLLM generation engines."""
