"""Bad input gets one clear line naming the file, the key or row and what was expected; never a traceback from
deep inside a library, never a silently used value. (Recipe-schema cases are in test_recipe.py.)"""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, copy_project
from pipeline.errors import TunebuildError
from pipeline.finetuning import training
from pipeline.stages import evaluate, filter as filter_stage, generate, heldout

SUITE = ROOT / "recipes/evals/tb_basic"


def suite_copy(tmp_path):
    import shutil

    dest = tmp_path / "suite"
    shutil.copytree(SUITE, dest)
    return dest


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    s = suite_copy(tmp_path)
    y = s / "tb_capitals_mc.yaml"
    y.write_text(y.read_text().replace("test_split: test", "test_split: [test"))
    with pytest.raises(TunebuildError, match=r"tb_capitals_mc.yaml:\d+: not valid YAML"):
        evaluate.check_local_suite(s)


def test_a_missing_data_file_is_named(tmp_path):
    s = suite_copy(tmp_path)
    (s / "capitals.jsonl").unlink()
    with pytest.raises(TunebuildError, match=r"tb_capitals_mc.yaml: data file 'capitals.jsonl' does not exist"):
        evaluate.check_local_suite(s)


def test_a_malformed_jsonl_line_and_a_missing_answer_are_named(tmp_path):
    s = suite_copy(tmp_path)
    data = s / "capitals.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:2] + ['{"country": "Peru", "choices": ["Lima"'] + lines[3:]) + "\n")
    with pytest.raises(TunebuildError, match=r"capitals.jsonl:3: row: not valid JSON"):
        evaluate.check_local_suite(s)
    row = json.loads(lines[2])
    del row["answer"]
    data.write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]) + "\n")
    with pytest.raises(TunebuildError, match=r"capitals.jsonl:3: answer: missing \(the answer that "
                                             r"tb_capitals_mc.yaml's doc_to_target reads\)"):
        evaluate.check_local_suite(s)


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}], "is_classification": false}\n',
     r"seeds.jsonl:1: id: missing"),
    ('{"id": "a", "instruction": "Say hi.", "instances": [], "is_classification": false}\n'
     '{"id": "a", "instruction": "Say bye.", "instances": [], "is_classification": false}\n',
     r"seeds.jsonl:2: id: 'a' is also the id of line 1; seed ids must be unique"),
    ('[{"instruction": "Give three tips.", "input": "", "output": "Eat."}]',
     r"seeds.jsonl: a JSON list; seeds are self-instruct JSONL .* import it instead"),
    (b'{"id": "a", "instruction": "caf\xe9", "instances": [], "is_classification": false}\n',
     r"seeds.jsonl:1: not UTF-8 text"),
])
def test_bad_seed_files(tmp_path, content, message):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TunebuildError, match=message):
        generate.read_seeds(path)


def test_fewer_seed_tasks_than_in_context_examples(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"id": i, "instruction": f"Task {i}.", "instances": [],
                                        "is_classification": False}) + "\n" for i in range(3)))
    with pytest.raises(TunebuildError, match=r"generate.num_prompt_instructions: 8 in-context tasks per request, "
                                             r"but .*seeds.jsonl holds only 3 seed task\(s\)"):
        generate.generate(tmp_path, seeds=path, prompt=ROOT / "recipes/prompts/self_instruct.txt",
                          config={"style": "self_instruct", "num_prompt_instructions": 8}, client=None)


def test_unknown_lora_target_modules_name_the_modules_the_model_has(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    training.check_target_modules(model, ["q_proj", "down_proj"], "builtin:tiny", "train.sft.lora.target_modules")
    with pytest.raises(TunebuildError) as e:
        training.check_target_modules(model, ["q_proj", "nope_proj"], "builtin:tiny", "train.sft.lora.target_modules")
    assert "train.sft.lora.target_modules: 'nope_proj' match(es) no module of builtin:tiny" in str(e.value)
    assert "q_proj" in str(e.value) and "gate_proj" in str(e.value)


def _heldout(tmp_path, tiny_model, template_text, records):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "heldout.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
    template = tmp_path / "t.jinja"
    template.write_text(template_text)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return heldout.run(out, model=str(tiny_model), data={"d": data}, chat_template=template,
                       config={"heldout_max_items": 10}), out


def test_heldout_template_errors_and_overlong_prompts(tmp_path, tiny_model, capsys):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(TunebuildError, match=r"t.jinja: the chat template fails on held-out conversation 1: "
                                             r"UndefinedError"):
        _heldout(tmp_path, tiny_model, "{{ messages[0].nope.deeper }}{% if add_generation_prompt %}{% endif %}",
                 [conv])
    chatml = (ROOT / "recipes/templates/qwen.jinja").read_text()
    long = [{"role": "user", "content": "x" * 2100}, {"role": "assistant", "content": "ok"}]
    _, out = _heldout(tmp_path, tiny_model, chatml, [conv, long])
    assert "1 of 2 held-out prompts are longer than the model's context (2048 tokens)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["skipped_too_long"] == 1
    with pytest.raises(TunebuildError, match="every held-out prompt is longer than the model's context"):
        _heldout(tmp_path, tiny_model, chatml, [long])


def test_chinese_instructions_count_characters_not_spaces():
    # BELLE-style seed instructions: no spaces, so space-split counting made each one "1 word"
    c = {"min_words": 4, "max_words": 150, "blocklist": [], "language": "zh"}
    for inst in ("写一首关于春天的诗。", "将下面这句话翻译成英文", "列出三种常见的水果", "解释一下什么是机器学习"):
        assert filter_stage.instruction_problem(inst, c) is None, inst
    assert filter_stage.count_words("用 Python 写一个排序函数", "zh") == 8 + 1  # 8 CJK characters + 1 word
    assert filter_stage.instruction_problem("你好", c) == "fewer than 4 words (CJK characters count one each)"


def test_an_unknown_recipe_reference_is_one_line_at_load(tmp_path):
    copy_project(tmp_path, recipes=("mini_lima.toml", "demo.toml"))
    (tmp_path / "recipes/x.toml").write_text('extends = "demo.toml"\n[eval.models.other]\nmodel = "recipe:nope"\n')
    proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "x.toml: eval.models.other.model: no recipe named 'nope' (known: demo, mini_lima, x)" in proc.stderr
    # one bad recipe stops nothing else: it is reported at the top, its tasks are absent, the others are there
    assert proc.returncode == 0
    proc = subprocess.run([sys.executable, "-m", "doit", "list", "--all"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "sft:demo.sft" in proc.stdout and "sft:x." not in proc.stdout
