"""Heavy stage tasks run in child processes holding exclusive GPU leases (fake ids from TUNEBUILD_GPUS on this
CPU machine); runs.jsonl records where and when each ran (issue 17)."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT, copy_project, run_doit
from pipeline.core import gpus
from pipeline.errors import TunebuildError

SLOTS_RECIPE = """
description = "four independent trainings asking for 1, 1, 2 and 2 GPUs"
[model]
base = "builtin:tiny"
chat_template = "templates/default.jinja"
[data.alpaca]
source = "data/alpaca_sample.json"
format = "alpaca"
[eval.suites.tb_basic]
include_path = "evals/tb_basic"
tasks = ["tb_capitals_mc"]
limit = 4
"""


def _train(name: str, n: int, seed: int) -> str:
    return textwrap.dedent(f"""
    [train.{name}]
    data = ["alpaca"]
    gpus = {n}
    max_steps = 20
    batch_size = 2
    max_length = 384
    logging_steps = 5
    seed = {seed}
    """)


def _t(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def _runs(project: Path) -> list[dict]:
    return [json.loads(line) for line in (project / "artifacts" / "runs.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_four_trainings_share_four_gpus(tmp_path):
    project = copy_project(tmp_path, recipes=())
    sizes = {"a": 1, "b": 1, "c": 2, "d": 2}
    (project / "recipes" / "slots.toml").write_text(
        SLOTS_RECIPE + "".join(_train(n, k, i) for i, (n, k) in enumerate(sizes.items())))
    env = {"TUNEBUILD_GPUS": "0,1,2,3", "TUNEBUILD_LOCK_DIR": str(tmp_path / "locks"), "OMP_NUM_THREADS": "1"}
    run_doit(project, "-n", "4", *[f"sft:slots.{n}" for n in sizes], env=env)
    runs = {r["task"]: r for r in _runs(project)}
    train = [runs[f"sft:slots.{n}"] for n in sizes]
    for r, n in zip(train, sizes.values()):
        assert r["state"] == "computed" and r["executor"] == "local"
        assert len(r["devices"]) == n and r["visible"] == ",".join(r["devices"])   # it saw exactly its ids
        assert set(r["devices"]) <= {"0", "1", "2", "3"}
    overlapping = 0
    for i, x in enumerate(train):
        for y in train[i + 1:]:
            if _t(x["start"]) < _t(y["end"]) and _t(y["start"]) < _t(x["end"]):
                overlapping += 1
                assert not set(x["devices"]) & set(y["devices"]), (x, y)
    assert overlapping >= 1, train
    # light tasks ran in the doit process; the built-in model (heavy, 0 GPUs) in a child without GPUs
    assert runs["import:slots.alpaca"]["executor"] == "doit"
    assert runs["builtin:tiny"]["executor"] == "local" and runs["builtin:tiny"]["visible"] == ""
    _, _, out, _ = run_doit(project, "runs")
    assert "sft:slots.c" in out and "at once on average" in out
    # where a task ran is not what it is: on other GPU ids the same task has the same key (restored from the run
    # cache, no child started) and the same bytes
    manifest = (project / "artifacts/slots/sft/a/manifest.json").read_bytes()
    shutil.rmtree(project / "artifacts/slots/sft/a")
    executed, _, _, _ = run_doit(project, "sft:slots.a", env={**env, "TUNEBUILD_GPUS": "4,5,6,7"})
    assert "sft:slots.a" in executed
    last = [r for r in _runs(project) if r["task"] == "sft:slots.a"][-1]
    assert last["state"] == "restored" and last["executor"] == "doit", last
    assert (project / "artifacts/slots/sft/a/manifest.json").read_bytes() == manifest


def _holder(lock_dir: Path, ids: str, n: int) -> subprocess.Popen:
    code = ("import sys, time; from pipeline.core import gpus; "
            f"lease = gpus.acquire({n}, 'holder'); print(','.join(lease.ids), flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TUNEBUILD_GPUS": ids,
                                 "TUNEBUILD_LOCK_DIR": str(lock_dir)})
    assert proc.stdout.readline().strip()
    return proc


def test_a_sigkilled_lease_holder_leaks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBUILD_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEBUILD_GPUS", "0,1")
    holder = _holder(tmp_path, "0,1", 2)          # another process holds both GPUs
    try:
        assert gpus._try(tmp_path, "0", 0) is None and gpus._try(tmp_path, "1", 0) is None
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        t = time.time()
        lease = gpus.acquire(2, "test", poll=0.05)  # released by the kernel with its descriptors
        assert sorted(lease.ids) == ["0", "1"] and time.time() - t < 5
        lease.release()
    finally:
        holder.kill()


def test_a_task_waits_for_a_free_gpu_rather_than_oversubscribe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNEBUILD_LOCK_DIR", str(tmp_path))
    holder = _holder(tmp_path, "0,1", 1)
    try:
        one = gpus.acquire(1, "first", available=["0", "1"])     # the other GPU is free
        assert len(one.ids) == 1
        start = time.time()
        import threading
        threading.Timer(1.0, holder.kill).start()
        two = gpus.acquire(1, "second", available=["0", "1"], poll=0.05)
        assert time.time() - start >= 0.9 and two.ids != one.ids
        assert "second: waiting for 1 free GPU(s) of 2" in capsys.readouterr().err
        one.release()
        two.release()
    finally:
        holder.kill()


def test_tasks_per_gpu_shares_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBUILD_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEBUILD_TASKS_PER_GPU", "2")
    a = gpus.acquire(1, "a", available=["0", "1"])
    b = gpus.acquire(1, "b", available=["0", "1"])
    c = gpus.acquire(1, "c", available=["0", "1"])
    assert {a.ids[0], b.ids[0]} == {"0", "1"}       # spread out before sharing
    assert c.ids[0] in ("0", "1")
    for lease in (a, b, c):
        lease.release()


def test_pool_and_requests(monkeypatch):
    monkeypatch.setenv("TUNEBUILD_GPUS", "0, 2,5")
    assert gpus.pool() == ["0", "2", "5"]
    monkeypatch.setenv("TUNEBUILD_GPUS", "none")
    assert gpus.pool() == [] and gpus.wanted(None, []) == 0
    monkeypatch.delenv("TUNEBUILD_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    assert gpus.pool() == ["3", "4"] and gpus.wanted(None, ["3", "4"]) == 1
    with pytest.raises(TunebuildError, match="needs 3 GPU"):
        gpus.acquire(3, "x", available=["3", "4"])
    monkeypatch.setenv("TUNEBUILD_TASKS_PER_GPU", "0")
    with pytest.raises(TunebuildError, match="TUNEBUILD_TASKS_PER_GPU=0"):
        gpus.tasks_per_gpu()


def test_a_heavy_task_that_asks_too_much_fails_in_one_line(tmp_path):
    project = copy_project(tmp_path, recipes=())
    (project / "recipes" / "slots.toml").write_text(SLOTS_RECIPE + _train("a", 2, 0))
    _, _, out, rc = run_doit(project, "sft:slots.a", check=False,
                             env={"TUNEBUILD_GPUS": "0", "TUNEBUILD_LOCK_DIR": str(tmp_path / "locks")})
    assert rc != 0
    assert "sft:slots.a: needs 2 GPU(s) but this machine shares 1 (TUNEBUILD_GPUS=0)" in out
    assert "Traceback" not in out


def test_library_noise_goes_to_the_log_and_a_summary_ends_the_build(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "l").mkdir()
    quiet = copy_project(tmp_path / "q", recipes=("alpaca_lora_demo.toml",))
    _, _, out, _ = run_doit(quiet, "builtin:tiny")
    log = (quiet / "artifacts" / ".logs" / "builtin-tiny.log").read_text()
    assert "Writing model shards" in log and "Writing model shards" not in out   # a progress bar: log only
    assert re.search(r"^tunebuild: 1 computed, 0 restored from the run cache, 0 up to date; ", out, re.M), out
    loud = copy_project(tmp_path / "l", recipes=("alpaca_lora_demo.toml",))
    _, _, out, _ = run_doit(loud, "builtin:tiny", env={"TUNEBUILD_VERBOSE": "1"})
    assert "Writing model shards" in out
    _, _, out, _ = run_doit(loud, "builtin:tiny")
    assert "-- builtin:tiny" in out and "tunebuild:" not in out   # nothing ran: no summary
