"""Numbers that say what they are (issue 18, part 3): no verdict is its own outcome, empty answers are counted,
better / worse only where a paired CI excludes 0, n is never None, base → final, held-out preference pairs are
scored, a suite's data is part of its eval config, and gc removes a deleted recipe's rows."""
import csv
import json
import re
import shutil

import duckdb
import pytest

from conftest import ROOT, copy_project, run_doit
from openai_server import FakeOpenAI
from pipeline.llm.client import make_client
from pipeline.stages import answers as answers_stage
from pipeline.stages import evaluate, heldout, judge, report, scores, sweep

PROMPT = ROOT / "recipes/prompts/judge_pairwise.txt"
NO_VERDICT = "Both answers have merits; I cannot decide."


def write_answers(folder, texts):
    folder.mkdir(parents=True)
    with open(folder / "answers.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "answer": t}) + "\n")
    return folder


def judge_config(url, **over):
    return {"mode": "pairwise", "backend": "openai", "model": "judge-model", "api": "chat", "base_url": url,
            "api_key_env": "TB_TEST_KEY", "concurrency": 4, "price_per_1k_tokens": 0.0, **over}


def run_judge(tmp_path, answer_fn, cand, ref, name="judge", **over):
    out = tmp_path / name
    out.mkdir()
    with FakeOpenAI(answer_fn=answer_fn) as server:
        config = judge_config(server.url, **over)
        client = make_client(config, generator=None, ledger=tmp_path / f"{name}.sqlite", recipe="t")
        result = judge.judge(out, candidate=cand, reference=ref, prompt=PROMPT, config=config, client=client,
                             candidate_name="dpo", reference_name="base")
    return result, out


def between(prompt, start, end):
    return prompt.split(start, 1)[1].split(end, 1)[0].strip()


def longer_wins_but_q3(prompt):
    """The longer answer wins, except for question 3, where the judge gives no verdict in either order."""
    if "question 3" in prompt:
        return NO_VERDICT
    a = between(prompt, "[The Start of Assistant A's Answer]", "[The End")
    b = between(prompt, "[The Start of Assistant B's Answer]", "[The End")
    return "[[A]]" if len(a) > len(b) else ("[[B]]" if len(b) > len(a) else "[[C]]")


def test_a_judge_without_verdicts_is_no_tie(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    cand = write_answers(tmp_path / "cand", ["a long detailed answer", "short", "same", "a longer answer"])
    ref = write_answers(tmp_path / "ref", ["brief", "a long reference answer", "same", "tiny"])
    # nothing but no verdicts: no win, tie or loss, no score; the no-verdict rate says it, and a warning
    result, out = run_judge(tmp_path, lambda p: NO_VERDICT, cand, ref)
    m = result["metrics"]
    assert m["no_verdict_rate"] == 1.0
    assert m["tie_rate"] is None and m["win_rate"] is None and m["score"] is None and m["lc_win_rate"] is None
    assert result["judged"] == 0 and result["metric_n"]["win_rate"] == 0 and result["metric_n"]["no_verdict_rate"] == 4
    verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [(v["outcome"], v["result"]) for v in verdicts] == [(None, "no_verdict")] * 4
    printed = capsys.readouterr().out
    assert "judge: dpo vs base: 0 of 4 instructions judged, no_verdict_rate 1.000" in printed
    assert "judge: warning: the judge gave no verdict on 4 of 4 (no_verdict_rate 1.000, above " \
           "eval.judge.max_no_verdict_rate = 0.2)" in printed
    # one of four without a verdict: the rates are over the three judged (n = 3)
    result, _ = run_judge(tmp_path, longer_wins_but_q3, cand, ref, name="partial")
    m = result["metrics"]
    assert m["no_verdict_rate"] == 0.25 and result["metric_n"]["win_rate"] == 3
    assert (m["win_rate"], m["tie_rate"], m["loss_rate"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert m["score"] == pytest.approx(0.5) and "warning" in capsys.readouterr().out  # 0.25 > 0.2
    result, _ = run_judge(tmp_path, longer_wins_but_q3, cand, ref, name="tolerant", max_no_verdict_rate=0.3)
    assert result["warning"] is None and "warning" not in capsys.readouterr().out


def _judge_scores(tmp_path, judge_out, db):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "weights").write_text("w")
    out = tmp_path / "scores-out"
    out.mkdir(exist_ok=True)
    scores.run(out, recipe="r", entries=[], db=db,
               judge={"result": str(judge_out), "model": str(model), "model_ref": "r/dpo", "role": "dpo",
                      "reference": "base", "prompt": str(PROMPT)})


def test_no_verdict_in_the_store_the_report_and_the_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    cand = write_answers(tmp_path / "answers/dpo", [""] * 6)   # six empty answers, as a DPO model gave
    ref = write_answers(tmp_path / "answers/base", [f"answer {i}" for i in range(6)])
    _, judge_out = run_judge(tmp_path, lambda p: NO_VERDICT, cand, ref)
    db = tmp_path / "scores.duckdb"
    _judge_scores(tmp_path, judge_out, db)
    con = duckdb.connect(str(db), read_only=True)
    rows = {m: (v, n) for m, v, n in con.execute("SELECT metric, value, n FROM scores WHERE suite = 'judge'")
            .fetchall()}
    con.close()
    assert rows["no_verdict_rate"] == (1.0, 6) and rows["tie_rate"] == (None, 0) and rows["score"] == (None, 0)
    plotted = {}
    import pipeline.evaluation.plots

    real = pipeline.evaluation.plots.bar_chart
    monkeypatch.setattr(pipeline.evaluation.plots, "bar_chart", lambda path, labels, series, **kw: (
        plotted.update(series=series, colors=kw["colors"]), real(path, labels, series, **kw)))
    out = tmp_path / "report"
    out.mkdir()
    report.run(out, recipe="r", db=db, scores=tmp_path / "scores-out",
               answers={"base": str(ref), "dpo": str(cand)}, config={"max_no_verdict_rate": 0.2, "stages": []})
    text = (out / "comparison.md").read_text()
    assert "| no_verdict_rate | 1.0000 | 6 |" in text and "| tie_rate | — | 0 |" in text
    assert "| score | — | 0 |" in text and "| score | 0.5000 |" not in text
    assert "0 judged, 6 without a verdict" in text
    assert "> **Warning**: the judge gave no verdict on 6 of 6 (no_verdict_rate 1.000, above " \
           "eval.judge.max_no_verdict_rate = 0.2): nothing was judged." in text
    # the bar is a "no verdict" one, not a grey tie
    assert plotted["series"] == {"win": [0.0], "tie": [0.0], "loss": [0.0], "no verdict": [1.0]}
    assert plotted["colors"][3] != plotted["colors"][1] and (out / "judge.png").stat().st_size > 2000
    # empty answers are counted and called out
    assert "Answers to the judge's instructions: base 6 (0 empty); dpo 6 (6 empty)." in text
    assert "> **Warning**: 6 of dpo's 6 answers are empty" in text


def test_the_sweep_table_scores_only_what_was_judged(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_TEST_KEY", "k")
    cand = write_answers(tmp_path / "cand", ["a long detailed answer", "short", "a longer answer"])
    ref = write_answers(tmp_path / "ref", ["brief", "a long reference answer", "tiny"])
    _, silent = run_judge(tmp_path, lambda p: NO_VERDICT, cand, ref, name="silent")
    _, judged = run_judge(tmp_path, longer_wins_but_q3, cand, ref, name="judged")
    db = tmp_path / "scores.duckdb"
    (tmp_path / "s").mkdir()
    scores.run(tmp_path / "s", recipe="s.a", entries=[], db=db)  # the tables, empty
    out = tmp_path / "sweep"
    out.mkdir()
    variants = [{"variant": f"s.{x}", "final": "sft", "axes": [{"key": "train.sft.max_steps", "value": v}]}
                for x, v in (("a", 1), ("b", 2))]
    sweep.run(out, sweep="s", variants=variants, baseline="s.a", db=db, scores={},
              judges={"s.a": str(judged), "s.b": str(silent)}, data={})
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "sweep.csv", encoding="utf-8"))}
    assert rows["b"]["score"] == "" and rows["b"]["win rate"] == "" and rows["b"]["judged"] == "0"
    assert float(rows["b"]["no verdict rate"]) == 1.0
    assert float(rows["a"]["score"]) == pytest.approx(2 / 3) and rows["a"]["judged"] == "3"
    assert "| b | 2 | 0 | 0 | 1 |  |  |" in (out / "sweep.md").read_text()


def test_the_answers_stage_counts_empty_answers(tmp_path, tiny_model, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    silent = tmp_path / "silent"   # the tiny model with its final norm zeroed: every logit 0, it says nothing
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        lm.model.norm.weight.zero_()
    lm.save_pretrained(silent)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(silent)
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"id": f"i{k}", "instruction": f"Say {k}."}) + "\n"
                                    for k in range(3)))
    out = tmp_path / "out"
    out.mkdir()
    answers_stage.run(out, model=str(silent), instructions=instructions,
                      config={"answer_max_tokens": 4, "judge_max_items": 0})
    assert [json.loads(x)["answer"] for x in (out / "answers.jsonl").read_text().splitlines()] == [""] * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"answers": 3, "empty": 3, "empty_ids": ["i0", "i1", "i2"], "engine": "hf"}
    assert 'answers: 3 answers (hf), 3 empty (""): every answer is empty' in capsys.readouterr().out


