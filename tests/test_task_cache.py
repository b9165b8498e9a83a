"""The task-list cache is data only: a planted file in artifacts/ never runs code (issue 19.1)."""
import json
import pickle
from pathlib import Path

import pytest

from conftest import copy_project, run_doit
from pipeline.core import task_cache
from pipeline.core.graph import Project
from pipeline.core.tasklist import TASKS_CACHE, _fingerprint


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path, recipes=("mini_lima.toml", "demo.toml"))


def _plant(project: Path, table) -> Path:
    """Write a cache file carrying the key this checkout computes now, so only its content can reject it."""
    key = _fingerprint(project.resolve())
    path = project / TASKS_CACHE
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"key": key, "table": table}, separators=(",", ":")))
    return path


def _evil_task(marker: Path, **changes) -> dict:
    task = {"name": "evil", "doc": "", "file_dep": [], "targets": ["artifacts/evil/manifest.json"],
            "actions": [{"$tuple": [{"$fn": "pipeline.core.runner:remove_output"}, ["artifacts/evil"]]}],
            "uptodate": [], "clean": [], "verbosity": 2}
    task.update(changes)
    return task


def test_a_planted_pickle_is_never_loaded(project):
    marker = project / "pwned"
    (project / "artifacts").mkdir(exist_ok=True)
    (project / "artifacts" / ".tasks.pickle").write_bytes(pickle.dumps(_Evil(str(marker))))
    _, _, out, rc = run_doit(project, "list")
    assert rc == 0 and "sft" in out
    assert not marker.exists()


def _cases(marker: Path):
    touch = f"touch {marker}"
    shell = {"$tuple": [{"$fn": "os:system"}, [touch]]}
    return {
        "shell-action": _evil_task(marker, actions=[touch]),
        "shell-uptodate": _evil_task(marker, uptodate=[touch]),
        "os.system": _evil_task(marker, actions=[shell]),
        "builtin-exec": _evil_task(marker, actions=[{"$tuple": [{"$fn": "builtins:exec"}, ["1"]]}]),
        "callable-in-kwargs": _evil_task(marker, actions=[{"$tuple": [
            {"$fn": "pipeline.core.runner:run_stage"}, [],
            {"module": "pipeline.stages.sft", "out": "artifacts/x", "inputs": {},
             "params": {"hook": {"$fn": "os.path:exists"}}}]}]),
        "run-stage-of-os": _evil_task(marker, actions=[{"$tuple": [
            {"$fn": "pipeline.core.runner:run_stage"}, [],
            {"module": "subprocess", "out": "artifacts/x", "inputs": {}}]}]),
        "clean-outside": _evil_task(marker, clean=[{"$tuple": [
            {"$fn": "pipeline.core.runner:remove_output"}, ["/tmp"]]}]),
        "target-outside": _evil_task(marker, targets=["../../etc/manifest.json"]),
        "not-a-stage": _evil_task(marker, actions=[{"$tuple": [{"$fn": "pipeline.stages.nope:run"}, [], {}]}]),
        "unknown-tag": _evil_task(marker, actions=[{"$pickle": "gASV"}]),
    }


@pytest.mark.parametrize("case", sorted(_cases(Path("m"))))
def test_a_planted_json_cache_is_ignored_and_rebuilt(project, case):
    marker = project / "pwned"
    path = _plant(project, [["evil", "planted", [_cases(marker)[case]]]])
    assert task_cache.load(path, _fingerprint(project.resolve())) is None
    _, _, out, rc = run_doit(project, "list")
    assert rc == 0 and "evil" not in out and "sft" in out
    assert "evil" not in path.read_text()  # rebuilt from the recipes
    _, _, out, rc = run_doit(project, "evil", check=False)
    assert rc != 0 and not marker.exists()


def test_the_cache_round_trips_what_the_graph_makes(project):
    table = Project(project.resolve()).task_table()
    path = project / TASKS_CACHE
    key = _fingerprint(project.resolve())
    assert task_cache.save(path, key, table)
    loaded = task_cache.load(path, key)
    assert loaded is not None
    assert [(b, d, [t["name"] for t in ts]) for b, d, ts in loaded] == \
        [(b, d, [t["name"] for t in ts]) for b, d, ts in table]
    # every callable comes back as the same function, every config check with the same config
    for (_, _, got), (_, _, want) in zip(loaded, table):
        for g, w in zip(got, want):
            assert [a[0] for a in g.get("actions") or []] == [a[0] for a in w.get("actions") or []]
            assert [getattr(u, "config", u) for u in g.get("uptodate", [])] == \
                [getattr(u, "config", u) for u in w.get("uptodate", [])]
    assert task_cache.load(path, "another-key") is None
