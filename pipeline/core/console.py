"""What a build prints: doit's one line per task, each failure in one line, and a closing summary.

A heavy task's child prints its stage's own messages (counts, what it kept or dropped) to the terminal; library
noise (progress bars, warnings, loading messages) goes to its log, `artifacts/.logs/<task>.log`, only.
`TUNEBUILD_VERBOSE=1` shows everything as it comes. The summary ends every `doit` run that executed something:
how many tasks were computed, restored from the run cache, up to date, failed or not run because an input
failed, and the wall time; then, per recipe the run touched, what it came to: for one recipe its summary (the
headline comparisons and the report's path, from the file a task names as its `summary`), for several a table
(recipe, state, headline). An up-to-date `doit report:<r>` prints the same summary.

A task that fails for what this machine lacks (`CannotRunHere`: no model in the cache and no hub, no API key)
prints one line for its recipe, whose other such failures are only counted; its state is `cannot run here`.
`doit` over every recipe (`doit`, `doit build`, `doit eval`) exits 0 when nothing else failed (`Run`).

This module is the build core's: it knows no stage.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from doit.reporter import ConsoleReporter

RUNS_LOG = Path("artifacts") / "runs.jsonl"


def verbose() -> bool:
    return os.environ.get("TUNEBUILD_VERBOSE", "").strip() not in ("", "0")


def clock(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


LAST: dict = {}   # what the last run's reporter saw, for `Run` (the exit code)


def _recipe(task) -> str | None:
    return (getattr(task, "meta", None) or {}).get("recipe")


class Reporter(ConsoleReporter):
    desc = "tunebuild: one line per task, one line per failure, a summary at the end"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.started = time.time()
        self.executed: list[str] = []
        self.uptodate: list[str] = []
        self.failed: list[str] = []
        self.unmet: list[str] = []
        self.cannot: list[str] = []
        self.lacking: set[str] = set()       # tasks that cannot run here, or wait on one that cannot
        self.recipes: dict[str, dict] = {}   # recipe -> {"executed", "uptodate", "failed", "unmet": n, "why": ...}
        self.summaries: dict[str, str] = {}  # recipe -> its summary file
        LAST.clear()
        LAST.update(failed=self.failed, cannot=self.cannot)

    def _count(self, task, what: str):
        recipe = _recipe(task)
        if recipe is None:
            return None
        entry = self.recipes.setdefault(recipe, {"executed": 0, "uptodate": 0, "failed": 0, "unmet": 0,
                                                  "unmet_lacking": 0, "cannot": 0, "why": None})
        entry[what] += 1
        summary = (task.meta or {}).get("summary")
        if summary and what in ("executed", "uptodate"):
            self.summaries[recipe] = summary
        return entry

    def execute_task(self, task):
        super().execute_task(task)
        if task.actions:
            self.executed.append(task.name)
            self._count(task, "executed")

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        if task.actions:
            self.uptodate.append(task.name)
            self._count(task, "uptodate")

    def add_failure(self, task, fail):
        if fail.get_name() == "UnmetDependency":  # one short line, not a block per downstream task
            self.unmet.append(task.name)
            entry = self._count(task, "unmet")
            # doit names the inputs that did not run; when each of them could not run here (or waited on one
            # that could not), neither can this task
            if all(name in self.lacking for name in fail.message.split()):
                self.lacking.add(task.name)
                if entry is not None:
                    entry["unmet_lacking"] += 1
            return
        if fail.get_name() == "CannotRunHere":  # one line per recipe: the first thing it lacks
            self.cannot.append(task.name)
            self.lacking.add(task.name)
            entry = self._count(task, "cannot")
            message = fail.message.strip()
            if entry is None or entry["why"] is None:
                self.write(f"{message}\n")
            if entry is not None and entry["why"] is None:
                entry["why"] = message.split("cannot run here: ", 1)[-1]
            return
        self.failed.append(task.name)
        entry = self._count(task, "failed")
        if entry is not None and not entry.get("error"):
            entry["error"] = (fail.get_msg().strip().splitlines() or [""])[0]
        super().add_failure(task, fail)

    def complete_run(self):
        super().complete_run()
        if not (self.executed or self.failed or self.unmet or self.cannot or self.summaries):
            return
        build = os.environ.get("TUNEBUILD_BUILD")
        states: dict[str, str] = {}
        if build and RUNS_LOG.is_file():
            for line in RUNS_LOG.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("build") == build:
                    states[entry.get("task")] = entry.get("state")
        done = [t for t in self.executed if t not in self.failed and t not in self.cannot]
        restored = sum(states.get(t) == "restored" for t in done)
        parts = [f"{len(done) - restored} computed", f"{restored} restored from the run cache",
                 f"{len(self.uptodate)} up to date"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed ({', '.join(self.failed[:5])}"
                         f"{', ...' if len(self.failed) > 5 else ''})")
        if self.cannot:
            parts.append(f"{len(self.cannot)} cannot run here")
        if self.unmet:
            parts.append(f"{len(self.unmet)} not run because an input failed")
        self.write(f"tunebuild: {', '.join(parts)}; {clock(time.time() - self.started)} "
                   f"(`doit runs` for the timeline, artifacts/.logs/ for each heavy task's full log)\n")
        self.write(self.closing())

    def closing(self) -> str:
        """One recipe: its summary lines. Several: a table of recipe, state, headline."""
        def lines(recipe: str) -> list[str]:
            path = self.summaries.get(recipe)
            try:
                return Path(path).read_text(encoding="utf-8").splitlines() if path else []
            except OSError:
                return []

        def state(e: dict) -> str:
            if e["failed"]:
                return "failed"
            if e["cannot"]:
                return "cannot run here"
            if e["unmet"]:
                return "cannot run here" if e["unmet_lacking"] == e["unmet"] else "not run: an input failed"
            return "built" if e["executed"] else "up to date"

        touched = sorted(self.recipes)
        if len(touched) == 1:
            (recipe,) = touched
            found = lines(recipe)
            e = self.recipes[recipe]
            return "\n".join(found) + "\n" if found and state(e) in ("built", "up to date") else ""
        if not touched:
            return ""
        rows = []
        for recipe in touched:
            e = self.recipes[recipe]
            found = lines(recipe) if state(e) in ("built", "up to date") else []
            headline = found[0].split(": ", 1)[-1] if found else e.get("error") if e["failed"] \
                else (e["why"] or "") if e["cannot"] else "an input cannot run here" if state(e) == "cannot run here" \
                else ""
            rows.append((recipe, state(e), headline))
        width = max(len(r[0]) for r in rows)
        swidth = max(len(r[1]) for r in rows)
        out = [f"{'recipe'.ljust(width)}  {'state'.ljust(swidth)}  headline"]
        out += [f"{r.ljust(width)}  {s.ljust(swidth)}  {h}".rstrip() for r, s, h in rows]
        return "\n".join(out) + "\n"


INTERRUPTED = 130   # the exit status after Ctrl-C: 128 + SIGINT, as a shell reports an interrupted command
INTERRUPTED_LINE = ("tunebuild: interrupted (Ctrl-C): every finished task is kept, the one running left nothing that "
                    "looks finished; run the same command again to go on (a training with save_steps resumes from "
                    "its last checkpoint)\n")


def _run_command():
    """doit's `run` command, with the exit code of a build over every recipe: 0 when the only failures are
    tasks this machine cannot run (each said in one line, and `cannot run here` in the closing table); and
    Ctrl-C ends it with one line and exit status 130, not a traceback."""
    from doit.cmd_run import Run as DoitRun

    class Run(DoitRun):
        # doit passes the options by the names of this signature: keep it the same as doit's
        def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console",
                     num_process=0, par_type="process", single=False, auto_delayed_regex=False,
                     force_verbosity=False, failure_verbosity=0, pdb=False):
            try:
                code = super()._execute(outfile, verbosity, always, continue_, reporter, num_process, par_type,
                                        single, auto_delayed_regex, force_verbosity, failure_verbosity, pdb)
            except KeyboardInterrupt:  # doit saved its state and printed the summary on the way out
                sys.stderr.write(INTERRUPTED_LINE)
                sys.stderr.flush()
                return INTERRUPTED
            everything = not self.sel_tasks or all(t in ("build", "eval") for t in self.sel_tasks)
            if code and everything and LAST.get("cannot") and not LAST.get("failed"):
                return 0
            return code

    return Run


Run = _run_command()
