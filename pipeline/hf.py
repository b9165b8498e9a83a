"""Loading models and tokenizers with the ordinary `from_pretrained` code paths, shared by the stages.

`ref` is a local model folder or a Hugging Face hub id; the graph has already turned `builtin:tiny` into the
folder it built. A model that can be neither found locally nor fetched raises `Unavailable` with one line.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import Unavailable

DTYPES = ("float32", "bfloat16", "float16")


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "lm_eval", "datasets", "tunebuild"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _unavailable(ref: str, err: Exception) -> Unavailable:
    if Path(ref).exists():
        return Unavailable(f"model folder {ref} cannot be loaded: {str(err).splitlines()[0]}")
    return Unavailable(f"model {ref!r} is not a local folder and could not be fetched from the Hugging Face hub "
                       f"(offline, or a gated model without HF_TOKEN?): {type(err).__name__}")


def ensure_available(ref: str) -> None:
    """Fail fast, in one line, when `ref` is neither a local folder, nor cached, nor fetchable from the hub."""
    import os
    import socket
    from urllib.parse import urlparse

    if Path(ref).exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(ref, "config.json")
    except ValueError:  # not a valid repo id
        raise Unavailable(f"model {ref!r} is neither a local folder nor a Hugging Face hub id") from None
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise Unavailable(f"model {ref!r} is not a local folder and not in the Hugging Face cache "
                          "(HF_HUB_OFFLINE is set)")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as e:
        raise Unavailable(f"model {ref!r} is not a local folder and not in the Hugging Face cache, and "
                          f"{endpoint.hostname} cannot be reached ({e.strerror or e})") from None


def load_tokenizer(ref: str, check: bool = True):
    from transformers import AutoTokenizer

    if check:
        ensure_available(ref)
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise _unavailable(ref, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, dtype: str = "float32", with_tokenizer: bool = True):
    """(model, tokenizer) on the best device; dtype 'float32' | 'bfloat16' | 'float16'."""
    import torch
    from transformers import AutoModelForCausalLM

    ensure_available(ref)
    tok = load_tokenizer(ref, check=False) if with_tokenizer else None
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise _unavailable(ref, e) from None
    return model.to(device()), tok
