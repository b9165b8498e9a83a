"""DPO counts the preference pairs it reads, keeps, truncates and drops the way TRL's DPOTrainer does (a pair whose
prompt alone fills max_length has no answer token left), reports them and fails past max_dropped_fraction with one
line instead of training silently on fewer pairs, or crashing when none is left."""
import json

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, copy_project, run_doit
from pipeline.core.recipe.load import load_recipes
from pipeline.data.dataset import write_dataset
from pipeline.errors import TunebuildError
from pipeline.stages import dpo

TEMPLATE = ROOT / "recipes/templates/default.jinja"
MAX_LENGTH = 48


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


# with default.jinja and the byte-level tiny tokenizer "Human: <prompt>\nAssistant: " is len(prompt) + 19 tokens
PAIRS = [pair(f"q{i}", "yes", "no") for i in range(6)]                        # fit whole
PAIRS += [pair("short", "a" * 40, "no"), pair("short", "no", "b" * 40)]       # an answer cut off: truncated
PAIRS += [pair("x" * 29, "yes", "no")]                                        # 48 prompt tokens: dropped
PAIRS += [pair("x" * 28, "yes", "no")]                                        # 47: kept, its answers cut to 1 token


def preference_data(tmp_path, pairs=PAIRS):
    folder = tmp_path / "pairs"
    folder.mkdir(exist_ok=True)
    write_dataset(folder, pairs, 0.0)
    return {"pairs": folder}


def dpo_config(**over) -> dict:
    r = {x.name: x for x in load_recipes(ROOT / "recipes")}["zh_dpo_demo"]
    cfg = r.section("train")["dpo"]
    cfg.update({"max_steps": 2, "logging_steps": 1, "batch_size": 2, "max_length": MAX_LENGTH,
                "max_dropped_fraction": 0.2, "data": [{"name": "pairs", "limit": 0, "weight": 1.0}], **over})
    return cfg


def what_trl_trains_on(tiny_model, pairs, max_length):
    """(pairs TRL keeps, pairs whose sequences its collator cuts), from a DPOTrainer given every pair."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = TEMPLATE.read_text()
    args = DPOConfig(output_dir="unused", max_length=max_length, report_to="none", bf16=False)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args,
                         train_dataset=Dataset.from_list(pairs), processing_class=tok)
    rows = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), r)) for r in
            zip(*(trainer.train_dataset[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")))]
    whole = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    cut = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)
    truncated = sum(whole([r])["attention_mask"].sum() != cut([r])["attention_mask"].sum() for r in rows)
    return len(rows), int(truncated)


def test_dpo_counts_what_trl_keeps_truncates_and_drops(tiny_model, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    summary = dpo.run(out, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="dpo",
                      data=preference_data(tmp_path), chat_template=TEMPLATE, config=dpo_config())
    kept, truncated = what_trl_trains_on(tiny_model, PAIRS, MAX_LENGTH)
    assert (kept, truncated) == (9, 3)  # the pairs above do what their comments say
    counts = {"pairs": 10, "kept": kept, "truncated": truncated, "dropped": 10 - kept}
    assert {k: summary[k] for k in counts} == counts
    assert {k: json.loads((out / "train_summary.json").read_text())[k] for k in counts} == counts
    assert summary["steps"] == 2 and (out / "adapter_config.json").is_file()
    assert "dpo dpo: 10 preference pairs: 9 kept, 3 of them truncated to max_length 48 (an answer cut off), " \
           "1 dropped (the prompt alone fills max_length)" in capsys.readouterr().out


def test_dpo_fails_with_one_line_when_too_many_pairs_are_dropped(tiny_model, tmp_path):
    data = preference_data(tmp_path)
    out = tmp_path / "adapter"
    out.mkdir()
    kw = dict(base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="dpo", data=data, chat_template=TEMPLATE)
    with pytest.raises(TunebuildError) as e:
        dpo.run(out, config=dpo_config(max_dropped_fraction=0.0), **kw)
    assert str(e.value) == ("train.dpo.max_length: 1 of 10 preference pairs have a prompt of max_length = 48 tokens "
                            "or more, so no answer token left (more than max_dropped_fraction = 0.0): raise "
                            "train.dpo.max_length (the longest prompt has 48 tokens, the longest pair 66)")
    with pytest.raises(TunebuildError) as e:  # none left: never handed to TRL, whatever the fraction allows
        dpo.run(out, config=dpo_config(max_length=16, max_dropped_fraction=1.0), **kw)
    assert str(e.value) == ("train.dpo.max_length: 10 of 10 preference pairs have a prompt of max_length = 16 "
                            "tokens or more, so no answer token left (none is left to train on): raise "
                            "train.dpo.max_length (the longest prompt has 48 tokens, the longest pair 66)")
    assert not list(out.iterdir())


DPO_ONLY = """extends = "zh_dpo_demo.toml"
[train.dpo]
from = "base"
max_steps = 2
batch_size = 2
max_length = {max_length}
{extra}
"""


@pytest.mark.slow
def test_a_dpo_build_reports_its_dropped_pairs_and_fails_in_one_line(tmp_path):
    project = copy_project(tmp_path, recipes=("zh_dpo_demo.toml",))
    recipe = project / "recipes/r.toml"
    env = {"HF_HUB_OFFLINE": "1"}

    recipe.write_text(DPO_ONLY.format(max_length=24, extra="max_dropped_fraction = 1.0"))
    _, _, out, rc = run_doit(project, "dpo:r.dpo", env=env, check=False)
    assert rc != 0 and "Traceback" not in out and "num_samples" not in out, out
    line = [x for x in out.splitlines() if "train.dpo.max_length:" in x]
    assert len(line) == 1 and line[0].startswith("dpo:r.dpo: train.dpo.max_length: 30 of 30 preference pairs have a "
                                                 "prompt of max_length = 24 tokens or more"), out
    assert "(none is left to train on): raise train.dpo.max_length (the longest prompt has" in line[0]

    recipe.write_text(DPO_ONLY.format(max_length=96, extra=""))  # 12 of 30 dropped: more than the default 0.1
    _, _, out, rc = run_doit(project, "dpo:r.dpo", env=env, check=False)
    assert rc != 0 and "Traceback" not in out, out
    assert "dpo:r.dpo: train.dpo.max_length: 12 of 30 preference pairs" in out, out

    recipe.write_text(DPO_ONLY.format(max_length=96, extra="max_dropped_fraction = 0.5"))
    run_doit(project, "dpo:r.dpo", env=env)
    summary = json.loads((project / "artifacts/r/dpo/dpo/train_summary.json").read_text())
    assert {k: summary[k] for k in ("pairs", "kept", "dropped")} == {"pairs": 30, "kept": 18, "dropped": 12}
    assert summary["steps"] == 2
