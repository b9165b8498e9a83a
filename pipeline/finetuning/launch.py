"""Running a training in several processes: `train.<name>.processes` and `train.<name>.strategy`.

A training stage hands its work function to `run`. With one process and `strategy = "ddp"` (the default) it runs
right here, as it always did. Otherwise it runs under `accelerate launch` with the shipped config of its strategy
(`pipeline/finetuning/accelerate_configs/<strategy>.yaml`: ddp, fsdp, zero2, zero3), `--num_processes N`, on the GPUs the task
holds (`CUDA_VISIBLE_DEVICES`) and its port (`MASTER_PORT`), both given by the executor; on a machine without a GPU,
DDP runs on the CPU over gloo (the Trainer's `use_cpu`). Each rank runs `python -m pipeline.finetuning.launch SPEC`: the same
work function with the same arguments, every rank training on its shard of each global batch; rank 0 alone writes
the output folder and returns the summary.

The task around it is unchanged: the runner restores or computes the output (temporary folder, manifest last,
run-cache key, scratch checkpoints that a resumed run of any process count reads), and the error is one line. A
rank that fails says so in its result file; a rank that dies (a signal, out of memory) is named with its exit from
torchrun's report. Rank 0's output is the task's own (its log); rank k > 0 writes `<task log>.rank<k>.log`
(`TUNEBUILD_LOG`, set by the executor), or a file in a kept temporary folder when the stage runs outside one.

FSDP runs on GPUs only (accelerate would silently run DDP on a CPU), DeepSpeed on GPUs with the `deepspeed` extra:
both are refused in one line elsewhere.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import TunebuildError, Unavailable

CONFIGS = Path(__file__).parent / "accelerate_configs"
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")


def distributed(config: dict) -> bool:
    return (config.get("processes") or 1) > 1 or config.get("strategy", "ddp") != "ddp"


def check(config: dict, where: str) -> None:
    """One line when this machine cannot run the strategy or the number of processes."""
    import torch

    strategy, n = config["strategy"], config["processes"] or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if strategy != "ddp" and not gpus:
        why = "accelerate runs FSDP on GPUs only (on a CPU it would silently be DDP)" if strategy == "fsdp" else \
            "DeepSpeed ZeRO runs on GPUs"
        raise Unavailable(f"{where}.strategy: '{strategy}' needs CUDA GPUs ({why}), and this machine has none")
    if strategy.startswith("zero"):
        from importlib.util import find_spec

        if find_spec("deepspeed") is None:
            raise TunebuildError(f"{where}.strategy: '{strategy}' needs DeepSpeed: pip install -e '.[deepspeed]'")
    if gpus and n > gpus:
        raise TunebuildError(f"{where}.processes: {n} processes, but the task holds {gpus} GPU(s): set "
                             f"{where}.gpus = {n} (one process per GPU)")


def run(fn, out_dir: Path, kwargs: dict, where: str):
    """`fn(out_dir, **kwargs)` in this process, or in `processes` ranks under `accelerate launch`; rank 0's result."""
    config = kwargs["config"]
    if not distributed(config):
        return fn(out_dir, **kwargs)
    check(config, where)
    folder = Path(tempfile.mkdtemp(prefix="tunebuild-launch-"))
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"entry": f"{fn.__module__}:{fn.__name__}", "out_dir": str(Path(out_dir).resolve()),
                                "kwargs": _encode(kwargs), "logs": _log_base(folder)}))
    from pipeline.finetuning.precision import resolve

    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(resolve(config["precision"]), "no")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIGS / f"{config['strategy']}.yaml"), "--num_processes", str(config["processes"]),
               "--main_process_ip", os.environ.get("MASTER_ADDR", "127.0.0.1"),
               "--main_process_port", os.environ.get("MASTER_PORT") or str(_free_port()),
               "--mixed_precision", mixed, "-m", "pipeline.finetuning.launch", str(spec)]
    print(f"{where}: {config['processes']} processes ({config['strategy']}) under accelerate launch", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    report = []
    for line in proc.stderr:       # torchrun's report goes on to the task's log, and is kept to name a dead rank
        sys.stderr.write(line)
        report.append(line)
    code = proc.wait()
    results = {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("rank*.json")}
    logs = _log_base(folder)
    if (code == 0 and results.get(0, {}).get("ok")) or os.environ.get("TUNEBUILD_LOG"):
        shutil.rmtree(folder, ignore_errors=True)  # kept only when it holds the ranks' logs of a failure
    if code == 0 and results.get(0, {}).get("ok"):
        return results[0]["result"]
    raise _failure(where, code, results, "".join(report[-400:]), logs)


def _failure(where: str, code: int, results: dict, report: str, logs: str) -> Exception:
    """The one-line error of a failed launch: a rank killed by a signal that torchrun saw die first (its peers'
    errors, a broken collective, are what followed), else a rank's own error (the lowest rank that wrote one),
    else the rank torchrun saw die first, else the launcher's exit code."""
    failed = sorted(r for r, res in results.items() if res.get("error"))
    died = None
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(?:Signal \d+ \((\w+)\))?",
                     report, re.S)
    if root:
        rank, exit_code, sig = int(root.group(1)), int(root.group(2)), root.group(3)
        if exit_code < 0 and not sig:
            try:
                sig = signal.Signals(-exit_code).name
            except ValueError:
                sig = None
        how = f"was killed ({sig})" if exit_code < 0 or sig else f"exited with code {exit_code}"
        died = (rank, how, exit_code < 0 or bool(sig))
    if died and died[2] and died[0] not in failed:
        return TunebuildError(f"{where}: rank {died[0]} of the training {died[1]}; log: {rank_log(logs, died[0])}")
    if failed:
        rank, res = failed[0], results[failed[0]]
        text = res["error"] if rank == 0 else f"rank {rank}: {res['error']}; log: {rank_log(logs, rank)}"
        if res.get("bug") and rank == 0:
            text += " (rank 0; see the task's log)"
        return Unavailable(text) if res.get("unavailable") else TunebuildError(text)
    if died:
        return TunebuildError(f"{where}: rank {died[0]} of the training {died[1]}; log: {rank_log(logs, died[0])}")
    return TunebuildError(f"{where}: accelerate launch exited with code {code} before any rank reported; see the "
                          f"task's log")


