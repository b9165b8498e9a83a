"""A node's GPUs, shared among the heavy tasks of every doit worker and every doit process on the machine.

- The pool: `TUNEBUILD_GPUS=0,1,2,3` (ids as CUDA numbers them; `none` or empty: no GPU), else
  `CUDA_VISIBLE_DEVICES`, else every device `nvidia-smi -L` lists, else none (a CPU machine).
- A lease is a set of `flock` locks on files `gpu-<id>.<slot>.lock` in one machine-wide folder
  (`TUNEBUILD_LOCK_DIR`, default `/tmp/tunebuild-gpu-locks-<uid>`). Each GPU has `TUNEBUILD_TASKS_PER_GPU` slots
  (default 1). The kernel drops a flock when the last descriptor on it closes, so a lease is released however
  its holder ends: normally, by an exception, or SIGKILLed. The executor hands the descriptors to the task's
  child process too, so the lease lives exactly as long as the doit worker or the work it started.
- A task that asks for more GPUs than are free waits (polling), saying so once; one that asks for more than the
  pool has fails in one line.

This module is the build core's; it knows no stage.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import TunebuildError


def pool() -> list[str]:
    """The GPU ids this machine shares among tasks."""
    for var in ("TUNEBUILD_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            value = value.strip()
            if value.lower() in ("", "none", "-1"):
                return []
            ids = [v.strip() for v in value.split(",") if v.strip()]
            if len(set(ids)) != len(ids):
                raise TunebuildError(f"{var}={value}: an id is named twice")
            return ids
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in listed.splitlines() if l.startswith("GPU "))]


def tasks_per_gpu() -> int:
    value = os.environ.get("TUNEBUILD_TASKS_PER_GPU", "1")
    if not value.isdigit() or int(value) < 1:
        raise TunebuildError(f"TUNEBUILD_TASKS_PER_GPU={value}: expected a whole number >= 1")
    return int(value)


def wanted(gpus: int | None, available: list[str]) -> int:
    """How many GPUs a task takes: what its recipe says, else 1 where GPUs exist and 0 on a CPU machine."""
    return (1 if available else 0) if gpus is None else int(gpus)


def lock_dir() -> Path:
    return Path(os.environ.get("TUNEBUILD_LOCK_DIR") or f"/tmp/tunebuild-gpu-locks-{os.getuid()}")


@dataclass
class Lease:
    ids: list[str]
    fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)  # closing the last descriptor drops the flock
            except OSError:
                pass
        self.fds = []


def _try(folder: Path, gpu: str, slot: int) -> int | None:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", gpu)
    fd = os.open(folder / f"gpu-{name}.{slot}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def acquire(n: int, label: str, available: list[str] | None = None, poll: float = 0.2) -> Lease:
    """An exclusive lease on `n` GPU ids of the pool, waiting until that many are free."""
    available = pool() if available is None else available
    if n == 0:
        return Lease([])
    if n > len(available):
        where = f"TUNEBUILD_GPUS={','.join(available)}" if available else "no GPU"
        raise TunebuildError(f"needs {n} GPU(s) but this machine shares {len(available)} ({where}): lower the "
                             f"recipe's gpus or run it on Slurm (TUNEBUILD_EXECUTOR=slurm)")
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    slots = tasks_per_gpu()
    said = False
    while True:
        got: list[tuple[str, int]] = []
        for slot in range(slots):          # the first slot of every GPU before any second slot: spread out
            for gpu in available:
                if len(got) == n:
                    break
                if any(g == gpu for g, _ in got):
                    continue
                fd = _try(folder, gpu, slot)
                if fd is not None:
                    got.append((gpu, fd))
        if len(got) == n:
            return Lease([g for g, _ in got], [fd for _, fd in got])
        for _, fd in got:
            os.close(fd)
        if not said:
            print(f"{label}: waiting for {n} free GPU(s) of {len(available)}", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll)


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT), as LLaMA-Factory's find_available_port does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
