"""tunebuild's doit commands (registered as doit plugins in pyproject.toml):

- `doit why [TASK ...]`: every task that the selected tasks would run, transitively, each with its reasons —
  which config key changed (old → new value), which recipe file changed, which upstream output changed or is
  not built yet, which output is missing. Nothing is executed and doit's state is not written.
- `doit gc [--yes]`: what no current recipe reaches, and the space it frees (`pipeline.core.gc_command`).
- `doit runs [--all]`: the timeline of the last build (or of every build) from `artifacts/runs.jsonl`: where and
  when each stage task ran, on which GPUs or Slurm job, and how it ended.
- `doit info TASK` and `doit list` are doit's own, with two differences: a group task (`build:<recipe>`,
  `eval:<recipe>`: no actions, only the tasks it runs) is up to date when every task it runs is, instead of never
  ("The task has no dependencies"), and an unknown task is one line, not a traceback.

Every command here stops quietly when its reader goes away (`doit why | head -2`): exit 141 (128 + SIGPIPE, as
`git log | head -1`), no BrokenPipeError traceback. They only read the task list and doit's state; like dodo.py
they import nothing heavy.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from doit import cmd_info, cmd_list
from doit.cmd_base import DoitCmdBase, check_tasks_exist
from doit.dependency import DependencyStatus
from doit.exceptions import InvalidCommand

from pipeline.core.console import clock as _clock
from pipeline.core.executor import RUNS_LOG
from pipeline.core.graph import ARTIFACTS
from pipeline.core.store import config_diff
from pipeline.core.uptodate import config_changed

RUN, MAYBE = "will run", "may run"
SIGPIPE_EXIT = 141   # 128 + SIGPIPE: what a command killed by a closed pipe exits with


def quiet_pipe(execute):
    """A command's `execute` that, when its reader goes away (`| head -2`), stops with SIGPIPE_EXIT and prints
    nothing more: what is still buffered goes to /dev/null instead of raising again when Python exits."""
    @functools.wraps(execute)
    def run(self, params, args):
        try:
            rc = execute(self, params, args)
            self.outstream.flush()
            return rc
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return SIGPIPE_EXIT
    return run


def _selection(cmd, pos_args) -> tuple[dict, list[str]]:
    tasks = {t.name: t for t in cmd.task_list}
    selected = list(pos_args or cmd.sel_tasks or [n for n, t in tasks.items() if not t.subtask_of])
    try:
        check_tasks_exist(tasks, selected)
    except Exception as e:  # doit's own message names the unknown task
        raise InvalidCommand(str(e)) from None
    return tasks, selected


def _closure(tasks: dict, selected: list[str], producer: dict) -> list[str]:
    """The selected tasks and everything they depend on (task_dep, setup tasks and the tasks that produce their
    file_dep), upstream first."""
    order, seen = [], set()

    def visit(name: str):
        if name in seen:
            return
        seen.add(name)
        t = tasks[name]
        for dep in [*t.task_dep, *t.setup_tasks, *(producer[f] for f in sorted(t.file_dep) if f in producer)]:
            visit(dep)
        order.append(name)

    for name in selected:
        visit(name)
    return order


def _input_folders(task) -> list[str]:
    """The folders (not artifacts) a stage task reads as inputs: a local model folder, an eval suite folder."""
    def paths(value):
        if isinstance(value, dict):
            return [p for v in value.values() for p in paths(v)]
        if isinstance(value, (list, tuple)):
            return [p for v in value for p in paths(v)]
        return [value] if isinstance(value, str) else []

    found = []
    for action in task.actions:
        kw = getattr(action, "kwargs", None) or {}
        found += [p.rstrip("/") for p in paths(kw.get("inputs", {}))
                  if not p.startswith(str(ARTIFACTS) + "/") and os.path.isdir(p)]
    return sorted(set(found), key=len, reverse=True)


class List(cmd_list.List):
    """doit's `list`, quiet on a closed pipe."""
    execute = quiet_pipe(cmd_list.List.execute)