def rank_log(base: str, rank: int) -> str:
    """Where rank `rank` writes its output: rank 0 into the task's own log, the others beside it."""
    if rank == 0:
        return os.environ.get("TUNEBUILD_LOG") or "the task's log (stdout)"
    return f"{base}.rank{rank}.log"


def _log_base(folder: Path) -> str:
    log = os.environ.get("TUNEBUILD_LOG")
    return str(Path(log).with_suffix("")) if log else str(folder / "task")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child, before it runs: die when the process that started it dies (torchrun starts each rank in a
    session of its own, so a killed build's process group would not reach the ranks)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _encode(value):
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        return Path(value["__path__"]) if set(value) == {"__path__"} else {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def is_main() -> bool:
    """Whether this process writes the output: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str]) -> int:
    """One rank: `python -m pipeline.finetuning.launch SPEC` (under accelerate launch)."""
    parent = os.getppid()
    _die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before the line above
        return 1
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    rank = int(os.environ.get("RANK", "0"))
    if rank:  # rank 0 keeps the task's streams; the others write their own log
        fd = os.open(rank_log(spec["logs"], rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    outcome: dict = {"ok": False}
    try:
        import importlib

        module, name = spec["entry"].split(":")
        if not module.startswith("pipeline.stages."):
            raise TunebuildError(f"{module!r} is not a stage module")
        fn = getattr(importlib.import_module(module), name)
        result = fn(Path(spec["out_dir"]), **_decode(spec["kwargs"]))
        outcome = {"ok": True, "result": result if rank == 0 else None}
    except (TunebuildError, Unavailable) as e:
        outcome = {"ok": False, "error": str(e), "unavailable": isinstance(e, Unavailable)}
    except Exception as e:  # noqa: BLE001  a bug: the traceback goes to this rank's log
        import traceback

        traceback.print_exc()
        outcome = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "bug": True}
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        tmp = spec_path.with_name(f"rank{rank}.json.tmp")
        tmp.write_text(json.dumps(outcome))
        os.replace(tmp, spec_path.with_name(f"rank{rank}.json"))
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001  the work is done; a teardown hiccup is not a failure
        pass
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def full_state_dict(trainer):
    """The model's whole state dict where the processes hold shards of it (FSDP, ZeRO-3): gathered, a collective
    that every rank calls, rank 0 getting it. None where each process holds the whole model (one process, DDP,
    ZeRO-2)."""
    acc = trainer.accelerator
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if getattr(acc.state, "fsdp_plugin", None) is not None or (ds is not None and ds.zero_stage == 3):
        return acc.get_state_dict(trainer.model_wrapped)
    return None
