"""Two doit processes on one checkout: the second waits for the first (one line saying so), read-only commands
never wait, and no process removes the temporary folders of another that is still running."""
import fcntl
import os
import subprocess
import sys
import time

from conftest import ROOT, copy_project, run_doit
from pipeline.core.store import _remove_stale_temps


def test_a_second_build_waits_for_the_first_and_reads_do_not(tmp_path):
    project = copy_project(tmp_path, recipes=("alpaca_lora_demo.toml",))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    (project / "artifacts").mkdir()
    with open(project / "artifacts/.lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("doit build:other (pid 999999)")
        holder.flush()
        second = subprocess.Popen([sys.executable, "-m", "doit", "import:alpaca_lora_demo.alpaca"], cwd=project,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, _, out, rc = run_doit(project, "list")  # reads never wait
        assert rc == 0 and "import" in out
        time.sleep(3)
        assert second.poll() is None  # still waiting
        assert not (project / "artifacts/alpaca_lora_demo/data/alpaca/manifest.json").exists()
        fcntl.flock(holder, fcntl.LOCK_UN)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, out + err
    assert ("tunebuild: waiting for doit build:other (pid 999999) to finish: one build at a time in this checkout"
            in err), err
    assert err.count("tunebuild: waiting") == 1
    assert (project / "artifacts/alpaca_lora_demo/data/alpaca/manifest.json").exists()


def test_two_real_builds_at_once_both_succeed(tmp_path):
    project = copy_project(tmp_path, recipes=("alpaca_lora_demo.toml",))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "doit", "-n", "2", "import:alpaca_lora_demo.alpaca",
                               "builtin:tiny"], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert "database is locked" not in "".join(o + e for o, e in results)


def test_temporary_folders_of_a_live_process_are_kept(tmp_path):
    final = tmp_path / "sft"
    live = tmp_path / f".sft.tmp-{os.getppid()}"      # our parent: alive
    dead = tmp_path / ".sft.tmp-999999999"             # no such process
    live.mkdir()
    dead.mkdir()
    _remove_stale_temps(final)
    assert live.exists() and not dead.exists()
