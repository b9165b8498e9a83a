"""What dodo.py hands doit: its settings (`DOIT_CONFIG`) and one task creator per stage basename, then `build` and
`eval`, made from the recipes by the graph (`pipeline.core.graph`) or read back from the task-list cache
(`pipeline.core.task_cache`). No heavy imports here.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.console import Reporter
from pipeline.core.graph import ARTIFACTS, Project
from pipeline.core.uptodate import DigestChecker

TASKS_CACHE = ARTIFACTS / ".tasks.json"   # data only: see pipeline.core.task_cache

DOIT_CONFIG = {
    "backend": "sqlite3",                 # unlike dbm, safe for several doit processes and `doit -n 2`
    "dep_file": str(ARTIFACTS / ".doit.sqlite"),
    "continue": True,                     # one recipe that cannot be built does not stop the others
    "default_tasks": ["build"],
    "reporter": Reporter,                 # one line per task and failure, then a summary (pipeline.core.console)
    "check_file_uptodate": DigestChecker,  # by content: a model folder's weights are hashed once per change
}


def _fingerprint(root: Path) -> str:
    """What the task list is made from: every file under recipes/ and of the pipeline package, and dodo.py, by
    path, size and modification time."""
    import hashlib
    import os

    entries = []
    for top in (root / "recipes", Path(__file__).parents[1], root / "dodo.py"):  # parents[1]: pipeline/
        if top.is_file():
            st = top.stat()
            entries.append((str(top), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            continue
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for f in sorted(files):
                st = os.stat(os.path.join(folder, f))
                entries.append((os.path.join(folder, f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return hashlib.sha256(repr(entries).encode()).hexdigest()


def creators(root: Path) -> dict:
    """`task_<basename>` functions for dodo.py's namespace: one per stage basename, then `build` and `eval`.

    Validating 50 recipes and walking them through the stages takes longer than doit's own no-op check, so the
    resulting task list is kept in `artifacts/.tasks.json`, keyed by `_fingerprint` (every recipe file, every
    pipeline source, dodo.py). Any edit there rebuilds it; an invalid recipe is never cached. The file is data
    only (`pipeline.core.task_cache`): a planted or corrupted one is ignored and rebuilt, never executed."""
    import os
    import sys
    import time

    from pipeline.core import task_cache
    from pipeline.core.store import hold_checkout

    root = Path(root)
    hold_checkout(root / ARTIFACTS, sys.argv[1:])
    os.environ.setdefault("TUNEBUILD_BUILD", f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}-{os.getpid()}")
    cache = root / TASKS_CACHE
    key = _fingerprint(root)
    table = task_cache.load(cache, key)
    if table is None:
        project = Project(root)
        table = project.task_table()
        for error in project.errors:  # bad recipe files: one line each, at the top; not cached, so said each time
            print(f"tunebuild: {error}", file=sys.stderr, flush=True)
        if not project.errors:
            cache.parent.mkdir(exist_ok=True)
            task_cache.save(cache, key, table)
    return {f"task_{base}": _creator(base, doc, tasks) for base, doc, tasks in table}


def _creator(basename: str, doc: str, tasks: list[dict]):
    def create():
        yield from tasks
    create.__doc__ = doc
    create.__name__ = f"task_{basename}"
    return create
