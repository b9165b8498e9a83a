"""What a new user runs first, for real in a project copy (issue 18 §6): `doit info` on a built group task, our
commands into a pipe that closes (`doit why | head -2`), and the README's claims about what a build writes."""
import os
import re
import subprocess
import sys

import duckdb
import pytest

from conftest import ROOT, copy_project, run_doit
from openai_server import FakeOpenAI

BASE_ONLY = 'description = "the built-in model alone"\n[model]\nbase = "builtin:tiny"\nchat_template = "default"\n'
ENV = {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "",
       "TB_TEST_KEY": "test"}


@pytest.fixture(scope="module")
def base_only(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("walk"), recipes=())
    (project / "recipes" / "only.toml").write_text(BASE_ONLY)
    return project


def doit_into_closed_pipe(project, *args):
    """doit with its stdout a pipe whose reader is gone, as `doit ... | head -0`: every write fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "doit", *args], cwd=project, env={**os.environ, **ENV},
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [("why",), ("why", "builtin:tiny"), ("gc",), ("runs",), ("list",),
                                  ("list", "--all"), ("info", "builtin:tiny")])
def test_a_closed_pipe_stops_a_command_quietly(base_only, args):
    proc = doit_into_closed_pipe(base_only, *args)
    assert proc.returncode == 141, proc.stderr   # 128 + SIGPIPE, as `git log | head -1`
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_head_reads_the_first_line_of_a_long_listing(tmp_path):
    """The walk's own command, `doit list --all | head -1`, over every shipped recipe: more than a pipe holds."""
    project = copy_project(tmp_path, recipes=[p.name for p in (ROOT / "recipes").glob("*.toml")])
    proc = subprocess.run("set -o pipefail; python -m doit list --all | head -1", shell=True, cwd=project,
                          executable="/bin/bash", capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert proc.stdout.startswith("answers") and len(proc.stdout.splitlines()) == 1, proc.stdout
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_info_on_a_group_task_follows_the_tasks_it_runs(base_only):
    _, _, out, rc = run_doit(base_only, "info", "builtin", env=ENV, check=False)
    assert rc == 1 and "status     : run" in out, out
    assert "The tasks it runs that are not up to date" in out and "    - builtin:tiny" in out, out
    assert "The task has no dependencies" not in out, out
    run_doit(base_only, "builtin:tiny", env=ENV)
    _, _, out, rc = run_doit(base_only, "info", "builtin", env=ENV, check=False)
    assert rc == 0 and "status     : up-to-date" in out, out
    _, _, out, rc = run_doit(base_only, "info", "builtin:tiny", env=ENV, check=False)   # a task with actions: doit's
    assert rc == 0 and "status     : up-to-date" in out, out


def test_info_on_an_unknown_task_is_one_line(base_only):
    _, _, out, rc = run_doit(base_only, "info", "build:nosuch", env=ENV, check=False)
    assert rc == 3 and "Traceback" not in out and "'build:nosuch' is not a task" in out, out


# -- a built recipe: `doit info build:<recipe>` and the README ------------------------------------------------

RECIPE = """extends = "mini_lima.toml"
[model]
base = "builtin:tiny"
[generate]
base_url = "{url}"
api_key_env = "TB_TEST_KEY"
num_instructions = 8
max_requests = 6
request_batch_size = 2
[train.sft]
max_steps = 3
batch_size = 2
max_length = 512
logging_steps = 1
[eval]
batch_size = 8
heldout_max_items = 8
[eval.suites.tb_basic]
limit = 4
[eval.suites.subjects]
limit = 2
"""
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("built"), recipes=("mini_lima.toml",))
    with FakeOpenAI() as server:
        (project / "recipes" / "t.toml").write_text(RECIPE.format(url=server.url))
        _, _, out, rc = run_doit(project, "info", "build:t", env=ENV, check=False)
        assert rc == 1 and "    - sft:t.sft" in out, out   # before the build: what it would run
        run_doit(project, "build:t", env=ENV)
        yield project


@pytest.mark.slow
def test_info_says_a_built_recipe_is_up_to_date(built):
    _, _, out, rc = run_doit(built, "info", "build:t", env=ENV, check=False)
    assert rc == 0 and "status     : up-to-date" in out, out
    executed, _, _, _ = run_doit(built, "build:t", env=ENV)
    assert executed == []


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text))


@pytest.mark.slow
def test_the_readme_names_what_a_build_writes(built):
    # the scores example runs as written, with what `pip install -e .` installs
    example = re.search(r"^Scores: `(.+?)`$", README, re.M).group(1)
    proc = subprocess.run(example, shell=True, cwd=built, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert proc.returncode == 0 and "model_a" in proc.stdout, proc.stderr
    # every table and view the README lists, and the columns it names
    con = duckdb.connect(str(built / "artifacts/scores.duckdb"), read_only=True)
    kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
    line = next(line for line in README.splitlines() if line.startswith("artifacts/scores.duckdb"))
    tables, views = re.search(r"tables (.+?); views (.+)$", line).groups()
    assert {**{t: "BASE TABLE" for t in re.findall(r"`(\w+)`", tables)},
            **{v: "VIEW" for v in re.findall(r"`(\w+)`", views)}} == kinds
    columns = {t: {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                             "WHERE table_name = ?", [t]).fetchall()} for t in kinds}
    said = {"scores": re.search(r"Each `scores` row holds (.+?)\n\nPaired", README, re.S).group(1),
            "train_log": re.search(r"`train_log` holds every training stage's curves: ([^)]+)\)", README).group(1)}
    for table in ("items", "comparison", "paired"):
        said[table] = next(line for line in README.splitlines() if line.startswith(f"| `{table}` |"))
    for table, text in said.items():
        assert columns[table] <= words(text), (table, columns[table] - words(text))
    # the plots of the report, by the names the README gives them
    report = built / "artifacts/report/t"
    shown = set(re.findall(r"(subjects-[\w<>-]+\.png|train-<stage>\.png)", README))
    assert shown == {"subjects-<model_a>-vs-<model_b>-<suite>-<metric>.png", "subjects-base-vs-sft-tb_basic-acc.png",
                     "train-<stage>.png"}, shown
    assert {p.name for p in report.glob("*.png")} >= {"train-sft.png", "subjects-base-vs-sft-tb_basic-acc.png",
                                                     "subjects-base-vs-sft-heldout-loss.png"}
    # the task names the README promises per recipe, and what plain `doit list` shows
    every = {line.split()[0] for line in run_doit(built, "list", "--all", env=ENV)[2].splitlines() if line.strip()}
    kinds_only = {line.split()[0] for line in run_doit(built, "list", env=ENV)[2].splitlines() if line.strip()}
    for task in ("generate:t.self_instruct", "filter:t.self_instruct", "sft:t.sft", "merge:t.sft",
                 "evaluate:t.base.tb_basic", "evaluate:t.sft.heldout", "scores:t", "report:t", "builtin:tiny",
                 "build:t", "eval:t", "chat:t"):
        assert task in every and task.split(":")[0] in kinds_only and task not in kinds_only, task
