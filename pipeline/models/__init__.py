"""Models library: loading Hugging Face models and tokenizers (hub or folder), and the built-in tiny model."""
