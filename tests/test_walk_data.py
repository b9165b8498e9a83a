"""A new user's walk through data, training and eval inputs (issue 18 §6): LLaMA-Factory's alpaca preference files,
a prompt mapping that must not drop `input`, a DPO stage on conversations refused when the recipe loads, a template
typo in a suite YAML, a data file of an unsupported type, and "did you mean" for an unknown recipe key. Every
refusal is one line naming the file and the key."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, copy_project
from pipeline.core.recipe.load import load_recipe
from pipeline.core.recipe.schema import RecipeError
from pipeline.errors import TunebuildError
from pipeline.stages import evaluate, import_data
from test_import import config

PAIRS = [{"instruction": "Translate to English.", "input": "chat", "chosen": "cat", "rejected": "dog"},
         {"instruction": "Name a primary colour.", "input": "", "chosen": "Red.", "rejected": "A car."},
         {"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "6"}]


def imported(tmp_path, rows, **over):
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    report = import_data.run(out, config=config(**over), where="t.toml: data.pairs", file=src)
    return report, [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def expected_pairs():
    return [{"prompt": [{"role": "user", "content": "Translate to English.\n\nchat"}],
             "chosen": [{"role": "assistant", "content": "cat"}],
             "rejected": [{"role": "assistant", "content": "dog"}]},
            {"prompt": [{"role": "user", "content": "Name a primary colour."}],
             "chosen": [{"role": "assistant", "content": "Red."}],
             "rejected": [{"role": "assistant", "content": "A car."}]},
            {"prompt": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}],
             "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}]


@pytest.mark.parametrize("fmt", ["auto", "alpaca_ranking"])
def test_llama_factory_alpaca_preference_rows_import_as_pairs(tmp_path, fmt):
    report, records = imported(tmp_path, PAIRS, format=fmt)
    assert report["format"] == "alpaca_ranking" and report["kind"] == "preference"
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records] == expected_pairs()


def test_alpaca_ranking_system_history_and_bad_rows(tmp_path):
    row = {**PAIRS[0], "system": "Be brief.", "history": [["hi", "hello"]]}
    _, [record] = imported(tmp_path, [row], format="alpaca_ranking")
    assert [m["role"] for m in record["prompt"]] == ["system", "user", "assistant", "user"]
    with pytest.raises(TunebuildError, match=r"pairs.json:1: rejected: an answer different from chosen"):
        imported(tmp_path, [{**PAIRS[0], "rejected": "cat"}], format="alpaca_ranking")
    with pytest.raises(TunebuildError, match=r"pairs.json:1: chosen: a non-empty string"):
        imported(tmp_path, [{**PAIRS[0], "chosen": ""}], format="alpaca_ranking")


@pytest.mark.parametrize("fmt", ["auto", "preference", "alpaca_ranking"])
def test_a_prompt_mapping_never_drops_the_input_column(tmp_path, fmt):
    _, records = imported(tmp_path, PAIRS, format=fmt, columns={"prompt": "instruction"})
    assert [r["prompt"] for r in records] == [p["prompt"] for p in expected_pairs()]


def test_a_prompt_mapping_on_alpaca_sft_rows_keeps_the_input(tmp_path):
    rows = [{"instruction": "Translate to English.", "input": "chat", "output": "cat"}]
    for fmt in ("auto", "alpaca"):
        _, [record] = imported(tmp_path, rows, format=fmt, columns={"prompt": "instruction"})
        assert record["messages"][0] == {"role": "user", "content": "Translate to English.\n\nchat"}


# ---------------------------------------------------------------- recipes

def recipe(tmp_path, body: str, name="r.toml"):
    (tmp_path / "templates").mkdir(exist_ok=True)
    shutil.copy(ROOT / "recipes/templates/qwen.jinja", tmp_path / "templates/qwen.jinja")
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(ROOT / "recipes/data/sharegpt_zh_sample.json", tmp_path / "data/chat.json")
    shutil.copy(ROOT / "recipes/data/dpo_zh_sample.json", tmp_path / "data/pairs.json")
    path = tmp_path / name
    path.write_text('[model]\nbase = "builtin:tiny"\nchat_template = "templates/qwen.jinja"\n' + body)
    return path


def refusal(tmp_path, body: str) -> str:
    path = recipe(tmp_path, body)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, tmp_path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


def test_a_recipe_with_columns_and_auto_format_loads(tmp_path):
    r = load_recipe(recipe(tmp_path, '[data.p]\nsource = "data/pairs.json"\ncolumns = {prompt = "instruction"}\n'),
                    tmp_path)
    assert r.config["data"]["p"]["columns"] == {"prompt": "instruction"}
    assert "did you mean prompt?" in refusal(tmp_path, '[data.p]\nsource = "data/pairs.json"\n'
                                                       'columns = {promt = "instruction"}\n')
    load_recipe(recipe(tmp_path, '[data.p]\nsource = "data/pairs.json"\nformat = "alpaca_ranking"\n'), tmp_path)


DPO = '[train.dpo]\nmethod = "dpo"\n'


@pytest.mark.parametrize("data, message", [
    # a format that says conversations
    ('[data.chat]\nsource = "data/chat.json"\nformat = "sharegpt"\n' + DPO + 'data = ["chat"]\n',
     "train.dpo.data[0]: dataset 'chat' holds conversations (SFT data) (format = 'sharegpt'); method = 'dpo' "
     "trains on preference pairs (prompt, chosen, rejected): name a dataset of that kind, or set method = 'sft'"),
    # format = auto: recognised from the file's first rows
    ('[data.chat]\nsource = "data/chat.json"\n' + DPO + 'data = ["chat"]\n',
     "train.dpo.data[0]: dataset 'chat' holds conversations (SFT data) (its rows are sharegpt data)"),
    # data = []: every dataset that may hold pairs, an auto one among them
    ('[data.chat]\nsource = "data/chat.json"\n' + DPO,
     "train.dpo.data: dataset 'chat' holds conversations (SFT data) (its rows are sharegpt data); method = 'dpo' "
     "trains on preference pairs (prompt, chosen, rejected) (empty: every dataset that may hold them)"),
    # and the other way round
    ('[data.p]\nsource = "data/pairs.json"\n[train.sft]\ndata = ["p"]\n',
     "train.sft.data[0]: dataset 'p' holds preference pairs (prompt, chosen, rejected) (its rows are "
     "sharegpt_ranking data); method = 'sft' trains on conversations (SFT data): name a dataset of that kind, or "
     "set method = 'dpo'"),
])
def test_a_training_stage_on_the_wrong_kind_of_data_fails_when_the_recipe_loads(tmp_path, data, message):
    assert message in refusal(tmp_path, data)


def test_a_dpo_stage_on_conversations_stops_doit_list_in_one_line(tmp_path):
    project = copy_project(tmp_path, recipes=())
    (project / "recipes/walk.toml").write_text(
        '[model]\nbase = "builtin:tiny"\nchat_template = "templates/qwen.jinja"\n'
        '[data.chat]\nsource = "data/sharegpt_zh_sample.json"\n'
        '[train.dpo]\nmethod = "dpo"\ndata = ["chat"]\n')
    proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=project, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "walk.toml: train.dpo.data[0]: dataset 'chat' holds conversations" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_matching_kinds_and_hub_datasets_still_load(tmp_path):
    load_recipe(recipe(tmp_path, '[data.chat]\nsource = "data/chat.json"\n[data.p]\nsource = "data/pairs.json"\n'
                                 '[train.sft]\ndata = ["chat"]\n[train.dpo]\nmethod = "dpo"\nfrom = "sft"\n'
                                 'data = ["p"]\n'), tmp_path)
    # a hub dataset with format = auto: its kind is known only once imported
    load_recipe(recipe(tmp_path, '[data.h]\nsource = "org/pairs"\n' + DPO + 'data = ["h"]\n'), tmp_path)


@pytest.mark.parametrize("source, message", [
    ("data/x.txt", "data.x.source: 'data/x.txt' is a .txt file; expected a file under recipes/ ending in .json, "
                   ".jsonl, .ndjson, .parquet, .csv, or a hub dataset id like 'owner/name' (no file suffix)"),
    ("data/missing.tsv", "data.x.source: 'data/missing.tsv' ends in .tsv, not a data file suffix; expected a file"),
    ("org/pairs.txt.gz", "data.x.source: 'org/pairs.txt.gz' ends in .gz, not a data file suffix"),
    ("data", "data.x.source: 'data' is a folder; expected a file under recipes/"),
    ("data/nothing", "data.x.source: 'data/nothing' is no file (tried "),
])
def test_a_source_of_an_unsupported_file_type_is_refused(tmp_path, source, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/x.txt").write_text("hello\n")
    assert message in refusal(tmp_path, f'[data.x]\nsource = "{source}"\n[train.sft]\n')


@pytest.mark.parametrize("source", ["tatsu-lab/alpaca", "teknium/OpenHermes-2.5", "org/data.v2", "squad"])
def test_hub_ids_stay_hub_ids(tmp_path, source):
    r = load_recipe(recipe(tmp_path, f'[data.x]\nsource = "{source}"\n'), tmp_path)
    assert r.config["data"]["x"]["source"] == source


@pytest.mark.parametrize("body, message", [
    ("[train.sft]\nlr = 1e-4\n", "unknown key 'train.sft.lr' (did you mean learning_rate?)"),
    ("[train.sft]\nlerning_rate = 1e-4\n", "unknown key 'train.sft.lerning_rate' (did you mean learning_rate?)"),
    ("[train.sft]\nnum_train_epochs = 1\n", "unknown key 'train.sft.num_train_epochs' (did you mean num_epochs?)"),
    ("[train.sft.lora]\nlora_alpha = 8\n", "unknown key 'train.sft.lora.lora_alpha' (did you mean alpha?)"),
    ('[data.x]\nsource = "data/pairs.json"\nspilt = "train"\n', "unknown key 'data.x.spilt' (did you mean split?)"),
    ("[eval]\nbatchsize = 2\n", "unknown key 'eval.batchsize' (did you mean batch_size?)"),
    ("[train.sft]\nzzz = 1\n", "unknown key 'train.sft.zzz' (known keys here: attn_implementation, batch_size"),
])
def test_an_unknown_key_suggests_the_nearest_known_one(tmp_path, body, message):
    assert message in refusal(tmp_path, body)


# ---------------------------------------------------------------- eval suites

@pytest.mark.parametrize("key, old, unknown", [
    ("doc_to_text", "country", "questoin"), ("doc_to_target", "answer", "answr"),
    ("doc_to_choice", "choices", "choice"),
])
def test_a_template_typo_in_a_suite_yaml_is_one_line(tmp_path, key, old, unknown):
    import yaml as pyyaml

    suite = tmp_path / "recipes/evals/s"
    shutil.copytree(ROOT / "recipes/evals/tb_basic", suite)
    yaml = suite / "tb_capitals_mc.yaml"
    yaml.write_text(yaml.read_text().replace("{{%s}}" % old, "{{%s}}" % unknown))
    template = pyyaml.safe_load(yaml.read_text())[key]
    with pytest.raises(TunebuildError) as e:
        evaluate.check_local_suite(suite)
    assert str(e.value) == (f"{yaml}: {key}: '{unknown}' is undefined in {template!r} (the rows of "
                            f"capitals.jsonl have: country, choices, answer)")


def test_a_suite_template_set_in_an_included_yaml_is_named_there(tmp_path):
    suite = tmp_path / "recipes/evals/s"
    shutil.copytree(ROOT / "recipes/evals/tb_basic", suite)
    yaml = suite / "tb_capitals_mc.yaml"
    text = yaml.read_text().replace("{{country}}", "{{contry}}")
    base = suite / "base.yaml.inc"
    base.write_text("\n".join(x for x in text.splitlines() if x.startswith("doc_to_text")) + "\n")
    yaml.write_text("include: base.yaml.inc\n" + "\n".join(x for x in text.splitlines()
                                                          if not x.startswith("doc_to_text")) + "\n")
    with pytest.raises(TunebuildError, match=r"base\.yaml\.inc: doc_to_text: 'contry' is undefined"):
        evaluate.check_local_suite(suite)
    evaluate.check_local_suite(ROOT / "recipes/evals/tb_basic")
    evaluate.check_local_suite(ROOT / "recipes/evals/tb_subjects")


def test_head_rows_reads_the_start_of_a_large_json_list(tmp_path):
    from pipeline.data.read import head_rows, read_rows

    rows = [{"instruction": f"task {i}", "input": "", "output": "x" * 200} for i in range(8000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    assert path.stat().st_size > 1 << 20
    assert head_rows(path, 20) == [r for _, r in read_rows(path)][:20] == rows[:20]
    assert head_rows(DATA_PAIRS, 3) == [r for _, r in read_rows(DATA_PAIRS)][:3]


DATA_PAIRS = ROOT / "recipes/data/dpo_pairs_sample.jsonl"
