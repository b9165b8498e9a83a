"""TUNEBUILD_EXECUTOR=slurm against a real single-node Slurm (slurmctld + slurmd + munged on 127.0.0.1, started
and stopped here): heavy tasks become jobs, light ones stay local, the manifests equal a local build's, and a
training job cancelled halfway resumes from its checkpoints on the next build (issue 17)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster
from conftest import ROOT, copy_project, run_doit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not slurm_cluster.available():
        if os.environ.get("CI"):
            pytest.fail("slurm-wlm and munge are not installed (.ci/run installs them)")
        pytest.skip("slurm-wlm / munge not installed (apt-get install slurm-wlm munge)")
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def _env(cluster, **more):
    return {**cluster.env, "TUNEBUILD_EXECUTOR": "slurm", "TUNEBUILD_SLURM_GPUS": "0", "TUNEBUILD_SLURM_POLL": "0.5",
            **more}


def _manifests(project: Path) -> dict:
    art = project / "artifacts"
    return {str(p.relative_to(art)): p.read_bytes() for p in sorted(art.rglob("manifest.json"))
            if not any(part.startswith(".") for part in p.relative_to(art).parts)}


def test_demo_builds_as_slurm_jobs_like_a_local_build(cluster, tmp_path):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "local").mkdir()
    remote = copy_project(tmp_path / "slurm", recipes=("mini_lima.toml", "demo.toml"))
    local = copy_project(tmp_path / "local", recipes=("mini_lima.toml", "demo.toml"))
    run_doit(remote, "build:demo", env=_env(cluster))
    runs = [json.loads(line) for line in (remote / "artifacts" / "runs.jsonl").read_text().splitlines()]
    by_task = {r["task"]: r for r in runs}
    heavy = [t for t, r in by_task.items() if r["executor"] == "slurm"]
    assert {"builtin:tiny", "generate:demo.self_instruct", "sft:demo.sft", "merge:demo.sft",
            "evaluate:demo.sft.tb_basic"} <= set(heavy)
    assert all(by_task[t]["job_id"] and by_task[t]["state"] == "computed" for t in heavy)
    for light in ("filter:demo.self_instruct", "scores:demo", "report:demo"):
        assert by_task[light]["executor"] == "doit"
    finished = {j["Name"]: j["JobState"] for j in cluster.jobs()}
    for t in heavy:
        assert finished.get(f"tb:{t}") == "COMPLETED", (t, finished)
    run_doit(local, "build:demo")
    assert _manifests(remote) == _manifests(local)
    executed, _, _, _ = run_doit(remote, "build:demo", env=_env(cluster))
    assert executed == []


def _job_of(cluster, name: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], env={**os.environ, **cluster.env},
                         capture_output=True, text=True).stdout.split()
    return out[0] if out and out[1:2] == ["RUNNING"] else None


def test_a_cancelled_training_job_resumes_on_the_next_build(cluster, tmp_path):
    project = copy_project(tmp_path, recipes=("mini_lima.toml", "demo.toml"))
    recipe = project / "recipes" / "demo.toml"
    recipe.write_text(recipe.read_text().replace("max_steps = 150", "max_steps = 400\nsave_steps = 20"))
    run_doit(project, "filter:demo.self_instruct", "builtin:tiny", env=_env(cluster))
    proc = subprocess.Popen([sys.executable, "-m", "doit", "sft:demo.sft"], cwd=project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **_env(cluster)})
    scratch = project / "artifacts" / ".scratch" / "sft"
    job = None
    deadline = time.time() + 600
    while time.time() < deadline:
        job = job or _job_of(cluster, "tb:sft:demo.sft")
        if job and list(scratch.glob("*/checkpoint-*")):
            break
        time.sleep(0.5)
    assert job, "the training job never ran"
    time.sleep(2)  # let the checkpoint finish writing
    subprocess.run(["scancel", job], env={**os.environ, **cluster.env}, check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert re.search(rf"sft:demo\.sft: Slurm job {job} was cancelled \(scancel\) .*log: artifacts/\.logs/sft-demo\.sft\.log",
                     out), out[-3000:]
    assert "Traceback" not in out
    assert not (project / "artifacts/demo/sft/sft/manifest.json").exists()   # nothing that looks finished
    run_doit(project, "sft:demo.sft", env=_env(cluster))
    summary = json.loads((project / "artifacts/demo/sft/sft/train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 20
    states = [r["state"] for r in map(json.loads, (project / "artifacts/runs.jsonl").read_text().splitlines())
              if r["task"] == "sft:demo.sft"]
    assert states == ["cancelled", "computed"]
