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
    if Path(ref).exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(ref, "config.json")
    except ValueError:  # not a valid repo id
        raise Unavailable(f"model {ref!r} is neither a local folder nor a Hugging Face hub id") from None
    if isinstance(cached, str):
        return
    offline = _hub_reachable()
    if offline:
        raise Unavailable(f"model {ref!r} is not a local folder and not in the Hugging Face cache, and {offline}")


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


def load_causal_lm(ref: str, dtype: str = "float32", with_tokenizer: bool = True, **kwargs):
    """(model, tokenizer) on the best device; dtype 'float32' | 'bfloat16' | 'float16'. Other keyword arguments go
    to `from_pretrained` (a `quantization_config` model is placed by bitsandbytes, not moved)."""
    import torch
    from transformers import AutoModelForCausalLM

    ensure_available(ref)
    tok = load_tokenizer(ref, check=False) if with_tokenizer else None
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=getattr(torch, dtype), **kwargs)
    except (OSError, ValueError) as e:
        raise _unavailable(ref, e) from None
    return (model if "quantization_config" in kwargs else model.to(device())), tok


def _hub_reachable() -> str | None:
    """None when the hub can be reached, else why not (one phrase)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as e:
        return f"{endpoint.hostname} cannot be reached ({e.strerror or e})"
    return None


def load_hub_dataset(hub_id: str, *, subset: str | None, split: str, revision: str | None, where: str):
    """Rows of a hub dataset as [(row number, dict)], with the commit it resolved to (None when unknown, e.g.
    from the local cache offline). One line naming the recipe key and the dataset id when it cannot be had."""
    offline = _hub_reachable()
    if offline:
        import os

        os.environ["HF_HUB_OFFLINE"] = "1"  # use the local cache only, without retrying the network
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_id, subset, split=split, revision=revision)
    except Exception as e:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ValueError, ...)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        why = f"not in the local cache and {offline}" if offline else f"{type(e).__name__}: {first}"
        raise Unavailable(f"{where}.source: hub dataset {hub_id!r} (split {split!r}) cannot be loaded: {why}") \
            from None
    resolved = None
    if not offline:
        try:
            from huggingface_hub import HfApi

            resolved = HfApi().dataset_info(hub_id, revision=revision).sha
        except Exception:  # noqa: BLE001  the revision is lineage, not a reason to fail the import
            resolved = None
    return [(i, dict(row)) for i, row in enumerate(ds, 1)], resolved
