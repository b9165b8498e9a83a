"""Training stages: freeze, end-of-turn stop ids, and the three offline training recipes built for real (SFT then
DPO with reward curves, QLoRA in 4-bit on the CPU, a full fine-tune)."""
import json

import duckdb
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, copy_project, run_doit
from pipeline.errors import TunebuildError
from pipeline.finetuning import training
from pipeline.models import tiny


def test_freeze_trains_only_the_named_modules_and_last_layers(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    n = training.freeze_except(model, ["lm_head"], 1, "builtin:tiny", "train.x")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.1." in name or "lm_head" in name or "embed_tokens" in name
                             for name in trainable), trainable
    assert not any(".layers.0." in name for name in trainable)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(TunebuildError, match="train.x.freeze.last_layers: 5, but builtin:tiny has 2 layers"):
        training.freeze_except(model, [], 5, "builtin:tiny", "train.x")


def test_generation_stops_at_the_templates_end_of_turn_token():
    tok = tiny.byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<end_of_turn>"]})
    for name, marker in (("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>"), ("chatml", "<|im_end|>")):
        tok.chat_template = (ROOT / f"recipes/templates/{name}.jinja").read_text()
        ids = training.end_of_turn_ids(tok)
        assert tok.convert_tokens_to_ids(marker) in ids, (name, ids)
        assert tok.convert_tokens_to_ids("<|im_start|>") not in ids or name != "chatml"


@pytest.mark.slow
def test_sft_dpo_chain_qlora_and_full_fine_tune_build_offline(tmp_path):
    recipes = ("zh_dpo_demo.toml", "dolly_qlora_demo.toml", "mini_lima_full_demo.toml", "demo.toml", "mini_lima.toml")
    project = copy_project(tmp_path, recipes=recipes)
    executed, _, out, _ = run_doit(project, "build:zh_dpo_demo", "build:dolly_qlora_demo", "build:demo",
                                   "build:mini_lima_full_demo", env={"HF_HUB_OFFLINE": "1"},
                                   timeout=1800)  # four recipes end to end: ~12 min on a loaded 2-core machine
    executed = set(executed)
    assert {"sft:zh_dpo_demo.sft", "merge:zh_dpo_demo.sft", "dpo:zh_dpo_demo.dpo", "merge:zh_dpo_demo.dpo",
            "sft:dolly_qlora_demo.sft", "merge:dolly_qlora_demo.sft", "sft:mini_lima_full_demo.sft"} <= executed, out
    assert "merge:mini_lima_full_demo.sft" not in out  # full fine-tuning writes the model itself
    assert {"generate:demo.self_instruct", "sft:demo.sft", "report:demo"} <= executed  # mini_lima's twin
    arts = project / "artifacts"

    # base -> sft -> dpo, each compared with what it started from; DPO rewards logged, plotted and in DuckDB
    con = duckdb.connect(str(arts / "scores.duckdb"), read_only=True)
    pairs = con.execute("SELECT model_a, model_b FROM pairs WHERE recipe = 'zh_dpo_demo' ORDER BY position").fetchall()
    assert pairs == [("base", "sft"), ("sft", "dpo"), ("base", "dpo")]   # each stage with its start, base → final
    assert {r[0] for r in con.execute("SELECT DISTINCT model_b FROM paired WHERE recipe = 'zh_dpo_demo'").fetchall()} \
        == {"sft", "dpo"}
    metrics = {r[0] for r in con.execute("SELECT DISTINCT metric FROM train_log WHERE recipe = 'zh_dpo_demo' AND "
                                         "stage = 'dpo'").fetchall()}
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= metrics
    report = (arts / "report/zh_dpo_demo/comparison.md").read_text()
    assert "## zh_dpo_demo: sft vs dpo" in report and "![dpo curves](train-dpo.png)" in report
    assert (arts / "report/zh_dpo_demo/train-dpo.png").stat().st_size > 5000
    summary = json.loads((arts / "zh_dpo_demo/dpo/dpo/train_summary.json").read_text())
    assert summary["method"] == "dpo" and summary["pairs"] == 30

    # QLoRA: trained in 4-bit, merged into the full-precision base; the folder loads without bitsandbytes and
    # stops generating at ChatML's <|im_end|>
    qlora = json.loads((arts / "dolly_qlora_demo/sft/sft/train_summary.json").read_text())
    assert qlora["finetuning"] == "qlora" and qlora["steps"] == 30
    folder = arts / "dolly_qlora_demo/models/sft"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and "<|im_start|>" in tok.chat_template
    AutoModelForCausalLM.from_pretrained(folder)

    # full fine-tune: every weight moved, the model folder is the training stage's own artifact
    full = arts / "mini_lima_full_demo/models/sft"
    assert json.loads((full / "train_summary.json").read_text())["finetuning"] == "full"
    base = AutoModelForCausalLM.from_pretrained(arts / "models/builtin-tiny")
    tuned = AutoModelForCausalLM.from_pretrained(full)
    changed = [n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters()) if not a.equal(b)]
    assert len(changed) == len(list(base.parameters()))

    # every adapter (LoRA, QLoRA, the DPO one on top of the SFT model) loads where people load adapters
    from test_model_identity import assert_adapters_load
    assert_adapters_load(project, ("zh_dpo_demo", "dolly_qlora_demo", "demo"))