def _heldout_result(folder, losses, *, model_dir):
    """A held-out evaluation's artifact as the heldout stage writes it (per-item losses)."""
    (folder / "samples").mkdir(parents=True)
    mean = sum(losses) / len(losses)
    (folder / "results.json").write_text(json.dumps({
        "eval_config": {"heldout_max_items": 200, "chat_template": "t"}, "packages": {"torch": "x"},
        "higher_is_better": {"heldout": {"loss": False}},
        "metrics": [{"task": "heldout", "subject": "", "metric": "loss", "filter": "", "value": mean,
                     "stderr": 0.01, "n": len(losses)}]}))
    with open(folder / "samples/heldout.jsonl", "w") as f:
        for i, x in enumerate(losses):
            f.write(json.dumps({"doc_id": i, "doc_hash": f"h{i}", "filter": "", "metrics": ["loss"], "loss": x})
                    + "\n")
    return {"role": folder.name, "model_ref": folder.name, "suite": "heldout", "result": str(folder),
            "model": str(model_dir), "dataset": None, "categories": None}


def test_better_or_worse_only_when_the_paired_ci_excludes_zero(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "w").write_text("w")
    base = [5.1, 5.3, 4.9, 5.2, 5.0, 5.4, 4.8, 5.1]
    wobble = [0.02, -0.03, 0.01, -0.02, 0.03, -0.01, 0.02, -0.01995]   # mean +5e-6: noise, not a change
    entries = [_heldout_result(tmp_path / "base", base, model_dir=model),
               _heldout_result(tmp_path / "sft", [x + d for x, d in zip(base, wobble)], model_dir=model),
               _heldout_result(tmp_path / "dpo", [x - 0.2 - d / 10 for x, d in zip(base, wobble)], model_dir=model)]
    db = tmp_path / "scores.duckdb"
    (tmp_path / "s").mkdir()
    scores.run(tmp_path / "s", recipe="r", entries=entries, db=db, pairs=[["base", "sft"], ["base", "dpo"]])
    out = tmp_path / "report"
    out.mkdir()
    report.run(out, recipe="r", db=db, scores=tmp_path / "s", config={})
    text = (out / "comparison.md").read_text()
    noise, change = [x for x in text.splitlines() if x.startswith("| heldout | heldout | loss |")]
    assert "| 0.0000 | [-0.0" in noise and noise.endswith("| CI contains 0 |"), noise  # base vs sft: +6e-6
    assert "better" not in noise and "worse" not in noise
    assert re.search(r"\| -0\.2\d+ \| \[-0\.2\d+, -0\.1\d+\] \| better \|$", change), change  # base vs dpo
    # and the paired summary counts a lower loss as an improvement
    summary = text.split("### base → dpo · heldout · loss", 1)[1].split("| macro", 1)[0]
    assert re.search(r"\| -0\.2\d+ \(heldout\) \| 1/1 \|", summary), summary


