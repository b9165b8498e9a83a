"""Where a heavy stage task runs: a child process on this node holding its GPUs, or a Slurm job.

doit decides *what* runs; this module decides *where*. A task's identity (its run-cache key, its manifest) never
depends on that: not the host, the GPU ids, the port or the job id.

- `TUNEBUILD_EXECUTOR=local` (the default): the task leases its GPUs (`pipeline.core.gpus`: exclusive across doit
  workers and doit processes, released however its holder ends), then runs `python -m pipeline.core.executor` with
  `CUDA_VISIBLE_DEVICES` set to exactly those ids, a free `MASTER_PORT` and `MASTER_ADDR=127.0.0.1`. The child
  dies with its parent (PR_SET_PDEATHSIG), and holds the lease descriptors too. Its output streams to the
  terminal and to `artifacts/.logs/<task>.log`.
- `TUNEBUILD_EXECUTOR=slurm`: the task is a Slurm job (`pipeline.core.slurm`); the job runs the same child on the
  shared project folder.
- A task whose output the run cache holds is restored in the doit process: no GPU, no child, no job.
- The child restores or computes the output with the runner's rules (temporary folder, manifest last, scratch
  checkpoints keyed like the cache), then writes `result.json` beside its spec: the one-line error, if any.
- Every executed stage task appends one JSON line to `artifacts/runs.jsonl` (task, start, end, executor, host,
  devices, job id, state). It is a log: no manifest or key ever reads it.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from doit.exceptions import TaskFailed

from pipeline.core.console import verbose
from pipeline.errors import TunebuildError

RUNS_LOG = Path("artifacts") / "runs.jsonl"
LOGS = Path("artifacts") / ".logs"
RUNS = Path("artifacts") / ".runs"       # a heavy task's spec and result while it runs
EXECUTORS = ("local", "slurm")


def now() -> float:
    return time.time()


def in_child() -> bool:
    return os.environ.get("TUNEBUILD_IN_CHILD") == "1"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def log_run(label: str, start: float, end: float, executor: str, state: str, *, devices=(), job_id=None,
            visible=None, log=None) -> None:
    """Append one line to artifacts/runs.jsonl (one write of one line: safe from several processes)."""
    entry = {"build": os.environ.get("TUNEBUILD_BUILD"), "task": label, "start": _iso(start), "end": _iso(end),
             "seconds": round(end - start, 3),
             "executor": executor, "host": socket.gethostname(), "devices": list(devices), "job_id": job_id,
             "state": state}
    if visible is not None:
        entry["visible"] = visible
    if log:
        entry["log"] = str(log)
    RUNS_LOG.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(RUNS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", label)


def executor_name() -> str:
    name = os.environ.get("TUNEBUILD_EXECUTOR", "local").strip() or "local"
    if name not in EXECUTORS:
        raise TunebuildError(f"TUNEBUILD_EXECUTOR={name}: expected one of {', '.join(EXECUTORS)}")
    return name


def run_heavy(task: dict):
    """The doit action of a heavy task: restore it here, or run it where the executor says."""
    from pipeline.core.runner import UNAVAILABLE, CannotRunHere, cached, compute_stage, failure

    label = task["label"]
    started = now()
    try:
        name = executor_name()
        if cached(**task):
            error, how = compute_stage(**task)
            log_run(label, started, now(), "doit", "failed" if error else how)
            return failure(error, how)
        from pipeline.llm.engines import missing as missing_engine

        missing = missing_hub_model(task.get("hub") or {}) or missing_engine(task.get("engine"))
        if missing:  # said here, before a child imports torch to find it out
            log_run(label, started, now(), "doit", "failed")
            return CannotRunHere(f"{label}: cannot run here: {missing}")
        run_dir = RUNS / f"{safe_name(label)}-{os.getpid()}"
        run_dir.mkdir(parents=True, exist_ok=True)
        spec, result = run_dir / "spec.json", run_dir / "result.json"
        result.unlink(missing_ok=True)
        spec.write_text(json.dumps(task, sort_keys=True))
        log = LOGS / f"{safe_name(label)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if name == "slurm":
            from pipeline.core import slurm

            error = slurm.run(task, spec, result, log, started)
        else:
            error = _run_local(task, spec, result, log, started)
        outcome = read_result(result) or {}
        if error is None:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        return failure(error, UNAVAILABLE if outcome.get("how") == UNAVAILABLE else "failed")
    except TunebuildError as e:
        log_run(label, started, now(), "local", "failed")
        return TaskFailed(f"{label}: {e}")


def missing_hub_model(hub: dict) -> str | None:
    """Why a task's hub model cannot be had here (not in the local Hugging Face cache, and the hub unreachable),
    or None. Cheap: a folder lookup, and a connection attempt only for a model the cache lacks."""
    from pipeline.models import hf

    for ref in hub.values():
        hub_id, revision = hf.split_ref(ref)
        if hf.resolved_commit(hub_id, revision) is None and not hf.cached_snapshot(hub_id):
            offline = hf._hub_reachable()
            if offline:
                return f"{hf._what(ref)} is not in the Hugging Face cache, and {offline}"
    return None


def read_result(result: Path) -> dict | None:
    try:
        return json.loads(result.read_text())
    except (OSError, ValueError):
        return None


def _set_pdeathsig():  # in the child, before exec: die with the doit worker that started it
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _relay(src, writers: list, done: threading.Event | None = None) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    with src:
        while True:
            chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
            if not chunk:
                break
            text = decoder.decode(chunk)
            for w in writers:
                try:
                    w.write(text)
                    w.flush()
                except (OSError, ValueError):
                    pass


def child_command(spec: Path, result: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.core.executor", str(spec), str(result)]


def _run_local(task: dict, spec: Path, result: Path, log: Path, started: float) -> str | None:
    from pipeline.core import gpus

    label = task["label"]
    available = gpus.pool()
    lease = gpus.acquire(gpus.wanted(task.get("gpus"), available), label, available)
    began = now()
    try:
        env = {**os.environ, "TUNEBUILD_IN_CHILD": "1", "CUDA_VISIBLE_DEVICES": ",".join(lease.ids),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(gpus.free_port()), "TUNEBUILD_LOG": str(log)}
        with open(log, "w", encoding="utf-8") as log_file:
            proc = subprocess.Popen(child_command(spec, result), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=lease.fds, preexec_fn=_set_pdeathsig)
            # the stage's own messages (stdout) reach the terminal; library noise (stderr: progress bars,
            # warnings) only the log, unless TUNEBUILD_VERBOSE=1
            noise = [sys.stderr, log_file] if verbose() else [log_file]
            relays = [threading.Thread(target=_relay, args=(proc.stdout, [sys.stdout, log_file]), daemon=True),
                      threading.Thread(target=_relay, args=(proc.stderr, noise), daemon=True)]
            for r in relays:
                r.start()
            try:
                code = proc.wait()
            except BaseException:  # Ctrl-C, or doit stopping: stop the child too
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            for r in relays:
                r.join(timeout=10)
    finally:
        lease.release()
    outcome = read_result(result)
    visible = outcome.get("visible") if outcome else None
    if outcome and outcome.get("error") is None and code == 0:
        log_run(label, began, now(), "local", outcome.get("how", "computed"), devices=lease.ids, visible=visible,
                log=log)
        return None
    if not verbose() and not (outcome and outcome.get("error") and not outcome.get("bug")):
        show_tail(log)
    if outcome and outcome.get("error"):
        error = outcome["error"] + (f"; log: {log}" if outcome.get("bug") else "")
    elif code < 0:
        error = f"{label}: its process was killed ({signal.Signals(-code).name}); log: {log}"
    else:
        error = f"{label}: its process exited with code {code}; log: {log}"
    log_run(label, began, now(), "local", "failed" if code >= 0 else "killed", devices=lease.ids, visible=visible,
            log=log)
    return error


def show_tail(log: Path, lines: int = 25) -> None:
    """The end of a failed task's log (its traceback), on stderr: errors print in full."""
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    if tail:
        print(f"--- the last {len(tail)} lines of {log}:", *tail, sep="\n", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """The child: `python -m pipeline.core.executor SPEC RESULT` computes one stage task and writes RESULT."""
    spec, result = Path(argv[0]), Path(argv[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a Slurm job picks its port on its own node
        from pipeline.core.gpus import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    os.environ["TUNEBUILD_IN_CHILD"] = "1"
    task = json.loads(spec.read_text())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    bug = False
    try:
        from pipeline.core.runner import compute_stage

        error, how = compute_stage(**task)
    except Exception as e:  # noqa: BLE001  a bug, not a user error: the traceback goes to the log
        import traceback

        traceback.print_exc()
        error, how = f"{task['label']}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "failed"
        bug = True
    sys.stdout.flush()
    sys.stderr.flush()
    tmp = result.with_name(result.name + ".tmp")
    tmp.write_text(json.dumps({"error": error, "bug": bug, "how": how, "visible": visible,
                               "host": socket.gethostname(), "pid": os.getpid()}))
    os.replace(tmp, result)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
