import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from pipeline.stages import filter as filter_stage
from pipeline import tiny
from pipeline.stages import merge, sft
from pipeline.recipe import load_recipes


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

    cfg = demo.section("sft")
    cfg.update(max_steps=4, logging_steps=1, batch_size=2, max_length=128,
               data=[{"name": "self_instruct", "limit": 0, "weight": 1.0}])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    summary = sft.run(adapter, base_model=str(tiny_model), base_ref="builtin:tiny", data={"self_instruct": data},
                      chat_template=ROOT / "recipes/templates/default.jinja", config=cfg)
    assert summary["steps"] == 4
    log = [json.loads(x) for x in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny"

    merged = tmp_path / "merged"
    merged.mkdir()
    merge.run(merged, base_model=str(tiny_model), adapter=adapter, config={"dtype": "float32"})
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