def test_n_of_a_group_is_counted_never_none(tmp_path, tiny_model):
    out = tmp_path / "eval"
    out.mkdir()
    evaluate.run(out, model=str(tiny_model), suite={"tasks": ["tb_subjects"], "num_fewshot": 0, "limit": 3,
                                                    "apply_chat_template": False, "max_gen_toks": 0},
                 include_path=ROOT / "recipes/evals/tb_subjects", config={"batch_size": 8, "device": "cpu"})
    group = next(m for m in json.loads((out / "results.json").read_text())["metrics"] if m["task"] == "tb_subjects")
    assert group["n"] is None  # lm-eval counts no documents for a group
    entries = [{"role": role, "model_ref": role, "suite": "subjects", "result": str(out), "model": str(tiny_model),
                "dataset": None, "categories": str(ROOT / "recipes/evals/tb_subjects/categories.json")}
               for role in ("base", "sft")]
    db = tmp_path / "scores.duckdb"
    (tmp_path / "s").mkdir()
    scores.run(tmp_path / "s", recipe="r", entries=entries, db=db, pairs=[["base", "sft"]])
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT n FROM scores WHERE task = 'tb_subjects'").fetchall() == [(18,), (18,)]
    con.close()
    (tmp_path / "report").mkdir()
    report.run(tmp_path / "report", recipe="r", db=db, scores=tmp_path / "s", config={})
    text = (tmp_path / "report/comparison.md").read_text()
    assert "| subjects | tb_subjects | acc | hf | 18 |" in text and "None" not in text


