"""What a build prints: doit's one line per task, each failure in one line, and a closing summary.

A heavy task's child prints its stage's own messages (counts, what it kept or dropped) to the terminal; library
noise (progress bars, warnings, loading messages) goes to its log, `artifacts/.logs/<task>.log`, only.
`TUNEBUILD_VERBOSE=1` shows everything as it comes. The summary ends every `doit` run that executed something:
how many tasks were computed, restored from the run cache, up to date, failed or not run because an input
failed, and the wall time.

This module is the build core's: it knows no stage.
"""
from __future__ import annotations

import json
import os
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


class Reporter(ConsoleReporter):
    desc = "tunebuild: one line per task, one line per failure, a summary at the end"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.started = time.time()
        self.executed: list[str] = []
        self.uptodate: list[str] = []
        self.failed: list[str] = []
        self.unmet: list[str] = []

    def execute_task(self, task):
        super().execute_task(task)
        if task.actions:
            self.executed.append(task.name)

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        if task.actions:
            self.uptodate.append(task.name)

    def add_failure(self, task, fail):
        if fail.get_name() == "UnmetDependency":  # one short line, not a block per downstream task
            self.unmet.append(task.name)
            return
        self.failed.append(task.name)
        super().add_failure(task, fail)

    def complete_run(self):
        super().complete_run()
        if not (self.executed or self.failed or self.unmet):
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
        done = [t for t in self.executed if t not in self.failed]
        restored = sum(states.get(t) == "restored" for t in done)
        parts = [f"{len(done) - restored} computed", f"{restored} restored from the run cache",
                 f"{len(self.uptodate)} up to date"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed ({', '.join(self.failed[:5])}"
                         f"{', ...' if len(self.failed) > 5 else ''})")
        if self.unmet:
            parts.append(f"{len(self.unmet)} not run because an input failed")
        self.write(f"tunebuild: {', '.join(parts)}; {clock(time.time() - self.started)} "
                   f"(`doit runs` for the timeline, artifacts/.logs/ for each heavy task's full log)\n")
