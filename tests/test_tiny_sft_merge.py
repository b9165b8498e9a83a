import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from pipeline.core.recipe.load import load_recipes
from pipeline.finetuning import training
from pipeline.models import tiny
from pipeline.stages import filter as filter_stage
from pipeline.stages import merge, sft


def test_tiny_model_is_deterministic_and_loads_with_from_pretrained(tiny_model, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    tiny.build(again, {"seed": 0})
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / f).read_bytes() == (tiny_model / f).read_bytes()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    text = tok.apply_chat_template([{"role": "user", "content": "héllo 你好"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok(text)["input_ids"]) == text  # byte level: lossless on any script


def test_sft_then_merge_gives_a_standalone_model(tiny_model, tmp_path):
    demo = {r.name: r for r in load_recipes(ROOT / "recipes")}["demo"]
    pool = tmp_path / "instructions.jsonl"
    with open(pool, "w") as f:
        for line in (ROOT / "recipes/seeds/seed_tasks.jsonl").read_text().splitlines():
            f.write(json.dumps({**json.loads(line), "source": "seed"}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    filter_stage.run(data, pool=tmp_path, config=demo.section("filter"))

    cfg = demo.section("train")["sft"]
    cfg.update(max_steps=4, logging_steps=1, batch_size=2, max_length=256,
               data=[{"name": "self_instruct", "limit": 0, "weight": 1.0}])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    summary = sft.run(adapter, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="sft",
                      data={"self_instruct": data},
                      chat_template=ROOT / "recipes/templates/default.jinja", config=cfg)
    assert summary["steps"] == 4
    log = [json.loads(x) for x in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    # the run cache's copy names its base by content; a task's own output names the folder (sft.localize)
    from pipeline.digests import input_digest
    portable = json.loads((adapter / "adapter_config.json").read_text())
    assert portable["base_model_name_or_path"] == f"sha256:{input_digest(tiny_model)}"
    local = json.loads(sft.localize(adapter, base_model=str(tiny_model))["adapter_config.json"])
    assert local == {**portable, "base_model_name_or_path": str(tiny_model)}

    merged = tmp_path / "merged"
    merged.mkdir()
    merge.run(merged, base_model=str(tiny_model), adapter=adapter,
              chat_template=ROOT / "recipes/templates/default.jinja", config={"dtype": "float32"})
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == (ROOT / "recipes/templates/default.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(merged)
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    ids = tok("Human: hi\nAssistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, peft_model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, base)  # training changed the model


def test_mixture_caps_weights_and_refuses_preference_data(tmp_path):
    from pipeline.data.dataset import write_dataset
    from pipeline.errors import TunebuildError

    def dataset(name, n, pref=False):
        folder = tmp_path / name
        folder.mkdir()
        recs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]} if pref else
                {"messages": [{"role": "user", "content": f"{name} {i}"}, {"role": "assistant", "content": "ok"}]}
                for i in range(n)]
        write_dataset(folder, recs, 0.0)
        return folder

    data = {"a": dataset("a", 10), "b": dataset("b", 4), "p": dataset("p", 3, pref=True)}
    mix = [{"name": "a", "limit": 6, "weight": 1.0}, {"name": "b", "limit": 0, "weight": 2.5}]
    out = [r["messages"] for r in training.load_mixture(data, mix, "sft", "train.t")]
    users = [r[0]["content"] for r in out]
    assert users[:6] == [f"a {i}" for i in range(6)] and len(users) == 6 + 10
    assert sorted(users[6:14]) == sorted([f"b {i}" for i in range(4)] * 2) and len(set(users[14:])) == 2
    assert out == [r["messages"] for r in training.load_mixture(data, mix, "sft", "train.t")]  # fixed sample
    assert out[0][1] == {"role": "assistant", "content": "ok"}
    try:
        training.load_mixture(data, [{"name": "p", "limit": 0, "weight": 1.0}], "sft", "train.t")
    except TunebuildError as e:
        assert "train.t.data: dataset 'p' holds preference pairs" in str(e)
    else:
        raise AssertionError("preference data was accepted for SFT")


def test_every_assistant_turn_is_trained_and_long_conversations_are_counted(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."}]
    rows, counts = sft.tokenize_conversations([conv], tok, 4096, "chatml")
    ids, mask = rows[0]["input_ids"], rows[0]["completion_mask"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Hello!<|im_end|>\nSee you.<|im_end|>\n"  # both answers, with their end-of-turn
    assert counts == {"examples": 1, "kept": 1, "truncated": 0, "dropped": 0}
    long_prompt = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    rows, counts = sft.tokenize_conversations([conv, long_prompt], tok, 200, "chatml")
    assert counts == {"examples": 2, "kept": 1, "truncated": 1, "dropped": 1} and len(rows[0]["input_ids"]) <= 200
