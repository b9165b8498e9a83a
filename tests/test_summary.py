"""What a build over every recipe ends with: one line per recipe this machine cannot run, a table of recipe, state
and headline, and an exit code that is non-zero only for real failures."""
import re

from conftest import ROOT, copy_project, run_doit

ENV = {"HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": ""}


def _project(tmp_path, bad: bool):
    project = copy_project(tmp_path, recipes=("mini_lima.toml", "alpaca_lora.toml", "mini_lima_sweep.toml"))
    if bad:  # a recipe whose data has a real fault: a row without its instruction
        (project / "recipes/data/broken.json").write_text('[{"instruction": "Say hi", "output": "hi"}, '
                                                          '{"input": "x", "output": "y"}]')
        (project / "recipes/broken.toml").write_text(
            'extends = "alpaca_lora.toml"\ndescription = "a broken data file"\n'
            '[data.alpaca_gpt4]\nsource = "data/broken.json"\nformat = "alpaca"\n')
    return project


def _table(out: str) -> dict[str, str]:
    lines = out[out.index("\nrecipe ") + 1:].splitlines()
    assert re.match(r"recipe +state +headline$", lines[0]), out
    return {line.split()[0]: line for line in lines[1:]}


def test_recipes_that_cannot_run_here_are_one_line_each_and_no_failure(tmp_path):
    project = _project(tmp_path, bad=False)
    _, _, out, rc = run_doit(project, "build", env=ENV, check=False)
    assert rc == 0, out
    assert "Traceback" not in out and "TaskFailed" not in out and "UnmetDependency" not in out, out
    for recipe in ("mini_lima", "alpaca_lora"):
        said = [line for line in out.splitlines() if re.match(rf"\S+:{recipe}\.\S+: cannot run here: ", line)]
        assert len(said) == 1, (recipe, out)
    table = _table(out)
    assert "cannot run here" in table["mini_lima"] and "OPENAI_API_KEY" in table["mini_lima"] or \
        "Qwen/Qwen1.5-0.5B" in table["mini_lima"], out
    assert "cannot run here" in table["alpaca_lora"] and "alpaca-gpt4" in table["alpaca_lora"] or \
        "Meta-Llama-3-8B" in table["alpaca_lora"], out
    assert re.search(r"\d+ cannot run here", out), out
    # a sweep whose variants cannot run here: its table is not run, for the same reason, not for a failure
    assert re.match(r"mini_lima_sweep +cannot run here +an input cannot run here$", table["mini_lima_sweep"]), out
    # named explicitly, a recipe that cannot run here is the failure of what was asked for
    _, _, out, rc = run_doit(project, "build:alpaca_lora", env=ENV, check=False)
    assert rc != 0 and "cannot run here: " in out and "Traceback" not in out, out


def test_a_real_failure_still_fails_the_build_over_every_recipe(tmp_path):
    project = _project(tmp_path, bad=True)
    _, _, out, rc = run_doit(project, "build", env=ENV, check=False)
    assert rc != 0, out
    assert re.search(r"import:broken\.alpaca_gpt4: .*broken\.json:2: instruction", out), out
    assert "Traceback" not in out, out
    table = _table(out)
    assert re.match(r"broken +failed +import:broken\.alpaca_gpt4: 1 bad row", table["broken"]) and "cannot run here" in table["mini_lima"], out
    assert re.match(r"mini_lima_sweep +cannot run here +an input cannot run here$", table["mini_lima_sweep"]), out