def test_base_to_final_and_training_curves_in_training_order(tmp_path):
    from pipeline.core.graph import Project

    project = copy_project(tmp_path, recipes=("zh_dpo_demo.toml",))
    plan = Project(project).plans["zh_dpo_demo"]
    kwargs = {t["basename"]: t["actions"][0][2] for t in plan.tasks if t["basename"] in ("scores", "report")}
    assert kwargs["scores"]["params"]["pairs"] == [["base", "sft"], ["sft", "dpo"], ["base", "dpo"]]
    assert kwargs["report"]["config"]["stages"] == ["sft", "dpo"]
    # the curves come in that order, not by name (dpo < sft)
    logs = {}
    for stage, rows in (("sft", [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]),
                        ("dpo", [{"step": 1, "loss": 0.7, "rewards/margins": 0.1, "rewards/accuracies": 1.0}])):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        logs[stage] = str(tmp_path / stage)
    db = tmp_path / "scores.duckdb"
    (tmp_path / "s").mkdir()
    scores.run(tmp_path / "s", recipe="r", entries=[], db=db, logs=logs)
    (tmp_path / "report").mkdir()
    text = report.render_curves("r", db, tmp_path / "report", ["sft", "dpo"])
    assert text.index("### sft:") < text.index("### dpo:")


