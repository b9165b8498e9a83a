"""`doit gc [--yes]` (a doit plugin, registered in pyproject.toml): the artifact folders no current task writes,
the run-cache entries no current task would restore, the checkpoints no current task would resume, temporary
folders of interrupted runs, and the scores database's rows of recipes that no longer exist; with the space each
frees. Deletes only with `--yes`. Like the other commands (`pipeline.core.doit_commands`) it stops quietly on a
closed pipe and imports nothing heavy until it runs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from doit.cmd_base import DoitCmdBase

from pipeline.core.doit_commands import quiet_pipe
from pipeline.core.executor import LOGS, RUNS, RUNS_LOG
from pipeline.core.graph import ARTIFACTS, DB, LEDGER, MANIFEST
from pipeline.core.store import pid_alive
from pipeline.core.tasklist import TASKS_CACHE


def _size(paths: list[Path]) -> int:
    """Bytes freed by deleting `paths`: a hard-linked file counts only if every link to it goes."""
    links: dict[tuple[int, int], list] = {}
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        for f in files:
            st = f.stat()
            entry = links.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_size])
            entry[0] += 1
    return sum(size for seen, nlink, size in links.values() if seen >= nlink)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Gc(DoitCmdBase):
    name = "gc"
    doc_purpose = "list (or with --yes delete) artifacts and run-cache entries no current recipe reaches"
    doc_usage = "[--yes]"
    doc_description = ("Reached: the output folder of every task of every current recipe, and the run-cache "
                       "entry each stage task would restore now (its key from its config and its current "
                       "inputs). Everything else under artifacts/ except doit's state, the LLM ledger and the "
                       "scores database is garbage, and so are the scores database's rows of recipes that no "
                       "longer exist. A dry run unless --yes.")
    cmd_options = ({"name": "yes", "long": "yes", "type": bool, "default": False,
                    "help": "delete what is listed (default: only list it)"},)
    execute = quiet_pipe(DoitCmdBase.execute)

    def _execute(self, yes=False):
        from pipeline.core.runner import CACHE, SCRATCH, stage_key

        try:
            keep = {Path(t).parent.resolve() for task in self.task_list for t in task.targets
                    if Path(t).name == MANIFEST}
            keep_files = {p.resolve() for p in (DB, LEDGER, ARTIFACTS / ".doit.sqlite", TASKS_CACHE,
                                                ARTIFACTS / ".lock", RUNS_LOG)}
            reached_keys = set()
            for task in self.task_list:
                for action in task.actions:
                    kw = getattr(action, "kwargs", None) or {}
                    if "stage" not in kw or not kw.get("cache"):
                        continue
                    try:
                        key = stage_key(**kw)
                    except (FileNotFoundError, OSError):
                        continue  # an input is not built: this task reaches no cache entry now
                    reached_keys.add((kw["stage"], key))
            garbage: list[tuple[Path, str]] = []
            cache_root, scratch_root = CACHE.resolve(), SCRATCH.resolve()
            if ARTIFACTS.is_dir():
                self._walk(ARTIFACTS.resolve(), keep, keep_files,
                           (cache_root, scratch_root, LOGS.resolve(), RUNS.resolve()), garbage)
            if RUNS.is_dir():  # a heavy task's spec and result: garbage once the doit worker that wrote it is gone
                for entry in sorted(RUNS.resolve().iterdir()):
                    pid = entry.name.rsplit("-", 1)[-1]
                    if not (pid.isdigit() and pid_alive(int(pid))):
                        garbage.append((entry, "spec of a heavy task whose run ended"))
            if cache_root.is_dir():
                for stage_dir in sorted(p for p in cache_root.iterdir() if p.is_dir()):
                    for entry in sorted(stage_dir.iterdir()):
                        if entry.name.startswith("."):
                            garbage.append((entry, "temporary cache folder of an interrupted run"))
                        elif (stage_dir.name, entry.name) not in reached_keys:
                            garbage.append((entry, "run-cache entry no current task would restore"))
            if scratch_root.is_dir():
                for stage_dir in sorted(p for p in scratch_root.iterdir() if p.is_dir()):
                    for entry in sorted(stage_dir.iterdir()):
                        if (stage_dir.name, entry.name) not in reached_keys:
                            garbage.append((entry, "checkpoints of a run no current task would resume"))
            current = {t.name.split(":", 1)[1] for t in self.task_list if t.name.startswith("build:")}
            self._report(garbage, yes, self._stale_rows(current))
        finally:
            self.dep_manager.close()
        return 0

    @staticmethod
    def _stale_rows(current: set[str]) -> dict[str, dict[str, int]]:
        """recipe -> table -> rows, for the scores database's rows of recipes no current recipe is."""
        if not DB.is_file():
            return {}
        import duckdb

        from pipeline.core.store import file_lock

        out: dict[str, dict[str, int]] = {}
        with file_lock(DB):
            con = duckdb.connect(str(DB), read_only=True)
            try:
                tables = [r[0] for r in con.execute(
                    "SELECT c.table_name FROM information_schema.columns c JOIN information_schema.tables t USING "
                    "(table_schema, table_name) WHERE c.column_name = 'recipe' AND t.table_type = 'BASE TABLE' "
                    "ORDER BY c.table_name").fetchall()]
                for table in tables:
                    for recipe, n in con.execute(f'SELECT recipe, count(*) FROM "{table}" GROUP BY recipe '
                                                 f'ORDER BY recipe').fetchall():
                        if recipe not in current:
                            out.setdefault(recipe, {})[table] = n
            finally:
                con.close()
        return out

    def _report_rows(self, stale: dict[str, dict[str, int]], yes: bool) -> None:
        """List (with --yes delete, in one transaction) the scores database's rows of recipes that are gone."""
        if not stale:
            return
        out = self.outstream
        total = sum(n for tables in stale.values() for n in tables.values())
        for recipe, tables in sorted(stale.items()):
            out.write(f"{sum(tables.values()):>6} rows  {DB} rows of recipe {recipe!r} "
                      f"({', '.join(f'{t} {n}' for t, n in tables.items())}; no current recipe has that name)\n")
        if not yes:
            out.write(f"{total} row(s) of {len(stale)} deleted recipe(s) in {DB} would be deleted: run "
                      f"`doit gc --yes` to delete\n")
            return
        import duckdb

        from pipeline.core.store import file_lock

        with file_lock(DB):
            con = duckdb.connect(str(DB))
            try:
                con.execute("BEGIN TRANSACTION")
                for recipe, tables in sorted(stale.items()):
                    for table in tables:
                        con.execute(f'DELETE FROM "{table}" WHERE recipe = ?', [recipe])
                con.execute("COMMIT")
                con.execute("CHECKPOINT")
            finally:
                con.close()
        out.write(f"deleted {total} row(s) of {len(stale)} deleted recipe(s) from {DB}: "
                  f"{', '.join(sorted(stale))}\n")

    def _walk(self, folder: Path, keep, keep_files, roots, garbage) -> None:
        for p in sorted(folder.iterdir()):
            rp = p.resolve()
            if rp in roots or rp in keep:
                continue
            if p.is_file() or p.is_symlink():
                name = p.name
                if rp in keep_files or any(name.startswith(k.name) for k in keep_files) \
                        or name in (".gitignore", ".gitkeep"):  # -wal, -shm, .lock files; git's own
                    continue
                garbage.append((p, "file no current task writes"))
            elif ".tmp-" in p.name or ".old-" in p.name:
                garbage.append((p, "temporary folder of an interrupted run"))
            elif any(k.is_relative_to(rp) for k in keep):
                self._walk(p, keep, keep_files, roots, garbage)
            else:
                garbage.append((p, "no current recipe writes here"))

    def _report(self, garbage, yes: bool, stale: dict | None = None) -> None:
        out = self.outstream
        if not garbage and not stale:
            out.write("nothing to collect: every artifact, run-cache entry and scores row is reached by a current "
                      "recipe\n")
            return
        self._report_rows(stale or {}, yes)
        if not garbage:
            return
        total = _size([p for p, _ in garbage])
        root = Path.cwd()
        for p, why in garbage:
            shown = p.relative_to(root) if p.is_relative_to(root) else p
            out.write(f"{_human(_size([p])):>10}  {shown}  ({why})\n")
        if yes:
            for p, _ in garbage:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        os.remove(p)
                    except FileNotFoundError:
                        pass
            out.write(f"deleted {len(garbage)} item(s), {_human(total)} freed\n")
        else:
            out.write(f"{len(garbage)} item(s), {_human(total)} would be freed: run `doit gc --yes` to delete\n")
