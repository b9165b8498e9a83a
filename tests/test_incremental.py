"""doit for real, in a temporary project: what runs after each kind of edit.

The tests share one project and run in file order; each starts from the state the previous one left (all built).
The test recipe `t` is mini_lima on the built-in tiny model with the generator served by a local
OpenAI-compatible server, sized to build in about a minute.
"""
import json
import re
import shutil
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from conftest import ROOT, copy_project, run_doit
from openai_server import FakeOpenAI

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
[merge]
dtype = "float32"
[eval]
batch_size = 8
heldout_max_items = 8
[eval.suites.tb_basic]
limit = 4
"""
JUDGE = """[eval.judge]
enabled = true
instructions = "evals/judge_instructions.jsonl"
prompt = "prompts/judge_pairwise.txt"
base_url = "{url}"
api_key_env = "TB_TEST_KEY"
judge_max_items = 4
answer_max_tokens = 12
"""
ENV = {"TB_TEST_KEY": "test", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": ""}
STAGES_T = {"generate:t.self_instruct", "filter:t.self_instruct", "sft:t.sft", "merge:t.sft", "evaluate:t.base.tb_basic", "evaluate:t.base.heldout",
            "evaluate:t.sft.tb_basic", "evaluate:t.sft.heldout", "scores:t", "report:t"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("project"), recipes=("mini_lima.toml",))
    with FakeOpenAI() as server:
        (root / "recipes" / "t.toml").write_text(RECIPE.format(url=server.url))
        yield root


def doit(project, *args, check=True):
    executed, uptodate, out, rc = run_doit(project, *args, env=ENV, check=check)
    return set(executed), out, rc


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_eval_builds_every_recipe_and_names_what_mini_lima_lacks(project):
    executed, out, rc = doit(project, "eval", check=False)
    # mini_lima cannot be built offline: said in one line (whichever of its tasks finds it first), and that is
    # no failure of `doit eval` over every recipe ...
    assert rc == 0, out
    lacks = [line for line in out.splitlines() if "mini_lima" in line and "cannot run here: " in line]
    assert len(lacks) == 1 and ("environment variable OPENAI_API_KEY is not set" in lacks[0]
                                or "model 'Qwen/Qwen1.5-0.5B' is not" in lacks[0]), out
    assert "Traceback" not in out and "TaskFailed" not in out, out
    assert STAGES_T <= executed, out  # ... and the other recipe still completes
    table = out[out.index("recipe "):].splitlines()
    assert re.match(r"mini_lima +cannot run here +(environment variable OPENAI_API_KEY|model 'Qwen)", table[1]), out
    assert re.match(r"t +built +base → sft: ", table[2]), out
    # an up-to-date report prints the same headline, its comparisons and the report's path
    _, again, rc = doit(project, "report:t")
    assert re.search(r"^t: base → sft: .*\n(  .*\n)+report: artifacts/report/t/comparison\.md$", again, re.M), again
    headline = (project / "artifacts/report/t/summary.txt").read_text().splitlines()[0]
    assert headline == "t: " + table[2].split(None, 2)[2] and headline in again
    assert (project / "artifacts/report/t/comparison.md").exists()
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    rows = con.execute("SELECT model, suite, task, metric, value, n, model_digest, dataset_digest, "
                       "eval_config_digest, packages FROM scores WHERE recipe = 't'").fetchall()
    assert {(r[0], r[1]) for r in rows} == {(m, s) for m in ("base", "sft")
                                            for s in ("tb_basic", "heldout", "subjects")}
    assert {"tb_capitals_mc", "tb_arithmetic_gen", "heldout", "tb_subj_zh_math"} <= {r[2] for r in rows}
    assert all(r[6] and r[8] for r in rows)
    assert all(r[7] for r in rows if r[0] == "sft") and all(r[7] is None for r in rows if r[0] == "base")
    assert json.loads(rows[0][9])["transformers"]
    loss = dict(con.execute("SELECT model, value FROM scores WHERE recipe='t' AND metric='loss'").fetchall())
    assert loss["sft"] != loss["base"]
    cmp_rows = con.execute("SELECT count(*) FROM comparison WHERE recipe = 't' AND suite <> 'subjects'").fetchone()
    assert cmp_rows[0] == 5
    # per-document pairing, per-subject and per-category statistics, micro and macro labelled
    subj = con.execute("SELECT name, n, delta, ci_low, ci_high, p_value, p_holm FROM subject_deltas "
                       "WHERE recipe = 't' AND suite = 'subjects' AND metric = 'acc'").fetchall()
    assert len(subj) == 6 and all(r[1] == 6 and r[3] <= r[2] <= r[4] and r[6] >= r[5] for r in subj)
    cats = con.execute("SELECT name, average, subjects, n FROM category_deltas WHERE recipe = 't' "
                       "AND suite = 'subjects' AND metric = 'acc' ORDER BY name, average").fetchall()
    assert ("STEM", "macro", 3, 18) in cats and ("all", "micro", 6, 36) in cats and ("Hard", "micro", 1, 6) in cats
    n_items = con.execute("SELECT count(*) FROM items WHERE recipe = 't' AND suite = 'subjects' AND model = 'base' "
                          "AND metric = 'acc'").fetchone()[0]
    assert n_items == 36
    report = (project / "artifacts/report/t/comparison.md").read_text()
    assert "average before" in report and "| micro (documents) |" in report and "| macro (subjects) |" in report
    from PIL import Image
    with Image.open(project / "artifacts/report/t/subjects-base-vs-sft-subjects-acc.png") as img:
        img.verify()
    gen = json.loads((project / "artifacts/t/generate/self_instruct/report.json").read_text())
    assert gen["machine_instructions"] == 8 and gen["usage"]["requests"] > 0


def test_second_build_executes_nothing(project):
    executed, out, _ = doit(project, "build:t")
    assert executed == set(), out


def test_eval_prompt_edit_reruns_only_evaluation_and_scores(project):
    edit(project / "recipes/evals/tb_basic/tb_capitals_mc.yaml", 'doc_to_text: "Question:', 'doc_to_text: "Q:')
    executed, out, _ = doit(project, "build:t")
    assert executed == {"evaluate:t.base.tb_basic", "evaluate:t.sft.tb_basic", "scores:t", "report:t"}, out


def test_eval_setting_edit_reruns_only_evaluation_and_scores(project):
    edit(project / "recipes/t.toml", "limit = 4", "limit = 3")
    executed, out, _ = doit(project, "build:t")
    assert executed == {"evaluate:t.base.tb_basic", "evaluate:t.sft.tb_basic", "scores:t", "report:t"}, out


def test_chat_template_edit_retrains_but_does_not_regenerate(project):
    edit(project / "recipes/templates/qwen.jinja", "You are a helpful assistant.", "You are a careful assistant.")
    executed, out, _ = doit(project, "build:t")
    assert {"sft:t.sft", "merge:t.sft", "evaluate:t.sft.tb_basic", "evaluate:t.sft.heldout",
            "evaluate:t.base.heldout", "scores:t", "report:t"} <= executed, out
    assert not executed & {"generate:t.self_instruct", "filter:t.self_instruct", "evaluate:t.base.tb_basic"}, out


def test_generation_prompt_edit_reruns_generation_and_downstream(project):
    prompt = project / "recipes/prompts/self_instruct.txt"
    before = prompt.read_text()
    edit(prompt, "Come up with a series of tasks:\n", "Come up with a series of tasks:\n\n")
    executed, out, _ = doit(project, "build:t")
    assert {"generate:t.self_instruct", "filter:t.self_instruct", "sft:t.sft", "merge:t.sft", "evaluate:t.sft.tb_basic"} <= executed, out
    # reverting the prompt restores every stage from the run cache instead of recomputing
    prompt.write_text(before)
    executed, out, _ = doit(project, "build:t")
    assert "generate:t.self_instruct" in executed and "generate:t.self_instruct: restored from the run cache" in out, out
    assert "sft:t.sft: restored from the run cache" in out


def _tmp_folders(project, stage):
    return list((project / "artifacts/t" / stage).glob(f".{stage}.tmp-*"))


def test_killed_stage_leaves_no_manifest_and_next_run_redoes_it(project):
    template = project / "recipes/templates/qwen.jinja"
    edit(template, "You are a careful assistant.", "You are a patient assistant.")
    manifest = project / "artifacts/t/sft/sft/manifest.json"
    old = manifest.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "doit", "build:t"], cwd=project, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not _tmp_folders(project, "sft") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert _tmp_folders(project, "sft"), "sft never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(not (t / "manifest.json").exists() for t in _tmp_folders(project, "sft"))
    assert manifest.read_bytes() == old  # the previous finished output is untouched
    executed, out, _ = doit(project, "build:t")
    assert "sft:t.sft" in executed and manifest.read_bytes() != old, out
    assert not _tmp_folders(project, "sft")


def test_failing_stage_reports_one_line_and_keeps_what_was_built(project):
    template = project / "recipes/templates/qwen.jinja"
    good = template.read_text()
    manifest = project / "artifacts/t/sft/sft/manifest.json"
    old = manifest.read_bytes()
    template.write_text("{{ raise_exception('templates need a system turn') }}" + good)
    executed, out, rc = doit(project, "build:t", check=False)
    assert rc != 0 and "sft:t.sft" in executed and "merge:t.sft" not in executed
    assert "sft:t.sft: " in out and "the chat template fails on training conversation 1: templates need a system turn" in out
    assert manifest.read_bytes() == old and not _tmp_folders(project, "sft")
    template.write_text(good)
    executed, out, _ = doit(project, "build:t")
    assert "sft:t.sft" in executed, out


def test_early_cutoff_identical_filter_output_stops_the_rebuild(project):
    # no instruction comes near 150 words: the filter reruns, writes byte-identical output, nothing downstream runs
    recipe = project / "recipes/t.toml"
    recipe.write_text(recipe.read_text() + "[filter]\nmax_words = 149\n")
    before = (project / "artifacts/t/data/self_instruct/manifest.json").read_bytes()
    executed, out, _ = doit(project, "build:t")
    assert executed == {"filter:t.self_instruct"}, out
    assert (project / "artifacts/t/data/self_instruct/manifest.json").read_bytes() == before


def test_why_names_changed_keys_transitively_and_runs_nothing(project):
    edit(project / "recipes/t.toml", "max_requests = 6", "max_requests = 6\ntemperature = 0.9")
    state = (project / "artifacts/.doit.sqlite").read_bytes()
    _, _, out, _ = run_doit(project, "why", "build:t", env=ENV)
    lines = out.splitlines()
    gen = next(line for line in lines if line.startswith("generate:t.self_instruct "))
    assert "will run" in gen and "config temperature: 0.7 → 0.9" in gen, out
    assert any(line.startswith("filter:t.self_instruct ") and "may run" in line and "generate:t.self_instruct" in line for line in lines), out
    assert any(line.startswith("report:t ") and "may run" in line for line in lines), out
    assert not any(line.startswith(("sft:t.sft ", "merge:t.sft ")) and "will run" in line for line in lines), out
    assert (project / "artifacts/.doit.sqlite").read_bytes() == state  # nothing ran, nothing was recorded
    edit(project / "recipes/t.toml", "max_requests = 6\ntemperature = 0.9", "max_requests = 6")
    _, _, out, _ = run_doit(project, "why", "build:t", env=ENV)
    assert "nothing would run" in out, out
    # a changed recipe file and a missing output are named too
    eval_yaml = project / "recipes/evals/tb_basic/tb_arithmetic_gen.yaml"
    eval_yaml.write_text(eval_yaml.read_text() + "\n")
    (project / "artifacts/report/t/manifest.json").unlink()
    _, _, out, _ = run_doit(project, "why", "build:t", env=ENV)
    assert "file changed: recipes/evals/tb_basic/tb_arithmetic_gen.yaml" in out, out
    assert "missing output artifacts/report/t/manifest.json" in out, out
    doit(project, "build:t")


def test_second_recipe_sharing_upstream_restores_instead_of_computing(project):
    # t2 = t with another eval limit, and two extra models to compare with: t's tuned model and the base model
    url = re.search(r'base_url = "(.*?)"', (project / "recipes/t.toml").read_text()).group(1)
    (project / "recipes/t2.toml").write_text('extends = "t.toml"\n[eval.suites.tb_basic]\nlimit = 2\n'
                                             '[eval.models.t_tuned]\nmodel = "recipe:t"\n'
                                             '[eval.models.tiny]\nmodel = "builtin:tiny"\n' + JUDGE.format(url=url))
    executed, out, _ = doit(project, "build:t2")
    for stage in ("generate", "filter", "sft", "merge", "evaluate"):
        label = {"evaluate": "evaluate:t2.sft.heldout", "generate": "generate:t2.self_instruct",
                 "filter": "filter:t2.self_instruct"}.get(stage, f"{stage}:t2.sft")
        assert f"{label}: restored from the run cache" in out, out
    assert "evaluate:t2.sft.tb_basic: restored" not in out  # its own setting differs: computed
    # an extra model is evaluated once per (model content, suite config), whichever recipe asked first
    assert "evaluate:t2.t_tuned.subjects: restored from the run cache" in out, out
    assert "evaluate:t2.tiny.subjects: restored from the run cache" in out, out
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    pairs = con.execute("SELECT model_a, model_b, max(abs(delta)) FROM paired WHERE recipe = 't2' AND "
                        "suite = 'subjects' GROUP BY ALL").fetchall()
    assert {(a, b) for a, b, _ in pairs} == {("base", "sft"), ("sft", "t_tuned"), ("sft", "tiny")}
    assert dict(((a, b), d) for a, b, d in pairs)[("sft", "t_tuned")] == 0.0  # the same weights
    con.close()
    report = (project / "artifacts/report/t2/comparison.md").read_text()
    assert "sft → t_tuned" in report
    # the LLM judge: answers of both models, verdicts in both orders, rates in the scores and the report
    assert {"answers:t2.base", "answers:t2.sft", "judge:t2"} <= executed, out
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    judged = dict(con.execute("SELECT metric, value FROM scores WHERE recipe = 't2' AND suite = 'judge'").fetchall())
    con.close()
    assert judged["win_rate"] + judged["tie_rate"] + judged["loss_rate"] == pytest.approx(1.0)
    assert 0 <= judged["lc_win_rate"] <= 1 and "position_bias_rate" in judged
    assert "## LLM judge (pairwise, 4 instructions)" in report and (project / "artifacts/report/t2/judge.png").exists()


def test_parallel_build_of_two_recipes_is_safe(project):
    edit(project / "recipes/t.toml", "limit = 3", "limit = 2")  # t and t2 now both evaluate with limit 2
    edit(project / "recipes/evals/tb_basic/tb_capitals_mc.yaml", 'doc_to_text: "Q:', 'doc_to_text: "Question:')
    executed, out, rc = doit(project, "-n", "2", "build:t", "build:t2")
    assert {"scores:t", "scores:t2", "evaluate:t.sft.tb_basic", "evaluate:t2.sft.tb_basic"} <= executed, out
    assert "locked" not in out.lower() and "Traceback" not in out, out
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    assert {r[0] for r in con.execute("SELECT DISTINCT recipe FROM scores").fetchall()} >= {"t", "t2"}
    executed, out, _ = doit(project, "build:t", "build:t2")
    assert executed == set(), out


def test_gc_lists_then_deletes_only_what_no_recipe_reaches(project):
    stale = project / "artifacts/gone_recipe/sft"
    stale.mkdir(parents=True)
    (stale / "adapter.bin").write_bytes(b"x" * 5000)
    (project / "recipes/t2.toml").unlink()
    _, _, out, _ = run_doit(project, "gc", env=ENV)
    assert "artifacts/gone_recipe  (no current recipe writes here)" in out, out
    assert "artifacts/t2  (no current recipe writes here)" in out, out
    assert "run-cache entry no current task would restore" in out  # e.g. the earlier prompt's generation
    assert "would be freed" in out and stale.exists()
    _, _, out, _ = run_doit(project, "gc", "--yes", env=ENV)
    assert "deleted" in out and not stale.exists() and not (project / "artifacts/t2").exists()
    _, _, out, _ = run_doit(project, "gc", env=ENV)
    assert "nothing to collect" in out, out
    executed, out, _ = doit(project, "build:t")
    assert executed == set(), out


def test_restored_into_a_fresh_clone_at_another_path_nothing_runs(project, tmp_path):
    # what CI does: a new checkout (new path, new file times) plus artifacts/ restored from its cache
    clone = tmp_path / "elsewhere" / "clone"
    shutil.copytree(project, clone, copy_function=shutil.copy)  # copy contents, not times
    later = time.time() + 3600
    for p in clone.rglob("*"):
        if p.is_file():
            os.utime(p, (later, later))
    executed, out, _ = doit(clone, "build:t")
    assert executed == set(), out
