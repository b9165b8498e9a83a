"""How a training computes: the dtype its model loads and trains in, the attention kernel, optional Liger kernels,
gradient checkpointing, and the device of this process. The training stages and the merge stage share these rules.

- `precision = "auto"`: bfloat16 where the GPU supports it, else float32 (a CPU: float32, so CPU artifacts are what
  they were). The model loads in the precision it trains in: an 8B LoRA base in bfloat16 holds 16 GB, not 32.
  float16 loads a LoRA / QLoRA base in float16 too, but full and freeze weights stay float32 (fp16 mixed precision
  needs float32 master weights for its gradient scaler).
- QLoRA computes in the same precision (`bnb_4bit_compute_dtype`); only in float32 does PEFT's
  `prepare_model_for_kbit_training` run (it upcasts every non-4-bit weight to float32).
- `attn_implementation = "auto"`: flash_attention_2 where a GPU, the `flash_attn` package and a 16-bit precision
  are all there, else transformers' default for the model (sdpa where the model supports it).
- The merge loads its base in the base's own dtype on a GPU (`dtype="auto"`), in float32 on a CPU.
"""
from __future__ import annotations

import importlib.util
import os

from pipeline.errors import TunebuildError, Unavailable


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve(setting: str) -> str:
    """The precision a training computes in: the recipe's, or for 'auto' bfloat16 where the GPU supports it."""
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def load_dtype(prec: str, finetuning: str) -> str:
    """The dtype the model's weights load in for a training in `prec`."""
    if prec == "float16" and finetuning in ("full", "freeze"):
        return "float32"
    return prec


def rank_device(strategy: str = "ddp") -> str:
    """Where this process loads its model: its local rank's GPU under `accelerate launch` (the only one otherwise),
    or the CPU: on a machine without a GPU, and under FSDP and ZeRO-3, which shard the model from there."""
    if not has_cuda() or strategy in ("fsdp", "zero3"):
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def merge_dtype() -> str:
    """The dtype a merge loads its (full-precision) base in: its own on a GPU, float32 on a CPU."""
    return "auto" if has_cuda() else "float32"


def need_gpu(what: str, where: str) -> None:
    """Unavailable (cannot run here) on a machine without a CUDA GPU."""
    if not has_cuda():
        raise Unavailable(f"{where}: {what} needs a CUDA GPU, and this machine has none")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def attn_implementation(setting: str, prec: str, where: str) -> str | None:
    """The `attn_implementation` to load the model with (None: transformers' default for the model)."""
    flash = installed("flash_attn")
    if setting == "auto":
        return "flash_attention_2" if flash and has_cuda() and prec in ("bfloat16", "float16") else None
    if setting == "flash_attention_2":
        need_gpu("attn_implementation = 'flash_attention_2'", f"{where}.attn_implementation")
        if not flash:
            raise TunebuildError(f"{where}.attn_implementation: 'flash_attention_2' needs the flash-attn package: "
                                 f"pip install flash-attn --no-build-isolation")
        if prec not in ("bfloat16", "float16"):
            raise TunebuildError(f"{where}.attn_implementation: 'flash_attention_2' computes in bfloat16 or float16, "
                                 f"but precision resolves to {prec}: set precision = 'bfloat16'")
    return setting


def load_kwargs(t: dict, prec: str, where: str) -> dict:
    """`load_causal_lm` arguments for a training's model (and a DPO reference model): where it loads, the attention
    kernel."""
    attn = attn_implementation(t["attn_implementation"], prec, where)
    return {"on": rank_device(t["strategy"]), **({"attn_implementation": attn} if attn else {})}


def check_liger(on: bool, where: str) -> None:
    """`liger_kernel = true` needs the liger-kernel package and a GPU (its kernels are Triton kernels)."""
    if not on:
        return
    if not installed("liger_kernel"):
        raise TunebuildError(f"{where}.liger_kernel: needs the liger-kernel package: pip install -e '.[liger]'")
    need_gpu("liger_kernel = true (Triton kernels)", f"{where}.liger_kernel")


def quantization(prec: str, strategy: str):
    """The 4-bit nf4 config of a QLoRA base (double quantisation) computing in `prec`. Under FSDP the packed 4-bit
    weights are stored in the compute dtype, so FSDP can shard them with the rest (FSDP + QLoRA)."""
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, prec)
    extra = {"bnb_4bit_quant_storage": dtype} if strategy == "fsdp" else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, **extra)


def trainer_args(t: dict, prec: str, gradient_checkpointing: bool) -> dict:
    """The trainer arguments of precision and kernels (TRL's names). Precision is explicit: TRL's configs default to
    bf16, which fails on a CPU."""
    from transformers import TrainingArguments

    # several processes: DDP need not look for unused weights (adapter, full and freeze weights all take part)
    args = dict(bf16=prec == "bfloat16", fp16=prec == "float16", use_cpu=not has_cuda(),
                ddp_find_unused_parameters=False)
    # always explicit: TRL's configs default it to True. transformers 5.x renames it (the old names then mirror the
    # new ones, which TRL reads)
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    args[name] = gradient_checkpointing
    if gradient_checkpointing:
        args[f"{name}_kwargs"] = {"use_reentrant": False}
    if t.get("liger_kernel"):
        args["use_liger_kernel"] = True
    return args