def test_held_out_preference_pairs_are_scored(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "dpo_data"
    data.mkdir()
    pairs = [{"prompt": [{"role": "user", "content": f"What is {k} + {k}?"}],
              "chosen": [{"role": "assistant", "content": f"{2 * k}."}],
              "rejected": [{"role": "assistant", "content": f"It is {2 * k + 1}, I think."}]} for k in range(4)]
    (data / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    template = tmp_path / "chatml.jinja"
    template.write_text((ROOT / "recipes/templates/chatml.jinja").read_text())
    out = tmp_path / "base"
    out.mkdir()
    heldout.run(out, model=str(tiny_model), data={"dpo_data": data}, chat_template=template,
                config={"heldout_max_items": 200})
    result = json.loads((out / "results.json").read_text())
    got = {m["metric"]: m for m in result["metrics"]}
    assert set(got) == {"preference_accuracy", "margin"} and got["margin"]["n"] == 4
    samples = [json.loads(x) for x in (out / "samples/heldout_preference.jsonl").read_text().splitlines()]
    # the chosen answer's log-prob, summed over its tokens, as computed here by hand
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = template.read_text()
    lm = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = tok.apply_chat_template(pairs[0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(pairs[0]["prompt"] + pairs[0]["chosen"], tokenize=True, return_dict=False)
    with torch.no_grad():
        logp = torch.log_softmax(lm(torch.tensor([full])).logits[0, :-1], -1)
    expected = float(sum(logp[i - 1, full[i]] for i in range(len(prompt), len(full))))
    assert samples[0]["chosen_logp"] == pytest.approx(expected, abs=1e-4)
    for s in samples:
        assert s["margin"] == pytest.approx(s["chosen_logp"] - s["rejected_logp"], abs=1e-5)
        assert s["preference_accuracy"] == float(s["margin"] > 0)
    assert got["preference_accuracy"]["value"] == pytest.approx(sum(s["preference_accuracy"] for s in samples) / 4)
    # paired statistics like every other metric
    entries = [{"role": role, "model_ref": role, "suite": "heldout", "result": str(out), "model": str(tiny_model),
                "dataset": None, "categories": None} for role in ("base", "dpo")]
    paired = scores.paired_rows("r", entries, [i for e in entries for i in scores.items_for("r", e)],
                                [["base", "dpo"]])
    assert {(r["metric"], r["level"], r["name"], r["n"]) for r in paired if r["average"] in (None, "micro")} == {
        ("margin", "subject", "heldout_preference", 4), ("margin", "overall", "all", 4),
        ("preference_accuracy", "subject", "heldout_preference", 4), ("preference_accuracy", "overall", "all", 4)}


def test_a_suite_data_edit_changes_the_eval_config(tmp_path, tiny_model):
    suite = tmp_path / "recipes/evals/tb_basic"
    shutil.copytree(ROOT / "recipes/evals/tb_basic", suite)
    entries = {}
    for name in ("before", "after"):
        if name == "after":  # one row of the JSONL edited
            data = suite / "capitals.jsonl"
            data.write_text(data.read_text().replace('"country": "Japan"', '"country": "Nippon"', 1))
        out = tmp_path / name
        out.mkdir()
        evaluate.run(out, model=str(tiny_model), suite={"tasks": ["tb_capitals_mc"], "num_fewshot": 0, "limit": 3,
                                                        "apply_chat_template": False, "max_gen_toks": 0},
                     include_path=suite, config={"batch_size": 8, "device": "cpu"})
        entries[name] = {"role": name, "model_ref": "tiny", "suite": "tb_basic", "result": str(out),
                         "model": str(tiny_model), "dataset": None, "categories": None}
    before, after = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("before", "after"))
    assert before["configs"] == after["configs"]   # lm-eval's resolved configs name the file, not its rows
    digests = {n: {r["eval_config_digest"] for r in scores.rows_for("r", e)} for n, e in entries.items()}
    assert len(digests["before"]) == len(digests["after"]) == 1 and digests["before"] != digests["after"]
    items = [i for e in entries.values() for i in scores.items_for("r", e)]
    with pytest.raises(Exception, match=r"suite tb_basic: before and after were evaluated with different eval "
                                        r"configs, so they are not compared: data\.tb_capitals_mc: "):
        scores.paired_rows("r", list(entries.values()), items, [["before", "after"]])


def test_gc_removes_a_deleted_recipes_rows(tmp_path):
    project = copy_project(tmp_path, recipes=("demo.toml", "mini_lima.toml"))
    (project / "artifacts").mkdir()
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"))
    con.execute(scores.SCHEMA)
    for recipe in ("demo", "gone"):  # a current recipe and one whose file was deleted
        con.execute("INSERT INTO scores (recipe, model, suite, task, subject, metric, filter, value, n) VALUES "
                    "(?, 'base', 'tb_basic', 'tb_capitals_mc', '', 'acc', 'none', 0.5, 4)", [recipe])
        con.execute("INSERT INTO pairs VALUES (?, 'base', 'sft', 0)", [recipe])
        con.execute("INSERT INTO train_log VALUES (?, 'sft', 1, 0.1, 'loss', 5.0)", [recipe])
    con.execute("INSERT INTO items VALUES ('gone', 'base', 'tb_basic', 'tb_capitals_mc', 'acc', 'none', 'h', 0, 1)")
    con.close()
    env = {"HF_HUB_OFFLINE": "1"}
    _, _, out, _ = run_doit(project, "gc", env=env)
    assert "rows of recipe 'gone' (items 1, pairs 1, scores 1, train_log 1; no current recipe has that name)" in out
    assert "4 row(s) of 1 deleted recipe(s) in artifacts/scores.duckdb would be deleted" in out, out
    _, _, out, _ = run_doit(project, "gc", "--yes", env=env)
    assert "deleted 4 row(s) of 1 deleted recipe(s) from artifacts/scores.duckdb: gone" in out, out
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    for table in ("scores", "pairs", "train_log", "items"):
        assert con.execute(f"SELECT count(*) FROM {table} WHERE recipe = 'gone'").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM scores WHERE recipe = 'demo'").fetchone()[0] == 1
    con.close()
    _, _, out, _ = run_doit(project, "gc", env=env)
    assert "rows of recipe" not in out, out


DPO_ONLY = """description = "DPO only, from the base, on Chinese preference pairs (10% held out by default)"
[model]
base = "builtin:tiny"
chat_template = "templates/qwen.jinja"
[data.dpo_zh]
source = "data/dpo_zh_sample.json"
format = "sharegpt_ranking"
[train.dpo]
method = "dpo"
max_steps = 4
batch_size = 4
max_length = 256
logging_steps = 2
[eval]
batch_size = 16
[eval.judge]
enabled = true
instructions = "evals/judge_instructions.jsonl"
prompt = "prompts/judge_pairwise.txt"
base_url = "{url}"
api_key_env = "TB_TEST_KEY"
judge_max_items = 3
answer_max_tokens = 8
"""


@pytest.mark.slow
def test_a_dpo_only_recipe_scores_its_held_out_pairs_and_a_silent_judge_warns(tmp_path):
    project = copy_project(tmp_path, recipes=())
    with FakeOpenAI(answer_fn=lambda p: NO_VERDICT) as server:
        (project / "recipes/dpo_only.toml").write_text(DPO_ONLY.format(url=server.url))
        _, _, out, _ = run_doit(project, "build:dpo_only", env={"TB_TEST_KEY": "k", "HF_HUB_OFFLINE": "1"})
    held = json.loads((project / "artifacts/dpo_only/data/dpo_zh/report.json").read_text())
    assert held["heldout_examples"] > 0
    assert "no held-out example" not in out
    assert re.search(r"heldout: \d+ held-out preference pairs: preference_accuracy", out), out
    assert "judge: warning: the judge gave no verdict on 3 of 3" in out, out
    text = (project / "artifacts/report/dpo_only/comparison.md").read_text()
    assert re.search(r"\| heldout \| heldout_preference \| margin \| hf \| \d+ \|", text), text
    assert "### base → dpo · heldout · margin" in text
    assert "| no_verdict_rate | 1.0000 | 3 |" in text and "> **Warning**: the judge gave no verdict" in text
    assert "Answers to the judge's instructions: base 3 (" in text
