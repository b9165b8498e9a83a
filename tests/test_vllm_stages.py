"""The stages on `engine = "vllm"` (issue 23): the judge's answers, the local LLM backend (the self-instruct
generator, a local judge) and an lm-eval suite through lm-eval's `vllm` model type, each next to the default HF
engine on the same model, and a recipe built end to end with doit.

These need vLLM and skip without it (the project's venv); CI runs them in the second venv, `.venv-vllm` (README:
Generation engines). The model is conftest's `wide_model`, a tiny Llama with heads of 32 (the built-in tiny model's
16 vLLM's CPU kernel refuses). Tolerance for greedy answers and for scores: none, they must be equal. Both engines
run in float32 here, where vLLM's log-probabilities differ from transformers' by at most ~1.5e-5 while the
likeliest two tokens are at least ~3.5e-3 apart on this model (test_vllm_engine), so no argmax can flip. Sampled
answers are not compared across engines (their random streams differ): only that each engine's are seeded per
request. lm-eval's log-likelihoods agree to 1e-3 (the same float32 margin, summed over a continuation)."""
import json
import re

import pytest

from conftest import ROOT, copy_project, make_wide_model, run_doit
from pipeline.llm import engines
from pipeline.llm import vllm_engine

REASON = vllm_engine.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"{REASON}")

INSTRUCTIONS = ROOT / "recipes/evals/judge_instructions.jsonl"


def _answers(tmp_path, model, engine, name):
    from pipeline.stages import answers

    out = tmp_path / name
    out.mkdir()
    config = {"answer_max_tokens": 24, "judge_max_items": 6, **engines.task_settings(engine, {})[0]}
    summary = answers.run(out, model=str(model), instructions=INSTRUCTIONS, config=config)
    return [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()], summary


def test_the_answers_stage_on_vllm_equals_the_hf_engine(tmp_path, wide_model):
    hf, hf_summary = _answers(tmp_path, wide_model, "hf", "hf")
    vl, vl_summary = _answers(tmp_path, wide_model, "vllm", "vllm")
    assert len({r["answer"] for r in hf}) > 3 and sum(len(r["answer"]) for r in hf) > 60  # answers, not one byte
    assert vl == hf
    assert hf_summary["engine"] == "hf" and vl_summary["engine"] == f"vllm {vllm_engine._distribution_version()}"


def test_the_local_backend_on_vllm(tmp_path, wide_model):
    from pipeline.llm.client import make_client

    config = {"backend": "local", "model": "models/wide", "concurrency": 1, "price_per_1k_tokens": 0.0}
    ledger = tmp_path / "ledger.sqlite"
    hf = make_client(config, generator=str(wide_model), ledger=ledger)
    vl = make_client({**config, "engine": "vllm"}, generator=str(wide_model), ledger=ledger)
    # a vLLM answer is never taken from the ledger for an HF request, or the reverse
    assert vl.model_id == f"{hf.model_id} (vllm {vllm_engine._distribution_version()})"
    prompts = [f"Question {i}: name {'a colour ' * i}please." for i in range(6)]
    greedy = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "stop": []}
    try:
        assert vl.complete_many(prompts, greedy) == hf.complete_many(prompts, greedy)
        assert vl.usage.sent == hf.usage.sent == 6
        # sampling is seeded per request: the same answers in another order, in another batch
        sampled = {"max_tokens": 16, "temperature": 0.8, "top_p": 0.9, "stop": []}
        one = vl.backend.complete_batch(prompts, sampled, 0)
        two = vl.backend.complete_batch(prompts[::-1], sampled, 0)[::-1]
        assert [e.text for e in one] == [e.text for e in two] and len({e.text for e in one}) > 1
        assert [e.text for e in one] != [e.text for e in vl.backend.complete_batch(prompts, sampled, 1)]
        # a longer prompt than the engine was started for: it restarts with room for it
        assert len(vl.complete_many(["word " * 400], greedy)[0]) > 0
    finally:
        vl.close()


def _evaluate(tmp_path, model, engine):
    from pipeline.stages import evaluate

    out = tmp_path / engine
    out.mkdir()
    suite = {"tasks": ["tb_capitals_mc", "tb_arithmetic_gen"], "include_path": "evals/tb_basic", "num_fewshot": 0,
             "limit": 6, "apply_chat_template": False, "max_gen_toks": 8}
    keyed, run = engines.task_settings(engine, {"max_model_len": 512})
    evaluate.run(out, model=str(model), suite=suite, include_path=ROOT / "recipes/evals/tb_basic",
                 config={"batch_size": 4, "device": "auto", "suite": suite, **keyed}, engine_run=run)
    return out


