"""An interrupted generation resumes from the LLM ledger: doit is SIGKILLed mid-generation, and the next run
reissues no request the ledger had recorded, and ends with the same output as an uninterrupted run."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from conftest import ROOT, copy_project, run_doit
from openai_server import FakeOpenAI

RECIPE = """extends = "mini_lima.toml"
[model]
base = "builtin:tiny"
[generate]
base_url = "{url}"
api_key_env = "TB_TEST_KEY"
num_instructions = 30
max_requests = 20
request_batch_size = 4
concurrency = 2
"""
ENV = {"TB_TEST_KEY": "test", "HF_HUB_OFFLINE": "1"}


def ledger_prompts(project):
    path = project / "artifacts/.ledger.sqlite"
    if not path.exists():
        return set()
    con = sqlite3.connect(str(path), timeout=30)
    try:
        return {(p, params) for p, params in con.execute("SELECT prompt, params FROM calls")}
    except sqlite3.OperationalError:  # the table is not created yet
        return set()
    finally:
        con.close()


def sent(server, start=0):
    return [(r["prompt"], json.dumps({"max_tokens": r["max_tokens"], "stop": r.get("stop"),
                                      "temperature": r["temperature"], "top_p": r["top_p"]}, sort_keys=True))
            for r in server.requests[start:]]


def test_killed_generation_resumes_without_repeating_requests(tmp_path):
    with FakeOpenAI(latency=0.15) as server:
        (tmp_path / "a").mkdir()
        a = copy_project(tmp_path / "a")
        (a / "recipes/t.toml").write_text(RECIPE.format(url=server.url))
        proc = subprocess.Popen([sys.executable, "-m", "doit", "generate:t.self_instruct"], cwd=a, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **ENV},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(ledger_prompts(a)) < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        recorded = ledger_prompts(a)
        assert len(recorded) >= 6 and not (a / "artifacts/t/generate/self_instruct/manifest.json").exists()
        before = len(server.requests)

        executed, _, out, _ = run_doit(a, "generate:t.self_instruct", env=ENV)
        assert "generate:t.self_instruct" in executed
        resent = sent(server, before)
        assert resent and not set(resent) & recorded, "a request the ledger had answered was sent again"
        assert f"{len(resent)} sent now" in out

        (tmp_path / "b").mkdir()
        b = copy_project(tmp_path / "b")
        (b / "recipes/t.toml").write_text(RECIPE.format(url=server.url))
        run_doit(b, "generate:t.self_instruct", env=ENV)
    assert (a / "artifacts/t/generate/self_instruct/instructions.jsonl").read_bytes() == \
        (b / "artifacts/t/generate/self_instruct/instructions.jsonl").read_bytes()
    report = json.loads((a / "artifacts/t/generate/self_instruct/report.json").read_text())
    assert report["usage"]["requests"] > 0 and report["usage"]["cost"] > 0


def test_ctrl_c_ends_the_build_in_one_line_and_the_rerun_goes_on(tmp_path):
    """Ctrl-C on a terminal (SIGINT to the whole foreground process group) mid-build: no traceback, one line,
    exit status 130, nothing unfinished looks finished; the same command again finishes the build."""
    with FakeOpenAI(latency=0.15) as server:
        a = copy_project(tmp_path)
        (a / "recipes/t.toml").write_text(RECIPE.format(url=server.url))
        proc = subprocess.Popen([sys.executable, "-m", "doit", "generate:t.self_instruct"], cwd=a,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT), **ENV},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while len(ledger_prompts(a)) < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the generation ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (proc.returncode, out, err)
        assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
        assert "tunebuild: interrupted (Ctrl-C)" in err
        assert not (a / "artifacts/t/generate/self_instruct/manifest.json").exists()
        recorded = len(ledger_prompts(a))
        assert recorded >= 4
        executed, _, out, _ = run_doit(a, "generate:t.self_instruct", env=ENV)
        assert "generate:t.self_instruct" in executed
        assert (a / "artifacts/t/generate/self_instruct/manifest.json").exists()
