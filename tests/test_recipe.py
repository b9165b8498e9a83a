from pathlib import Path

import pytest

from pipeline.core.recipe.load import load_recipe, load_recipes
from pipeline.core.recipe.schema import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def write(tmp_path, name, text):
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "t.jinja").write_text(
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    for f in ("seeds.jsonl", "p.txt"):
        (tmp_path / f).write_text("x")
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
[model]
base = "builtin:tiny"
chat_template = "templates/t.jinja"
[generate]
backend = "local"
model = "builtin:tiny"
seeds = "seeds.jsonl"
prompt = "p.txt"
classify_prompt = "p.txt"
instance_prompt = "p.txt"
instance_prompt_output_first = "p.txt"
[eval.suites.s]
tasks = ["x"]
"""


def test_shipped_recipes_validate_and_demo_extends_mini_lima():
    recipes = {r.name: r for r in load_recipes(RECIPES)}
    assert {"demo", "mini_lima"} <= set(recipes)
    mini, demo = recipes["mini_lima"], recipes["demo"]
    assert mini.config["model"]["base"] == "Qwen/Qwen1.5-0.5B"
    assert mini.config["generate"]["backend"] == "openai"
    assert demo.config["model"]["base"] == "builtin:tiny"
    assert demo.config["generate"]["backend"] == "local"
    # inherited, not repeated
    assert demo.config["model"]["chat_template"] == mini.config["model"]["chat_template"] == "templates/qwen.jinja"
    assert demo.config["eval"]["suites"] == mini.config["eval"]["suites"]
    assert demo.files[1] == (RECIPES / "mini_lima.toml").resolve()


def test_defaults_filled(tmp_path):
    r = load_recipe(write(tmp_path, "a.toml", BASE), tmp_path)
    assert r.config["filter"]["rouge_threshold"] == 0.7
    assert r.config["eval"]["suites"]["s"]["num_fewshot"] == 0


@pytest.mark.parametrize("edit, message", [
    (BASE.replace("[filter]", "") + "\n[filter]\nrouge_treshold = 0.5\n", "unknown key 'filter.rouge_treshold'"),
    (BASE + "\n[train.sft]\nlearning_rate = 'fast'\n", "train.sft.learning_rate: expected a number, got 'fast'"),
    (BASE + "\n[train.sft]\nmax_steps = true\n", "train.sft.max_steps: expected an integer, got True"),
    (BASE + "\n[sft]\nmax_steps = 3\n", "[sft] is now a training stage: rename the table to [train.sft]"),
    (BASE + "\n[train.sft]\nbeta = 0.2\n", "train.sft.beta: not a setting of method = 'sft'"),
    (BASE + "\n[train.dpo]\nmethod = 'dpo'\nfrom = 'sft'\n", "train.dpo.from: expected 'base' or a [train.<name>]"),
    (BASE + "\n[train.a]\nfrom = 'b'\n[train.b]\nfrom = 'a'\n", "from: circular"),
    (BASE + "\n[train.sft]\nfinetuning = 'freeze'\n", "train.sft.freeze: name the trainable_modules"),
    (BASE + "\n[train.sft]\nfinetuning = 'full'\n[train.sft.lora]\nr = 4\n", "train.sft.lora: only for "),
    (BASE.replace('prompt = "p.txt"', 'prompt = "missing.txt"'), "generate.prompt: file 'missing.txt' does not exist"),
    (BASE.replace('backend = "local"', 'backend = "vllm"'), "generate.backend: expected one of 'openai', 'local'"),
    (BASE.replace('base = "builtin:tiny"', 'base = "builtin:huge"'), "model.base: unknown built-in model"),
    (BASE.replace('base = "builtin:tiny"\n', ''), "model.base: required key is missing"),
    (BASE + "\n[eval.suites.s2]\ntasks = ['y']\nshots = 5\n", "unknown key 'eval.suites.s2.shots'"),
    ("bogus = 1\n" + BASE, "unknown key 'bogus'"),
    # ranges live in the schema (issue: accepted silently, or a traceback deep in TRL / PEFT / lm-eval)
    (BASE + "\n[train.sft]\nbatch_size = -4\n", "train.sft.batch_size: expected >= 1, got -4"),
    (BASE + "\n[train.sft.lora]\nr = 0\n", "train.sft.lora.r: expected >= 1, got 0"),
    (BASE + "\n[train.sft]\nlearning_rate = 0\n", "train.sft.learning_rate: expected > 0, got 0.0"),
    (BASE.replace('model = "builtin:tiny"', 'model = "builtin:tiny"\ntemperature = -1'),
     "generate.temperature: expected >= 0, <= 2, got -1.0"),
    (BASE + "\n[eval]\nbatch_size = 0\n", "eval.batch_size: expected >= 1, got 0"),
    (BASE.replace('tasks = ["x"]', 'tasks = ["x"]\nlimit = -5'), "eval.suites.s.limit: expected >= 0, got -5"),
    (BASE.replace('tasks = ["x"]', 'tasks = []'), "eval.suites.s.tasks: expected at least 1 item(s), got []"),
    (BASE + "\n[filter]\nmax_instances_per_task = 0\n", "filter.max_instances_per_task: expected >= 1, got 0"),
    # file keys name a file (or folder) inside recipes/
    (BASE.replace('seeds = "seeds.jsonl"', 'seeds = "templates"'), "generate.seeds: 'templates' is a folder; "
                                                                    "expected a file"),
    (BASE.replace('seeds = "seeds.jsonl"', 'seeds = "../../../../etc/passwd"'), "generate.seeds: "
                                                                                "'../../../../etc/passwd' is outside"),
    (BASE.replace('seeds = "seeds.jsonl"', 'seeds = "/etc/passwd"'), "generate.seeds: '/etc/passwd' is outside"),
    (BASE.replace('tasks = ["x"]', 'tasks = ["x"]\ninclude_path = "/tmp"'), "eval.suites.s.include_path: '/tmp' is "
                                                                            "outside"),
    ("[model\n", "not valid TOML"),
])
def test_bad_recipes_name_file_and_key(tmp_path, edit, message):
    path = write(tmp_path, "bad.toml", edit)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, tmp_path)
    assert str(path) in str(e.value)
    assert message in str(e.value)


def test_broken_chat_template_is_a_recipe_error(tmp_path):
    path = write(tmp_path, "a.toml", BASE)
    (tmp_path / "templates" / "t.jinja").write_text("{% for m in messages %}")
    with pytest.raises(RecipeError, match=r"model.chat_template: .*t.jinja is not a valid Jinja template"):
        load_recipe(path, tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "has no add_generation_prompt branch"),
    ("hello{% if add_generation_prompt %}A:{% endif %}", "never reads `messages`"),
])
def test_chat_templates_that_would_prompt_wrongly_are_refused(tmp_path, text, message):
    path = write(tmp_path, "a.toml", BASE)
    (tmp_path / "templates" / "t.jinja").write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, tmp_path)


def test_a_non_utf8_chat_template_and_an_empty_recipes_folder_are_one_line(tmp_path):
    path = write(tmp_path, "a.toml", BASE)
    (tmp_path / "templates" / "t.jinja").write_bytes(b"{{ messages }} \xff\xfe")
    with pytest.raises(RecipeError, match=r"model.chat_template: .*t.jinja is not UTF-8 text \(byte 15\)"):
        load_recipe(path, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no recipes"):
        load_recipes(tmp_path / "empty")


def test_extends_overrides_and_detects_cycles(tmp_path):
    write(tmp_path, "a.toml", BASE)
    child = write(tmp_path, "b.toml", 'extends = "a.toml"\n[filter]\nrouge_threshold = 0.5\n')
    r = load_recipe(child, tmp_path)
    assert r.config["filter"]["rouge_threshold"] == 0.5
    assert r.config["generate"]["model"] == "builtin:tiny"
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n' + BASE)
    with pytest.raises(RecipeError, match="circular"):
        load_recipe(child, tmp_path)


def test_bad_recipe_stops_dodo_with_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import copy_project

    copy_project(tmp_path)
    (tmp_path / "recipes" / "typo.toml").write_text('extends = "mini_lima.toml"\n[train.sft]\nlerning_rate = 1\n')
    proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "typo.toml: unknown key 'train.sft.lerning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0 and "typo" not in proc.stdout
    # alone, a bad recipe stops dodo in one line
    (tmp_path / "recipes" / "mini_lima.toml").rename(tmp_path / "mini_lima.toml")
    (tmp_path / "recipes" / "typo.toml").write_text('[train.sft]\nlerning_rate = 1\n')
    proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "typo.toml: " in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_mmlu_categories_cover_57_subjects_in_4_categories():
    import json

    from pipeline.core.recipe.checks import _check_categories

    path = ROOT / "recipes/evals/categories/mmlu.json"
    _check_categories(path, "eval.suites.mmlu.categories", path)
    mapping = json.loads(path.read_text())
    assert len(mapping) == 57 and set(mapping.values()) == {"STEM", "Humanities", "Social Sciences", "Other"}
    assert mapping["mmlu_abstract_algebra"] == "STEM" and mapping["mmlu_world_religions"] == "Humanities"


def test_the_recipe_reference_is_generated_from_the_schema():
    from pipeline.core.recipe.reference import reference

    assert (RECIPES / "REFERENCE.md").read_text(encoding="utf-8") == reference(), \
        "recipes/REFERENCE.md is out of date: python -m pipeline.core.recipe.reference > recipes/REFERENCE.md"
    assert "| `train.<name>.batch_size` | integer | `4` | >= 1 |" in reference()