def test_an_lm_eval_suite_on_vllm_scores_as_hf_and_is_never_paired_with_it(tmp_path, wide_model):
    from pipeline.errors import TunebuildError
    from pipeline.stages.scores import check_comparable, documents_of, eval_config_of, items_for, rows_for

    hf, vl = _evaluate(tmp_path, wide_model, "hf"), _evaluate(tmp_path, wide_model, "vllm")
    results = {k: json.loads((p / "results.json").read_text()) for k, p in (("hf", hf), ("vllm", vl))}
    version = vllm_engine._distribution_version()
    assert results["vllm"]["eval_config"]["engine"] == f"vllm {version}"
    assert results["vllm"]["eval_config"]["max_model_len"] == 512 and results["vllm"]["packages"]["vllm"] == version
    assert "engine" not in results["hf"]["eval_config"] and "vllm" not in results["hf"]["packages"]
    values = {k: {(m["task"], m["metric"], m["filter"]): m["value"] for m in r["metrics"]} for k, r in results.items()}
    assert values["vllm"] == values["hf"] and len(values["hf"]) == 3  # acc, acc_norm, exact_match
    # every document scored alike, on the same documents; yet never paired: the engine is part of the eval config
    entries = {k: {"result": str(p), "role": k, "model_ref": "m", "suite": "tb", "model": str(wide_model)}
               for k, p in (("hf", hf), ("vllm", vl))}
    per_doc = {k: [i[3:] for i in items_for("r", e)] for k, e in entries.items()}
    assert per_doc["vllm"] == per_doc["hf"] and len(per_doc["hf"]) == 18
    assert documents_of(entries["hf"]) == documents_of(entries["vllm"])
    with pytest.raises(TunebuildError, match=r"suite tb: hf and vllm were evaluated with different eval configs.*"
                                             r"eval\.engine: \(unset\) → \"vllm"):
        check_comparable("tb", eval_config_of(results["hf"], documents_of(entries["hf"])),
                         eval_config_of(results["vllm"], documents_of(entries["vllm"])), "hf", "vllm")
    assert {r["engine"] for r in rows_for("r", entries["vllm"])} == {f"vllm {version}"}
    assert {r["engine"] for r in rows_for("r", entries["hf"])} == {"hf"}


RECIPE = '''description = "evaluations and the judge's answers on vLLM"
[model]
base = "models/wide"
chat_template = "templates/chatml.jinja"
[eval]
engine = "{engine}"
heldout = false
batch_size = 4
[eval.models.twin]
model = "models/wide"
[eval.judge]
enabled = true
reference = "twin"
instructions = "evals/judge_instructions.jsonl"
prompt = "prompts/judge_pairwise.txt"
base_url = "{url}"
api_key_env = "TB_TEST_KEY"
judge_max_items = 3
answer_max_tokens = 12
[eval.suites.tb_basic]
include_path = "evals/tb_basic"
tasks = ["tb_capitals_mc", "tb_arithmetic_gen"]
limit = 4
'''


@pytest.mark.slow
def test_a_recipe_on_vllm_builds_and_its_report_names_the_engine(tmp_path):
    """Through doit: the graph keys the tasks by engine, the executor's child runs vLLM, the scores and the report
    name it. (The local judge on vLLM is test_the_local_backend_on_vllm's; here an OpenAI-style server judges.)"""
    import duckdb

    from openai_server import FakeOpenAI

    project = copy_project(tmp_path, recipes=())
    make_wide_model(project / "recipes/models/wide")
    env = {"HF_HUB_OFFLINE": "1", "TB_TEST_KEY": "k"}
    engine = f"vllm {vllm_engine._distribution_version()}"
    with FakeOpenAI(answer_fn=lambda prompt: "Both are alike. [[C]]") as server:
        (project / "recipes/v.toml").write_text(RECIPE.format(engine="vllm", url=server.url))
        executed, _, out, _ = run_doit(project, "eval:v", env=env)
    assert {"evaluate:v.base.tb_basic", "answers:v.base", "judge:v", "scores:v", "report:v"} <= set(executed), out
    assert "INFO" not in out, out  # vLLM's loading messages go to the task's log only
    # twin is the same folder: one of the two evaluations and answers comes from the run cache
    for stage in ("evaluate", "answers"):
        assert out.count(f"restored from the run cache (artifacts/.cache/{stage}/") == 1, out
    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    assert {r[0] for r in con.execute("SELECT DISTINCT engine FROM scores WHERE recipe = 'v'").fetchall()} == {engine}
    assert con.execute("SELECT DISTINCT engine_a, engine_b FROM comparison").fetchall() == [(engine, engine)]
    con.close()
    report = (project / "artifacts/report/v/comparison.md").read_text()
    assert f"| tb_basic | tb_capitals_mc | acc | {engine} |" in report
    assert f"The answers were generated by the {engine} engine." in report
    assert json.loads((project / "artifacts/v/judge/results.json").read_text())["answers_engine"] == engine
    # back on the HF engine, every task that generated is out of date, and says why
    (project / "recipes/v.toml").write_text(RECIPE.format(engine="hf", url=server.url))
    _, _, why, _ = run_doit(project, "why", "eval:v", env=env)
    for task in ("evaluate:v.base.tb_basic", "answers:v.base"):
        assert re.search(rf"^{re.escape(task)} +will run +config engine: \"vllm\" → \(unset\)$", why, re.M), why
    assert 'config engine_version: "vllm ' in why, why
