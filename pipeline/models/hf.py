"""Loading models and tokenizers with the ordinary `from_pretrained` code paths, shared by the stages.

`ref` is a local model folder or a Hugging Face hub id; the graph has already turned `builtin:tiny` into the
folder it built. A model that can be neither found locally nor fetched raises `Unavailable` with one line.
"""
from __future__ import annotations

import functools
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


def split_ref(ref) -> tuple[str, str | None]:
    """(hub id or folder, revision): a hub model reaches a stage as `<id>` or `<id>@<revision>` (`model.revision`);
    a hub id never holds '@', a local folder is taken as it is."""
    ref = str(ref)
    if "@" in ref and not Path(ref).exists():
        name, _, revision = ref.rpartition("@")
        return name, revision or None
    return ref, None


def _what(ref: str) -> str:
    hub_id, revision = split_ref(ref)
    return f"model {hub_id!r}" + (f" at revision {revision!r}" if revision else "")


def _unavailable(ref: str, err: Exception) -> Unavailable:
    if Path(ref).exists():
        return Unavailable(f"model folder {ref} cannot be loaded: {str(err).splitlines()[0]}")
    return Unavailable(f"{_what(ref)} is not a local folder and could not be fetched from the Hugging Face hub "
                       f"(offline, a gated model without HF_TOKEN, or no such revision?): {type(err).__name__}")


def _from_cache(hub_id: str, revision: str | None):
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(hub_id, "config.json", revision=revision)


def ensure_available(ref: str) -> None:
    """Fail fast, in one line, when `ref` is neither a local folder, nor cached, nor fetchable from the hub."""
    if Path(ref).exists():
        return
    hub_id, revision = split_ref(ref)
    try:
        cached = _from_cache(hub_id, revision)
    except ValueError:  # not a valid repo id
        raise Unavailable(f"model {hub_id!r} is neither a local folder nor a Hugging Face hub id") from None
    if isinstance(cached, str):
        return
    offline = _hub_reachable()
    if offline:
        raise Unavailable(f"{_what(ref)} is not a local folder and not in the Hugging Face cache, and {offline}")


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, found as huggingface_hub finds it (without importing it)."""
    import os

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolved_commit(hub_id: str, revision: str | None) -> str | None:
    """The commit a hub model's revision (default: main) resolves to, as the local Hugging Face cache says (its
    `refs/<revision>`, which every load from the hub refreshes), or None when the cache does not know it. Cheap (a
    small file read, no import, no network): the up-to-date check of every task using a hub model calls it."""
    import re

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    folder = hub_cache() / f"models--{hub_id.replace('/', '--')}"
    try:
        commit = (folder / "refs" / (revision or "main")).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def hub_commits(refs: dict) -> dict:
    """{argument: {"model": "<id>[@<revision>]", "commit": commit or None}} for a task's hub models."""
    out = {}
    for name, ref in sorted(refs.items()):
        hub_id, revision = split_ref(ref)
        out[name] = {"model": ref, "commit": resolved_commit(hub_id, revision)}
    return out


def model_identity(ref) -> str:
    """What a model is, for lineage: `sha256:<digest>` of a folder's content (an artifact's manifest, or a local
    folder's files), or `hub:<id>@<commit>` (the revision asked for when the commit is not known)."""
    from pipeline.digests import input_digest

    if Path(ref).is_dir():
        return f"sha256:{input_digest(Path(ref))}"
    hub_id, revision = split_ref(ref)
    return f"hub:{hub_id}@{resolved_commit(hub_id, revision) or revision or 'main'}"


def load_tokenizer(ref: str, check: bool = True):
    from transformers import AutoTokenizer

    if check:
        ensure_available(ref)
    name, revision = split_ref(ref)
    try:
        tok = AutoTokenizer.from_pretrained(name, **({"revision": revision} if revision else {}))
    except (OSError, ValueError) as e:
        raise _unavailable(ref, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, dtype: str = "float32", with_tokenizer: bool = True, on: str | None = None,
                   **kwargs):
    """(model, tokenizer) on device `on` (default: the best one); dtype 'float32' | 'bfloat16' | 'float16' | 'auto'
    (the model's own). Other keyword arguments go to `from_pretrained`; a `quantization_config` model is placed by
    bitsandbytes on that GPU (`device_map`), not moved."""
    import torch
    from transformers import AutoModelForCausalLM

    ensure_available(ref)
    tok = load_tokenizer(ref, check=False) if with_tokenizer else None
    name, revision = split_ref(ref)
    if revision:
        kwargs["revision"] = revision
    on = on or device()
    if "quantization_config" in kwargs and on != "cpu":
        kwargs["device_map"] = {"": on}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                     **kwargs)
    except (OSError, ValueError) as e:
        raise _unavailable(ref, e) from None
    return (model if "quantization_config" in kwargs else model.to(on)), tok


_OFFLINE: list = [None]   # why the hub is out of reach, once this process has set HF_HUB_OFFLINE itself


def _hub_reachable() -> str | None:
    """None when the hub can be reached, else why not (one phrase)."""
    import os
    from urllib.parse import urlparse

    if _OFFLINE[0]:
        return _OFFLINE[0]
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _reach(endpoint.hostname, endpoint.port or 443)


@functools.lru_cache(maxsize=8)
def _reach(host: str, port: int) -> str | None:
    """Asked once per process: a build asks for every task."""
    import socket

    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e})"
    return None


def cached_snapshot(hub_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of `hub_id` with its config (any revision)."""
    folder = hub_cache() / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    try:
        return any((snap / "config.json").exists() for snap in folder.iterdir())
    except OSError:
        return False


def load_hub_dataset(hub_id: str, *, subset: str | None, split: str, revision: str | None, where: str):
    """Rows of a hub dataset as [(row number, dict)], with the commit it resolved to (None when unknown, e.g.
    from the local cache offline). One line naming the recipe key and the dataset id when it cannot be had."""
    offline = _hub_reachable()
    if offline:
        import os

        os.environ["HF_HUB_OFFLINE"] = "1"  # use the local cache only, without retrying the network
        _OFFLINE[0] = offline  # and say why later in this process too, not "HF_HUB_OFFLINE is set"
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
