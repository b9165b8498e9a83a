"""The Slurm executor: a heavy stage task becomes one batch job that runs it on the shared project folder.

Settings (environment variables, all optional, read when a task runs):

| variable | sbatch option | default |
|---|---|---|
| `TUNEBUILD_SLURM_PARTITION` | `--partition` | the cluster's default partition |
| `TUNEBUILD_SLURM_ACCOUNT` | `--account` | none |
| `TUNEBUILD_SLURM_TIME` | `--time` (e.g. `04:00:00`) | the partition's limit |
| `TUNEBUILD_SLURM_GPUS` | `--gres=gpu:N` for tasks whose recipe sets no `gpus` | 1 |
| `TUNEBUILD_SLURM_OPTIONS` | any other sbatch options, shell-quoted (`--qos=high --mem=64G`) | none |
| `TUNEBUILD_SLURM_POLL` | seconds between two looks at the job | 2 |

Why `sbatch` / `scontrol` / `scancel` directly and not submitit: submitit learns a job's end from `sacct`, which
needs accounting (slurmdbd and a database) that many clusters and every single-node Slurm lack ("Slurm accounting
storage is disabled"), and it pickles the function it runs. Here the job runs a plain command
(`python -m pipeline.core.executor SPEC RESULT`, the same child the local executor starts), its state comes from
`scontrol show job` (no accounting needed) and its outcome from the RESULT file it writes on the shared folder.

The job writes the artifact itself with the runner's rules (temporary folder, manifest last), so a job killed
halfway leaves nothing that looks finished; a training's checkpoints stay in `artifacts/.scratch/`, so the next
build resumes it. Its output goes to `artifacts/.logs/<task>.log`, streamed to the terminal while the job runs
when `TUNEBUILD_VERBOSE=1`. Ctrl-C on doit cancels the job. Failure, timeout, preemption and `scancel` each end
the task with one line naming the job id and the log.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.errors import TunebuildError

WAITING = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
           "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED"}
SAID = {"CANCELLED": "was cancelled (scancel)", "TIMEOUT": "ran out of its time limit (TUNEBUILD_SLURM_TIME)",
        "PREEMPTED": "was preempted", "NODE_FAIL": "lost its node", "OUT_OF_MEMORY": "ran out of memory",
        "FAILED": "failed", "BOOT_FAIL": "could not boot its node", "DEADLINE": "missed its deadline"}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default)).strip()
    if not value.isdigit():
        raise TunebuildError(f"{name}={value}: expected a whole number")
    return int(value)


def sbatch_options(label: str, gpus: int | None, log: Path) -> list[str]:
    n = _env_int("TUNEBUILD_SLURM_GPUS", 1) if gpus is None else int(gpus)
    opts = [f"--job-name=tb:{label}", f"--output={log.resolve()}", f"--chdir={Path.cwd()}", "--export=ALL",
            "--requeue"]
    if n:
        opts.append(f"--gres=gpu:{n}")
    for var, flag in (("TUNEBUILD_SLURM_PARTITION", "--partition"), ("TUNEBUILD_SLURM_ACCOUNT", "--account"),
                      ("TUNEBUILD_SLURM_TIME", "--time")):
        if os.environ.get(var):
            opts.append(f"{flag}={os.environ[var]}")
    try:
        opts += shlex.split(os.environ.get("TUNEBUILD_SLURM_OPTIONS", ""))
    except ValueError as e:
        raise TunebuildError(f"TUNEBUILD_SLURM_OPTIONS: not shell-quoted options ({e})") from None
    return opts


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise TunebuildError(f"TUNEBUILD_EXECUTOR=slurm but {name} is not on PATH (run on a Slurm login node)")
    return path


def job_state(job_id: str) -> tuple[str | None, str]:
    """(JobState, ExitCode) from `scontrol show job`; (None, "") once Slurm has forgotten the job."""
    proc = subprocess.run([_tool("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, ""
    state = re.search(r"\bJobState=(\S+)", proc.stdout)
    code = re.search(r"\bExitCode=(\S+)", proc.stdout)
    return (state.group(1) if state else None), (code.group(1) if code else "")


def _tail(log: Path, stop: threading.Event) -> None:
    """Stream the job's log to the terminal while it runs."""
    pos = 0
    while True:
        try:
            with open(log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        except OSError:
            pass
        if stop.is_set():
            return
        stop.wait(0.5)


def run(task: dict, spec: Path, result: Path, log: Path, started: float) -> str | None:
    """Submit the task, wait for its job, and return its one-line error (None on success)."""
    from pipeline.core.executor import child_command, log_run, now, read_result

    label = task["label"]
    poll = float(os.environ.get("TUNEBUILD_SLURM_POLL", "2") or 2)
    log.unlink(missing_ok=True)
    script = spec.with_name("job.sh")
    command = " ".join(shlex.quote(str(Path(c).resolve()) if c in (str(spec), str(result)) else c)
                       for c in child_command(spec, result))
    script.write_text(f"#!/bin/bash\nexport TUNEBUILD_IN_CHILD=1\n"
                      f"export TUNEBUILD_LOG={shlex.quote(str(log.resolve()))}\nexec {command}\n")
    submit = subprocess.run([_tool("sbatch"), "--parsable", *sbatch_options(label, task.get("gpus"), log),
                             str(script)], capture_output=True, text=True)
    if submit.returncode != 0:
        why = (submit.stderr.strip().splitlines() or ["no reason given"])[-1]
        log_run(label, started, now(), "slurm", "failed")
        return f"{label}: sbatch refused the job: {why}"
    job_id = submit.stdout.strip().split(";")[0]
    print(f"{label}: submitted as Slurm job {job_id} (log: {log})", file=sys.stderr, flush=True)
    from pipeline.core.console import verbose

    stop = threading.Event()
    tail = threading.Thread(target=_tail, args=(log, stop), daemon=True)
    if verbose():  # the whole log as it grows; else only the outcome
        tail.start()
    state, code = None, ""
    try:
        while True:
            state, code = job_state(job_id)
            if state is None or state not in WAITING:
                break
            time.sleep(poll)
    except BaseException:  # Ctrl-C or doit stopping: the job must not run on unattended
        subprocess.run([_tool("scancel"), job_id], capture_output=True)
        raise
    finally:
        stop.set()
        if tail.is_alive():
            tail.join(timeout=5)
    outcome = read_result(result)
    if state is None:  # purged from the controller's memory: the result file tells
        state = "COMPLETED" if outcome and not outcome.get("error") else "FAILED"
    done = state == "COMPLETED" and outcome is not None and not outcome.get("error")
    log_run(label, started, now(), "slurm", outcome.get("how", "computed") if done else state.lower(),
            job_id=job_id, visible=(outcome or {}).get("visible"), log=log)
    if done:
        return None
    if outcome and outcome.get("error"):
        return f"{outcome['error']} (Slurm job {job_id}, log: {log})"
    what = SAID.get(state.split("+")[0], f"ended {state}")
    return f"{label}: Slurm job {job_id} {what} (exit code {code or '?'}); log: {log}"
