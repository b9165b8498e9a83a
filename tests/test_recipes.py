"""The seed experiments as recipes (each real one validates and is listed, its offline twin builds) and sweeps
(predictable variant names, exclusions, shared work, one results table)."""
import csv
import re
import subprocess
import sys

import pytest

from conftest import ROOT, copy_project, run_doit
from pipeline.core.recipe.load import load_recipe_variants, load_recipes
from pipeline.core.recipe.schema import RecipeError

REAL = ("mini_lima", "mini_lima_full", "mini_lima_sweep", "partial_ft", "zh_dpo", "alpaca_lora", "dolly_qlora")
TWINS = {"mini_lima": "demo", "mini_lima_full": "mini_lima_full_demo", "mini_lima_sweep": "mini_lima_sweep_demo",
         "partial_ft": "partial_ft_demo", "zh_dpo": "zh_dpo_demo", "alpaca_lora": "alpaca_lora_demo",
         "dolly_qlora": "dolly_qlora_demo"}


def test_every_real_recipe_and_its_twin_validate_and_are_listed():
    names = {r.name for r in load_recipes(ROOT / "recipes")}
    out = subprocess.run([sys.executable, "-m", "doit", "list", "--all"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for real, twin in TWINS.items():
        assert f"build:{real} " in out and f"build:{twin} " in out, (real, twin)
    assert {f"mini_lima_sweep.s{s}-{t}-p{p}" for s in (100, 338, 1735) for t in ("qwen", "default")
            for p in (1, 2, 3)} <= names
    assert "sweep:mini_lima_sweep " in out and "judge:dolly_qlora " in out and "chat:dolly_qlora " in out
    recipes = {r.name: r for r in load_recipes(ROOT / "recipes")}
    assert recipes["dolly_qlora"].config["eval"]["judge"]["reference"] == "mistral"
    assert recipes["zh_dpo"].config["train"]["dpo"]["from"] == "sft"
    suites = recipes["alpaca_lora"].config["eval"]["suites"]
    assert set(suites) == {"agieval", "gpt4all", "truthfulqa", "bigbench", "eq_bench"}


def test_shipped_cmmlu_and_ceval_category_maps():
    import json

    from pipeline.core.recipe.checks import _check_categories

    for name, n in (("cmmlu", 67), ("ceval", 52)):
        path = ROOT / f"recipes/evals/categories/{name}.json"
        _check_categories(path, f"eval.suites.{name}.categories", path)
        assert len(json.loads(path.read_text())) == n
    ceval = json.loads((ROOT / "recipes/evals/categories/ceval.json").read_text())
    assert "Hard" in ceval["ceval-valid_advanced_mathematics"]


SWEEP = """extends = "demo.toml"
[sweep.lr]
key = "train.sft.learning_rate"
values = [0.01, 0.001]
[sweep.t]
key = "model.chat_template"
values = ["qwen", "chatml", "default"]
{extra}
"""


def test_a_sweep_expands_into_named_variants_with_exclusions(tmp_path):
    project = copy_project(tmp_path, recipes=("mini_lima.toml", "demo.toml"))
    path = project / "recipes/g.toml"
    path.write_text(SWEEP.format(extra='[sweep]\nexclude = [{lr = "lr0_001", t = "default"}]'))
    variants = load_recipe_variants(path, project / "recipes")
    assert [v.name for v in variants] == ["g.lr0_01-qwen", "g.lr0_01-chatml", "g.lr0_01-default",
                                          "g.lr0_001-qwen", "g.lr0_001-chatml"]
    assert variants[1].config["model"]["chat_template"] == "templates/chatml.jinja"
    assert variants[3].config["train"]["sft"]["learning_rate"] == 0.001
    assert all(v.sweep["baseline"] == "g.lr0_01-qwen" for v in variants)
    for extra, message in [('[sweep]\nexclude = [{lr = "lr9"}]', "sweep.exclude: lr = 'lr9' names no axis label"),
                           ('[sweep.x]\nkey = "train.sft.nope"\nvalues = [1]', "unknown key 'train.sft.nope'"),
                           ('[sweep.y]\nkey = "train.sft.batch_size"\nvalues = []', "sweep.y.values: expected a non"),
                           ('[sweep.z]\nkey = "train.sft.batch_size"\nvalues = [1, 2]\nlabels = ["a"]',
                            "sweep.z.labels: expected 2 distinct short labels")]:
        path.write_text(SWEEP.format(extra=extra))
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe_variants(path, project / "recipes")


def _sent(out: str) -> int:
    return sum(int(m) for m in re.findall(r"generate: \d+ requests \((\d+) sent now", out))


@pytest.mark.slow
def test_the_sweep_demo_shares_work_and_writes_one_table(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "alone").mkdir()
    project = copy_project(tmp_path / "sweep", recipes=("mini_lima_sweep_demo.toml",))
    executed, _, out, _ = run_doit(project, "build:mini_lima_sweep_demo", env={"HF_HUB_OFFLINE": "1"})
    variants = {t.split(":", 1)[1] for t in executed if t.startswith("scores:")}
    assert len(variants) == 8
    trained = [t for t in executed if t.startswith("sft:")]
    restored = re.findall(r"^(sft:\S+): restored from the run cache", out, re.M)
    assert len(trained) == 8 and len(restored) == 4  # the judge-prompt halves train nothing
    # the largest size alone, in a fresh project, asks the generator as much as the whole sweep did
    alone = copy_project(tmp_path / "alone", recipes=("mini_lima_sweep_demo.toml",))
    _, _, out_alone, _ = run_doit(alone, "generate:mini_lima_sweep_demo.s12-qwen-p1.self_instruct",
                                  env={"HF_HUB_OFFLINE": "1"})
    assert _sent(out) == _sent(out_alone) > 0, (_sent(out), _sent(out_alone))
    report = project / "artifacts/report/mini_lima_sweep_demo"
    text = (report / "sweep.md").read_text()
    assert "## Sweep mini_lima_sweep_demo: 8 variants" in text
    rows = list(csv.DictReader(open(report / "sweep.csv", encoding="utf-8")))
    assert len(rows) == 8 and {r["variant"] for r in rows} == {f"s{s}-{t}-p{p}" for s in (4, 12)
                                                               for t in ("qwen", "default") for p in (1, 2)}
    # the tiny judge rarely gives a verdict: a score (and a paired p) exists only over what it judged
    assert all(r["train examples"] and r["no verdict rate"] != "" for r in rows)
    assert all(bool(r.get("score")) == (r.get("judged") not in (None, "", "0")) for r in rows)
    if any(r.get("vs baseline") for r in rows):
        assert "p (Holm)" in text
    assert (report / "sweep.png").stat().st_size > 3000


@pytest.mark.slow
def test_partial_ft_demo_compares_with_an_outside_model(tmp_path):
    project = copy_project(tmp_path, recipes=("partial_ft_demo.toml", "alpaca_lora_demo.toml"))
    run_doit(project, "build:partial_ft_demo", env={"HF_HUB_OFFLINE": "1"})
    report = (project / "artifacts/report/partial_ft_demo/comparison.md").read_text()
    assert "### base → sft · subjects · acc" in report and "### sft → outside · subjects · acc" in report
    assert "average before" in report and "max improvement" in report
