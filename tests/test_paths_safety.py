"""The build reads nothing from outside recipes/: `extends`, and the paths a local lm-eval suite's YAML names
(`include`, `dataset_kwargs.data_files` in every form, `data_dir`, a local `dataset_path`), are refused with one
line when they leave it. A failed import's report is kept where the error says it is."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, copy_project, run_doit
from pipeline.core.recipe.load import load_recipe
from pipeline.core.recipe.schema import RecipeError
from pipeline.errors import TunebuildError
from pipeline.stages import evaluate, import_data
from test_recipe import BASE, write


def doit_list(project):
    proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=project, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return proc.returncode, proc.stdout + proc.stderr


# -- extends ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_extends_outside_recipes_is_refused(tmp_path, how):
    recipes = tmp_path / "project" / "recipes"
    recipes.mkdir(parents=True)
    outside = tmp_path / "x"
    outside.mkdir()
    write(outside, "parent.toml", BASE)  # a valid recipe: today its values would enter the build
    parent = str(outside / "parent.toml") if how == "absolute" else "../../x/parent.toml"
    child = write(recipes, "child.toml", f'extends = "{parent}"\n[filter]\nrouge_threshold = 0.5\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(child, recipes)
    msg = str(e.value)
    assert f"{child}: extends: '{parent}' is outside {recipes}" in msg and "\n" not in msg, msg


def test_extends_inside_recipes_still_works_from_a_subfolder(tmp_path):
    write(tmp_path, "a.toml", BASE)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.toml").write_text('extends = "../a.toml"\n[filter]\nrouge_threshold = 0.6\n')
    child = write(tmp_path, "c.toml", 'extends = "base/b.toml"\n[filter]\nmin_words = 2\n')
    r = load_recipe(child, tmp_path)
    assert r.config["filter"]["rouge_threshold"] == 0.6 and r.config["filter"]["min_words"] == 2
    # a parent may not climb out of recipes/ either
    (tmp_path / "base" / "b.toml").write_text('extends = "../../a.toml"\n')
    with pytest.raises(RecipeError, match=r"b.toml: extends: '../../a.toml' is outside"):
        load_recipe(child, tmp_path)


def test_a_recipe_file_linking_outside_recipes_is_refused(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    write(recipes, "a.toml", BASE)
    outside = write(tmp_path, "elsewhere.toml", 'extends = "recipes/a.toml"\n')
    (recipes / "link.toml").symlink_to(outside)
    with pytest.raises(RecipeError, match=r"link.toml: the recipe file is outside .*\(a link to .*elsewhere.toml\)"):
        load_recipe(recipes / "link.toml", recipes)


def test_extends_outside_stops_doit_list_with_one_line(tmp_path):
    (tmp_path / "p").mkdir()
    project = copy_project(tmp_path / "p", recipes=())
    shutil.copy(ROOT / "recipes" / "demo.toml", tmp_path / "parent.toml")  # a whole recipe, outside recipes/
    shutil.copy(ROOT / "recipes" / "mini_lima.toml", tmp_path / "mini_lima.toml")
    (project / "recipes" / "evil.toml").write_text('extends = "../../parent.toml"\n')
    rc, out = doit_list(project)
    assert rc != 0 and "Traceback" not in out, out
    assert "evil.toml: extends: '../../parent.toml' is outside" in out, out


# -- local lm-eval suites ----------------------------------------------------------------------------------------

def make_suite(tmp_path):
    """recipes/evals/s (a copy of tb_basic) and, outside recipes/, a copy of its data (so that today the outside
    file would parse and be evaluated)."""
    recipes = tmp_path / "recipes"
    suite = recipes / "evals" / "s"
    shutil.copytree(ROOT / "recipes/evals/tb_basic", suite)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(suite / "capitals.jsonl", outside / "capitals.jsonl")
    shutil.copy(suite / "tb_capitals_mc.yaml", outside / "template.yaml")
    return recipes, suite, outside


def set_data_files(suite, value: str):
    y = suite / "tb_capitals_mc.yaml"
    y.write_text(y.read_text().replace("  data_files:\n    test: capitals.jsonl", "  data_files:" + value))
    return y


@pytest.mark.parametrize("form, key", [
    ("\n    test: {abs}", "dataset_kwargs.data_files.test"),                          # split -> str
    ("\n    test: [capitals.jsonl, {abs}]", "dataset_kwargs.data_files.test[1]"),    # split -> list
    (" {abs}", "dataset_kwargs.data_files"),                                         # str
    (" [{abs}]", "dataset_kwargs.data_files[0]"),                                     # list
    ("\n    test: ../../../outside/capitals.jsonl", "dataset_kwargs.data_files.test"),
])
def test_suite_data_files_outside_recipes_are_refused(tmp_path, form, key):
    recipes, suite, outside = make_suite(tmp_path)
    y = set_data_files(suite, form.format(abs=outside / "capitals.jsonl"))
    with pytest.raises(TunebuildError) as e:
        evaluate.check_local_suite(suite)
    msg = str(e.value)
    assert msg.startswith(f"{y}: {key}: '") and f"is outside {recipes}" in msg and "expected a data file" in msg, msg
    assert "\n" not in msg


def test_suite_include_data_dir_and_dataset_path_outside_recipes_are_refused(tmp_path):
    recipes, suite, outside = make_suite(tmp_path)
    y = suite / "tb_capitals_mc.yaml"
    original = y.read_text()
    for text, message in [
        (f"include: {outside / 'template.yaml'}\ntask: x\n", f"{y}: include: '{outside / 'template.yaml'}' is outside"),
        ("include: ../../../outside/template.yaml\ntask: x\n", f"{y}: include: '../../../outside/template.yaml' is "
                                                              f"outside"),
        (original.replace("  data_files:", f"  data_dir: {outside}\n  data_files:"),
         f"{y}: dataset_kwargs.data_dir: '{outside}' is outside"),
        (original.replace("dataset_path: json", f"dataset_path: {outside}").replace(
            "dataset_kwargs:\n  data_files:\n    test: capitals.jsonl\n", ""),
         f"{y}: dataset_path: '{outside}' is outside"),
        (original.replace("test: capitals.jsonl", "test: file:///etc/passwd"),
         f"{y}: dataset_kwargs.data_files.test: 'file:///etc/passwd' is a URL"),
        (original.replace("test: capitals.jsonl", "test: link.jsonl"),  # a link inside, to a file outside
         f"{y}: dataset_kwargs.data_files.test: 'link.jsonl' is outside"),
    ]:
        (suite / "link.jsonl").unlink(missing_ok=True)
        (suite / "link.jsonl").symlink_to(outside / "capitals.jsonl")
        y.write_text(text)
        with pytest.raises(TunebuildError) as e:
            evaluate.check_local_suite(suite)
        assert message in str(e.value) and "\n" not in str(e.value), (text, str(e.value))


def test_an_included_template_is_checked_and_the_key_names_its_file(tmp_path):
    recipes, suite, outside = make_suite(tmp_path)
    (suite / "_common").write_text(f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                                   f"{outside / 'capitals.jsonl'}\n")
    (suite / "tb_capitals_mc.yaml").write_text("include: _common\ntask: tb_capitals_mc\ntest_split: test\n"
                                               "output_type: multiple_choice\n")
    with pytest.raises(TunebuildError, match=r"_common: dataset_kwargs.data_files.test: '.*capitals.jsonl' is "
                                             r"outside"):
        evaluate.check_local_suite(suite)


def test_a_yaml_linking_outside_recipes_is_refused(tmp_path):
    recipes, suite, outside = make_suite(tmp_path)
    (suite / "tb_capitals_mc.yaml").unlink()
    (suite / "tb_capitals_mc.yaml").symlink_to(outside / "template.yaml")
    with pytest.raises(TunebuildError, match=r"tb_capitals_mc.yaml: a link to .*template.yaml, outside"):
        evaluate.check_local_suite(suite)


def test_shipped_suites_and_paths_inside_recipes_pass(tmp_path):
    for suite in ("tb_basic", "tb_subjects"):
        evaluate.check_local_suite(ROOT / "recipes/evals" / suite)
    recipes, suite, outside = make_suite(tmp_path)
    (recipes / "shared").mkdir()
    shutil.copy(suite / "capitals.jsonl", recipes / "shared" / "capitals.jsonl")
    set_data_files(suite, "\n    test: ../../shared/capitals.jsonl")  # another folder of recipes/: allowed
    evaluate.check_local_suite(suite)


def test_a_suite_reading_outside_recipes_stops_doit_list_with_one_line(tmp_path):
    project = copy_project(tmp_path, recipes=("alpaca_lora_demo.toml",))
    secret = tmp_path / "secret.jsonl"
    shutil.copy(ROOT / "recipes/evals/tb_basic/capitals.jsonl", secret)
    y = project / "recipes/evals/tb_basic/tb_capitals_mc.yaml"
    y.write_text(y.read_text().replace("test: capitals.jsonl", f"test: {secret}"))
    rc, out = doit_list(project)
    assert rc != 0 and "Traceback" not in out, out
    assert f"tb_capitals_mc.yaml: dataset_kwargs.data_files.test: '{secret}' is outside" in out, out


# -- a failed import's report ------------------------------------------------------------------------------------

def test_an_import_that_skips_every_row_points_at_a_report_that_exists(tmp_path):
    project = copy_project(tmp_path, recipes=("alpaca_lora_demo.toml",))
    rows = [{"instruction": f"Name colour {i}.", "input": ""} for i in range(6)]  # no output: every row is bad
    (project / "recipes/data/allbad.json").write_text(json.dumps(rows))
    (project / "recipes/allbad.toml").write_text(
        'extends = "alpaca_lora_demo.toml"\n[data.alpaca]\nsource = "data/allbad.json"\non_bad_row = "skip"\n')
    _, _, out, rc = run_doit(project, "import:allbad.alpaca", check=False)
    assert rc != 0 and "Traceback" not in out, out
    log = "artifacts/allbad/logs/import-alpaca.report.json"
    assert ("import:allbad.alpaca: recipes/data/allbad.json: no training example left of 6 row(s): 6 bad row(s) "
            f"skipped (on_bad_row = 'skip') (see {log} for what was dropped and why)") in out, out
    assert ".tmp-" not in out
    report = json.loads((project / log).read_text())
    assert report["bad_rows"] == 6 and report["train_examples"] == 0
    assert [d["row"] for d in report["dropped"]] == [1, 2, 3, 4, 5, 6]
    assert not (project / "artifacts/allbad/data/alpaca").exists()
    # fixed: the import succeeds and the stale report goes
    (project / "recipes/data/allbad.json").write_text(json.dumps([{**r, "output": "Red."} for r in rows]))
    run_doit(project, "import:allbad.alpaca")
    assert not (project / log).exists()


def test_the_failure_log_stays_under_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]))
    c = {"format": "alpaca", "columns": {}, "split": "train", "subset": None, "revision": None, "limit": 0,
         "shuffle_seed": None, "heldout_fraction": 0.0, "dedup": False, "rouge_threshold": 0.7, "language": "en",
         "on_bad_row": "skip"}
    (tmp_path / "out").mkdir()
    for bad in ("/tmp/x.report.json", "artifacts/../../x.report.json", "elsewhere/x.report.json",
                "artifacts/r/logs/x.txt"):
        with pytest.raises(TunebuildError, match="is not a report file under artifacts/"):
            import_data.run(tmp_path / "out", config=c, where="t", file=f, failure_log=bad)
    with pytest.raises(TunebuildError, match=r"see artifacts/r/logs/import-x.report.json"):
        import_data.run(tmp_path / "out", config=c, where="t", file=f,
                        failure_log="artifacts/r/logs/import-x.report.json")
    assert json.loads((tmp_path / "artifacts/r/logs/import-x.report.json").read_text())["bad_rows"] == 1