class Info(cmd_info.Info):
    """doit's `info`, where a group task is up to date when every task it runs (transitively) is."""
    execute = quiet_pipe(cmd_info.Info.execute)
    WOULD_RUN = "would_run"

    def _execute(self, pos_args, hide_status=False):
        if len(pos_args) == 1:  # else doit's own message
            tasks, _ = _selection(self, pos_args)
            task = tasks[pos_args[0]]
            if not task.actions:  # build:<recipe>, eval:<recipe>, build, ...
                own = self.dep_manager.get_status
                self.dep_manager.get_status = lambda t, ts, get_log=False: \
                    self._group_status(t, ts, own) if t is task else own(t, ts, get_log)
        return super()._execute(pos_args, hide_status)

    def _group_status(self, group, tasks, get_status) -> DependencyStatus:
        status = DependencyStatus(True)
        producer = {target: t.name for t in tasks.values() for target in t.targets}
        for name in _closure(tasks, [group.name], producer):
            if tasks[name].actions and get_status(tasks[name], tasks).status != "up-to-date":
                status.add_reason(self.WOULD_RUN, name)
        return status

    @staticmethod
    def get_reasons(reasons):
        stale = reasons.get(Info.WOULD_RUN)
        if not stale:
            return cmd_info.Info.get_reasons(reasons)
        return "\n".join([" * The tasks it runs that are not up to date (`doit why` says why):",
                          *(f"    - {name}" for name in stale)])


class Why(DoitCmdBase):
    name = "why"
    doc_purpose = "say which tasks would run and why, transitively, without running anything"
    doc_usage = "[TASK ...]"
    doc_description = ("For each task the selection would run: the config keys that changed (old → new), the "
                       "files that changed, the upstream outputs that changed or are not built, the missing "
                       "outputs. Tasks downstream of one that will run are listed as 'may run': if the upstream "
                       "output comes out byte-identical, they stay up to date (early cutoff).")
    cmd_options = ()
    execute = quiet_pipe(DoitCmdBase.execute)

    def _execute(self, pos_args=None):
        tasks, selected = _selection(self, pos_args)
        producer = {target: t.name for t in tasks.values() for target in t.targets}
        verdicts: dict[str, tuple[str, list[str]]] = {}
        for name in _closure(tasks, selected, producer):
            task = tasks[name]
            if not task.actions:  # a group task (build:<recipe>): it runs what it depends on
                continue
            reasons = self._reasons(task, tasks, producer, verdicts)
            upstream = sorted({producer[f] for f in task.file_dep if f in producer
                               and verdicts.get(producer[f], ("",))[0] in (RUN, MAYBE)})
            if reasons:
                verdicts[name] = (RUN, reasons)
            elif upstream:
                verdicts[name] = (MAYBE, [f"if the output of {u} changes" for u in upstream])
        try:
            self._print(tasks, verdicts)
        finally:
            self.dep_manager.close()
        return 0

    def _reasons(self, task, tasks, producer, verdicts) -> list[str]:
        status = self.dep_manager.get_status(task, tasks, get_log=True)
        if status.status == "up-to-date":
            return []
        r = status.reasons
        if r.get("missing_target") and not self.dep_manager.get_values(task.name) \
                and self.dep_manager._get(task.name, "deps:") is None:
            return [f"never built (no {', '.join(r['missing_target'])})"]
        out = []
        if r.get("has_no_dependencies"):
            out.append("always runs (no dependencies)")
        for utd, _args, _kwargs in r.get("uptodate_false", []):
            out.extend(self._uptodate_reason(task, utd))
        for target in r.get("missing_target", []):
            out.append(f"missing output {target}")
        for dep in r.get("added_file_dep", []):
            out.append(f"new input {dep}")
        for dep in r.get("removed_file_dep", []):
            out.append(f"input no longer used {dep}")
        if r.get("checker_changed"):
            out.append("the file checker changed: every input is rechecked")
        for dep in r.get("missing_file_dep", []):
            if dep in producer:
                out.append(f"input not built yet: {dep} (from {producer[dep]})")
            else:
                out.append(f"missing input file {dep}")
        folders = _input_folders(task)
        changed_in: dict[str, list[str]] = {}
        for dep in r.get("changed_file_dep", []):
            folder = next((f for f in folders if dep.startswith(f + "/")), None)
            if dep in producer:
                out.append(f"upstream output changed: {dep} (from {producer[dep]})")
            elif folder is not None:  # a local model folder, an eval suite: one line per folder
                changed_in.setdefault(folder, []).append(dep[len(folder) + 1:])
            else:
                out.append(f"file changed: {dep}")
        for folder, files in sorted(changed_in.items()):
            files = sorted(files)
            if len(files) == 1:
                out.append(f"file changed: {folder}/{files[0]}")
                continue
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            out.append(f"{len(files)} files changed in {folder}: {shown}")
        return out

    def _uptodate_reason(self, task, utd) -> list[str]:
        if isinstance(utd, config_changed):
            values = self.dep_manager.get_values(task.name)
            saved = values.get(config_changed.KEY)
            if saved is None:
                if "_config_changed" in values:
                    return ["config changed (the earlier config was recorded as a digest only)"]
                return ["never built with a recorded config"]
            old, new = json.loads(saved), dict(utd.current(saved))
            hub_old, hub_new = old.pop(config_changed.HUB, None) or {}, new.pop(config_changed.HUB, None) or {}
            out = []
            for name, entry in sorted(hub_new.items()):
                before = hub_old.get(name)
                if isinstance(before, dict) and before.get("model") == entry["model"] \
                        and before.get("commit") != entry["commit"]:
                    out.append(f"hub model {entry['model']} now resolves to commit {entry['commit']} (built from "
                               f"{before.get('commit') or 'an unknown commit'})")
                elif before != entry:
                    out.append(f"config {config_changed.HUB}.{name}: "
                               f"{json.dumps(before.get('model') if isinstance(before, dict) else before)} → "
                               f"{json.dumps(entry['model'])}")
            diff = config_diff(old, new)
            return out + [f"config {d}" for d in diff] or ["config changed"]
        if getattr(utd, "__name__", "") == "exists" and getattr(utd, "__self__", None) is not None:
            return [f"missing {utd.__self__}"]
        return [f"up-to-date check {getattr(utd, '__name__', utd)!s} is false"]

    def _print(self, tasks, verdicts) -> None:
        out = self.outstream
        run = [n for n, (v, _) in verdicts.items() if v == RUN]
        maybe = [n for n, (v, _) in verdicts.items() if v == MAYBE]
        if not verdicts:
            out.write("everything selected is up to date: nothing would run\n")
            return
        out.write(f"{len(run)} task(s) will run, {len(maybe)} may run (only if an upstream output changes):\n")
        width = max(len(n) for n in verdicts)
        for name, (verdict, reasons) in verdicts.items():
            out.write(f"{name:<{width}}  {verdict:<8}  {reasons[0]}\n")
            for reason in reasons[1:]:
                out.write(f"{'':<{width}}  {'':<8}  {reason}\n")