RESUME = """extends = "alpaca_lora_demo.toml"
[train.sft]
max_steps = 60
save_steps = 4
logging_steps = 3
batch_size = 2
[eval]
heldout = false
"""


def _kill_after_second_checkpoint(project):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "doit", "sft:r.sft"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in (project / "artifacts/.scratch/sft").glob("*/checkpoint-*")
                if (p / "trainer_state.json").is_file()]
        if len(done) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    return max(int(p.name.split("-")[1]) for p in done)


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = copy_project(tmp_path / "a", recipes=("alpaca_lora_demo.toml",))
    b = copy_project(tmp_path / "b", recipes=("alpaca_lora_demo.toml",))
    for p in (a, b):
        (p / "recipes/r.toml").write_text(RESUME)
    env = {"HF_HUB_OFFLINE": "1"}
    run_doit(b, "sft:r.sft", env=env)                                    # uninterrupted
    run_doit(a, "import:r.alpaca", "builtin:tiny", env=env)
    killed_at = _kill_after_second_checkpoint(a)
    assert killed_at >= 8 and not (a / "artifacts/r/sft/sft/manifest.json").exists()
    executed, _, out, _ = run_doit(a, "sft:r.sft", env=env)               # resumes
    assert "sft:r.sft" in executed and "resuming from checkpoint-" in out, out
    summary = json.loads((a / "artifacts/r/sft/sft/train_summary.json").read_text())
    assert summary["resumed_from_step"] >= killed_at > 0 and summary["steps"] == 60
    assert not list((a / "artifacts/.scratch/sft").glob("*"))            # the scratch folder is gone
    log_a = [json.loads(x) for x in (a / "artifacts/r/sft/sft/train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (b / "artifacts/r/sft/sft/train_log.jsonl").read_text().splitlines()]
    after = summary["resumed_from_step"]
    tail_a = [r for r in log_a if r["step"] > after]
    tail_b = [r for r in log_b if r["step"] > after]
    assert [r["step"] for r in tail_a] == [r["step"] for r in tail_b] and tail_a
    assert all(abs(x["loss"] - y["loss"]) < 1e-3 for x, y in zip(tail_a, tail_b)), (tail_a[:3], tail_b[:3])
    # the summary's loss is over all 60 steps, not only those after the resume: the same as the uninterrupted run's
    assert _summary_without_resume(a / "artifacts/r/sft/sft") == _summary_without_resume(b / "artifacts/r/sft/sft")


def _summary_without_resume(folder):
    """train_summary.json's lines but the resumed_from_step one."""
    return [x for x in (folder / "train_summary.json").read_text().splitlines() if '"resumed_from_step"' not in x]


def test_a_resumed_training_reports_the_loss_over_all_its_steps(tiny_model, tmp_path):
    import shutil

    from pipeline.core.recipe.load import load_recipes
    from pipeline.data.dataset import write_dataset
    from pipeline.stages import sft

    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data, [{"messages": [{"role": "user", "content": f"Count to {i}."},
                                       {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]}
                         for i in range(12)], 0.0)
    cfg = {x.name: x for x in load_recipes(ROOT / "recipes")}["demo"].section("train")["sft"]
    # checkpoints at steps 3, 6 and 8 (the last two kept); logged every 4 steps, and at each checkpoint and the end
    cfg.update({"max_steps": 8, "save_steps": 3, "logging_steps": 4, "batch_size": 2, "max_length": 64,
                "data": [{"name": "d", "limit": 0, "weight": 1.0}]})
    kw = dict(base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="sft", data={"d": data},
              chat_template=ROOT / "recipes/templates/chatml.jinja", config=cfg, scratch=tmp_path / "scratch")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir()
    resumed.mkdir()
    a = sft.run(whole, **kw)
    shutil.rmtree(tmp_path / "scratch/checkpoint-8")  # as if killed after checkpoint-6: steps 7 and 8 run again
    b = sft.run(resumed, **kw)
    assert (a["resumed_from_step"], b["resumed_from_step"]) == (None, 6) and a["steps"] == b["steps"] == 8
    log = (whole / "train_log.jsonl").read_text()
    assert (resumed / "train_log.jsonl").read_text() == log
    rows = [json.loads(x) for x in log.splitlines()]
    assert [r["step"] for r in rows] == [3, 4, 6, 8]
    spans = [3, 1, 2, 2]  # each row is the mean loss of the steps since the one before
    assert a["train_loss"] == round(sum(r["loss"] * n for r, n in zip(rows, spans)) / 8, 6)
    assert _summary_without_resume(resumed) == _summary_without_resume(whole)
