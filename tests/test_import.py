"""The import stage for real: each shipped sample format, auto detection and its refusal, bad-row policies,
ROUGE dedup of an imported Chinese file, and a hub source offline (through doit: one line, no traceback)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, copy_project, run_doit
from pipeline.core.recipe.schema import SCHEMA
from pipeline.errors import TunebuildError
from pipeline.stages import import_data

DATA = ROOT / "recipes" / "data"


def config(**over):
    c = {k: (v.default if not isinstance(v.default, (dict, list)) else type(v.default)(v.default))
         for k, v in SCHEMA["data"].schema.items() if k != "source"}
    c.update({"heldout_fraction": 0.0, **over})
    return c


def run(tmp_path, file, name="out", **over):
    out = tmp_path / name
    out.mkdir()
    report = import_data.run(out, config=config(**over), where=f"t.toml: data.{name}", file=file)
    records = [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return report, records, out


@pytest.mark.parametrize("file, fmt, kind", [
    ("alpaca_sample.json", "alpaca", "sft"), ("dolly_sample.jsonl", "dolly", "sft"),
    ("sharegpt_zh_sample.json", "sharegpt", "sft"), ("dpo_zh_sample.json", "sharegpt_ranking", "preference"),
    ("dpo_pairs_sample.jsonl", "preference", "preference")])
def test_each_sample_imports_with_auto_detection(tmp_path, capsys, file, fmt, kind):
    rows = len(json.loads((DATA / file).read_text())) if file.endswith(".json") else \
        len((DATA / file).read_text().splitlines())
    report, records, out = run(tmp_path, DATA / file)
    assert f"format detected as '{fmt}'" in capsys.readouterr().out
    assert report["format"] == fmt and report["kind"] == kind and report["rows_read"] == rows == len(records)
    assert 20 <= rows <= 60 and report["bad_rows"] == 0
    for r in records:
        if kind == "sft":
            roles = [m["role"] for m in r["messages"]]
            assert roles[-1] == "assistant" and "user" in roles and set(roles) <= {"system", "user", "assistant"}
        else:
            assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
            assert r["chosen"] != r["rejected"]
    assert report["lengths"]["response_chars"]["max"] > 0 and (out / "lengths.png").stat().st_size > 1000


def test_sharegpt_roles_system_and_multi_turn(tmp_path):
    _, records, _ = run(tmp_path, DATA / "sharegpt_zh_sample.json", format="sharegpt")
    assert any(r["messages"][0]["role"] == "system" for r in records)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in records)
    assert all("from" not in m and "value" not in m for r in records for m in r["messages"])


def test_ranking_form_becomes_prompt_chosen_rejected(tmp_path):
    row = json.loads((DATA / "dpo_zh_sample.json").read_text())[0]
    _, records, _ = run(tmp_path, DATA / "dpo_zh_sample.json", format="sharegpt_ranking")
    assert records[0]["prompt"][-1] == {"role": "user", "content": row["conversations"][-1]["value"]}
    assert records[0]["chosen"] == [{"role": "assistant", "content": row["chosen"]["value"]}]
    assert records[0]["rejected"] == [{"role": "assistant", "content": row["rejected"]["value"]}]


def test_auto_refuses_an_ambiguous_file(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi.",
                             "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})
                 + "\n")
    with pytest.raises(TunebuildError, match="ambiguous"):
        run(tmp_path, f)
    g = tmp_path / "other.jsonl"
    g.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(TunebuildError, match="cannot recognise the format"):
        run(tmp_path, g, name="out2")


def test_bad_rows_stop_the_import_or_are_skipped_and_counted(tmp_path, capsys):
    rows = json.loads((DATA / "alpaca_sample.json").read_text())[:10]
    rows[3]["output"] = ""
    rows[7] = {"instruction": "Name a colour.", "input": ""}
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(TunebuildError) as e:
        run(tmp_path, f, format="alpaca")
    msg = str(e.value)
    assert f"{f.as_posix()}:4: output: " in msg and f"{f.as_posix()}:8: output: " in msg and "\n" not in msg
    assert "on_bad_row = 'skip'" in msg
    report, records, out = run(tmp_path, f, name="skip", format="alpaca", on_bad_row="skip")
    assert report["bad_rows"] == 2 and len(records) == 8 and report["dropped_by_reason"] == {"bad row": 2}
    assert "skipped 2 bad row(s) of 10" in capsys.readouterr().out
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    assert [d["row"] for d in dropped] == [4, 8]


def test_dedup_of_an_imported_chinese_file(tmp_path):
    rows = [{"instruction": "请写一首关于秋天的诗", "output": "秋风起，落叶飞。"},
            {"instruction": "请写一首关于秋天的短诗", "output": "金风送爽。"},          # near-duplicate of row 1
            {"instruction": "解释光合作用的基本过程和意义", "output": "植物利用光能合成有机物。"},
            {"instruction": "把下面的句子翻译成英文", "input": "你好", "output": "Hello"}]
    f = tmp_path / "zh.json"
    f.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    report, records, out = run(tmp_path, f, dedup=True, language="zh")
    assert [r["row"] for r in records] == [1, 3, 4] and report["dedup_dropped"] == 1
    dropped = json.loads((out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert dropped["row"] == 2 and dropped["most_similar"] == rows[0]["instruction"] and dropped["score"] > 0.7
    assert (out / "similarity.png").stat().st_size > 1000
    _, en_records, _ = run(tmp_path, f, name="en", dedup=True)  # English tokens see no overlap in Chinese
    assert len(en_records) == 4


def test_limit_shuffle_and_split_are_stable(tmp_path):
    a, ra, oa = run(tmp_path, DATA / "dolly_sample.jsonl", name="a", limit=12, shuffle_seed=3, heldout_fraction=0.3)
    b, rb, ob = run(tmp_path, DATA / "dolly_sample.jsonl", name="b", limit=12, shuffle_seed=3, heldout_fraction=0.3)
    assert a["rows_used"] == 12 and (oa / "train.jsonl").read_bytes() == (ob / "train.jsonl").read_bytes()
    assert a["train_examples"] + a["heldout_examples"] == 12 and a["heldout_examples"] > 0
    assert [r["row"] for r in ra] != sorted(r["row"] for r in ra)  # shuffled
    assert all("category" in r for r in ra)


def test_a_hub_source_offline_fails_in_one_line(tmp_path):
    project = copy_project(tmp_path, recipes=())
    (project / "recipes" / "hub.toml").write_text(
        'extends = "alpaca_lora_demo.toml"\n[data.alpaca]\nsource = "vicgalle/alpaca-gpt4"\n')
    (project / "recipes" / "alpaca_lora_demo.toml").write_text((ROOT / "recipes/alpaca_lora_demo.toml").read_text())
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    _, _, out, rc = run_doit(project, "import:hub.alpaca", env=env, check=False)
    assert rc != 0 and "Traceback" not in out, out
    assert ("import:hub.alpaca: cannot run here: hub.toml: data.alpaca.source: hub dataset "
            "'vicgalle/alpaca-gpt4' (split 'train') cannot be loaded: not in the local cache and HF_HUB_OFFLINE is set") in out, out


def test_recipe_errors_name_the_data_key(tmp_path):
    project = copy_project(tmp_path, recipes=("alpaca_lora_demo.toml",))
    base = (project / "recipes/alpaca_lora_demo.toml").read_text()
    for extra, message in [
        ('[data.x]\nsource = "data/missing.json"\n', "data.x.source: file 'data/missing.json' does not exist"),
        ('[data.x]\nsource = "../../etc/passwd.json"\n', "data.x.source: '../../etc/passwd.json' is outside"),
        ('[data.x]\nsource = "data/alpaca_sample.json"\nformat = "alpacca"\n', "data.x.format: expected one of"),
        ('[data.x]\nsource = "data/alpaca_sample.json"\nformat = "alpaca"\ncolumns = {prompt_text = "q"}\n',
         "data.x.columns: "),
        ('[data.x]\nsource = "generate"\nlimit = 5\n', "data.x.limit: not used with source = 'generate'"),
        ('[data.x]\nsource = "data/alpaca_sample.json"\nspilt = "train"\n', "unknown key 'data.x.spilt'"),
    ]:
        (project / "recipes/alpaca_lora_demo.toml").write_text(base + extra)
        proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=project, capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
    (project / "recipes/alpaca_lora_demo.toml").write_text(base.replace('data = ["alpaca"]', 'data = ["alpacas"]'))
    proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=project, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "sft.data[0]: no dataset named 'alpacas' (the recipe's [data.<name>] tables: alpaca)" in proc.stderr


@pytest.mark.slow
def test_alpaca_lora_demo_builds_offline_then_rebuilds_nothing(tmp_path):
    project = copy_project(tmp_path, recipes=("alpaca_lora_demo.toml",))
    env = {"HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": ""}
    executed, _, out, _ = run_doit(project, "build:alpaca_lora_demo", env=env)
    assert {"import:alpaca_lora_demo.alpaca", "sft:alpaca_lora_demo.sft", "merge:alpaca_lora_demo.sft",
            "evaluate:alpaca_lora_demo.sft.heldout", "scores:alpaca_lora_demo"} <= set(executed), out
    assert not any(t.startswith(("generate:", "filter:")) for t in executed)
    summary = json.loads((project / "artifacts/alpaca_lora_demo/sft/sft/train_summary.json").read_text())
    data = json.loads((project / "artifacts/alpaca_lora_demo/data/alpaca/report.json").read_text())
    assert summary["examples"] == data["train_examples"] > 30 and summary["steps"] == 60
    import duckdb
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    loss = dict(con.execute("SELECT model, value FROM scores WHERE recipe = 'alpaca_lora_demo' "
                            "AND metric = 'loss'").fetchall())
    digests = {r[0] for r in con.execute("SELECT dataset_digest FROM scores WHERE recipe = 'alpaca_lora_demo' "
                                         "AND model = 'sft'").fetchall()}
    assert loss["sft"] < loss["base"] and len(digests) == 1 and None not in digests
    executed, _, out, _ = run_doit(project, "build:alpaca_lora_demo", env=env)
    assert executed == [], out