def read_runs(path: Path = RUNS_LOG) -> list[dict]:
    """The lines of runs.jsonl (a torn last line from a killed writer is skipped)."""
    runs = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and {"task", "start", "end", "state"} <= set(entry):
                runs.append(entry)
    return runs


def timeline(runs: list[dict], width: int = 40) -> list[str]:
    """One line per run, in start order: offset, duration, state, executor, devices / job, task, and a bar."""
    from datetime import datetime

    def t(s: str) -> float:
        return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()

    runs = sorted(runs, key=lambda r: (r["start"], r["task"]))
    t0, t1 = min(t(r["start"]) for r in runs), max(t(r["end"]) for r in runs)
    span = max(t1 - t0, 1e-9)
    busy = sum(t(r["end"]) - t(r["start"]) for r in runs)
    lines = [f"{len(runs)} task(s), {_clock(t1 - t0)} wall, {_clock(busy)} of task time "
             f"({busy / span:.2f} at once on average)",
             f"{'start':>7} {'time':>7}  {'state':<9} {'where':<8} {'devices / job':<14} task"]
    for r in runs:
        a, b = t(r["start"]) - t0, t(r["end"]) - t0
        lo, hi = int(a / span * width), max(int(a / span * width) + 1, int(round(b / span * width)))
        where = f"job {r['job_id']}" if r.get("job_id") else (",".join(r.get("devices") or []) or "-")
        bar = " " * lo + "#" * (hi - lo)
        lines.append(f"{'+' + _clock(a):>7} {_clock(b - a):>7}  {r['state']:<9} {r.get('executor', ''):<8} "
                     f"{where:<14} {r['task']:<40} |{bar:<{width}}|")
    return lines


class Runs(DoitCmdBase):
    name = "runs"
    doc_purpose = "show where and when the last build's stage tasks ran (artifacts/runs.jsonl)"
    doc_usage = "[--all]"
    doc_description = ("One line per executed stage task of the last build: start offset, duration, how it ended "
                       "(computed, restored, failed, cancelled, ...), where (doit, local, slurm), its GPU ids or "
                       "Slurm job id, and a bar on the build's timeline. A log, not an artifact.")
    cmd_options = ({"name": "all", "long": "all", "type": bool, "default": False,
                    "help": "every build in the log, not only the last"},)

    @quiet_pipe
    def execute(self, params, args):  # reads a log only: no task loading needed
        runs = read_runs()
        if not runs:
            self.outstream.write(f"no runs recorded yet ({RUNS_LOG})\n")
            return 0
        if not params["all"]:
            last = runs[-1].get("build")
            runs = [r for r in runs if r.get("build") == last]
        for line in timeline(runs):
            self.outstream.write(line + "\n")
        return 0
