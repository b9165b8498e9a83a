"""Precision that fits: a training loads its model in the dtype it trains in (LoRA base, QLoRA compute dtype, a DPO
reference model), 'auto' stays float32 on a CPU, gradient checkpointing changes nothing but memory (so it stays out
of the run-cache key), and the optional kernels are refused in one line where they cannot run."""
import json

import pytest
import torch

from conftest import ROOT
from pipeline.finetuning import precision
from pipeline.finetuning import training
from pipeline.errors import TunebuildError, Unavailable
from pipeline.core.recipe.load import load_recipes


def train_config(**over) -> dict:
    cfg = {r.name: r for r in load_recipes(ROOT / "recipes")}["demo"].section("train")["sft"]
    cfg.update({"max_steps": 3, "logging_steps": 1, "batch_size": 2, "max_length": 64,
                "data": [{"name": "d", "limit": 0, "weight": 1.0}], **over})
    return cfg


def counting_data(folder, n=12):
    from pipeline.data.dataset import write_dataset

    folder.mkdir()
    write_dataset(folder, [{"messages": [{"role": "user", "content": f"Count to {i}."},
                                         {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]}
                           for i in range(n)], 0.0)
    return folder


def test_auto_is_float32_on_this_cpu_and_float16_keeps_full_weights_in_float32():
    assert not torch.cuda.is_available()
    assert precision.resolve("auto") == "float32" and precision.resolve("bfloat16") == "bfloat16"
    assert precision.load_dtype("bfloat16", "full") == "bfloat16"
    assert precision.load_dtype("float16", "lora") == "float16"
    assert precision.load_dtype("float16", "full") == precision.load_dtype("float16", "freeze") == "float32"
    assert precision.merge_dtype() == "float32"


def test_a_bfloat16_lora_loads_its_base_in_bfloat16(tiny_model):
    model, _, peft = training.load_for_training(str(tiny_model), "builtin:tiny", train_config(), "train.x", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and peft is not None
    model, _, _ = training.load_for_training(str(tiny_model), "builtin:tiny", train_config(), "train.x", "float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_qlora_computes_in_the_training_precision(tiny_model):
    pytest.importorskip("bitsandbytes")
    cfg = train_config(finetuning="qlora")
    model, _, _ = training.load_for_training(str(tiny_model), "builtin:tiny", cfg, "train.x", "bfloat16")
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    dense = {p.dtype for n, p in model.named_parameters() if p.__class__.__name__ != "Params4bit"}
    assert dense == {torch.bfloat16}                     # norms, embeddings, head: not upcast to float32
    model, _, _ = training.load_for_training(str(tiny_model), "builtin:tiny", cfg, "train.x", "float32")
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    assert {p.dtype for n, p in model.named_parameters() if p.__class__.__name__ != "Params4bit"} == {torch.float32}


def test_a_dpo_reference_model_loads_in_the_policys_dtype(tiny_model, tmp_path, monkeypatch):
    from pipeline.models import hf
    from pipeline.data.dataset import write_dataset
    from pipeline.stages import dpo

    loaded = []
    real = hf.load_causal_lm

    def recording(ref, dtype="float32", **kw):
        model, tok = real(ref, dtype, **kw)
        loaded.append(next(model.parameters()).dtype)
        return model, tok
    monkeypatch.setattr(hf, "load_causal_lm", recording)
    data = tmp_path / "pairs"
    data.mkdir()
    write_dataset(data, [{"prompt": [{"role": "user", "content": f"Say {i}."}],
                          "chosen": [{"role": "assistant", "content": f"{i}"}],
                          "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(6)], 0.0)
    cfg = train_config(method="dpo", finetuning="full", precision="bfloat16", max_steps=1, beta=0.1,
                       loss_type="sigmoid", precompute_ref_log_probs=False)
    out = tmp_path / "out"
    out.mkdir()
    summary = dpo.run(out, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="dpo", data={"d": data},
                      chat_template=ROOT / "recipes/templates/chatml.jinja", config=cfg)
    assert loaded == [torch.bfloat16, torch.bfloat16] and summary["precision"] == "bfloat16"   # policy, reference
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"   # saved as it trained


def test_gradient_checkpointing_gives_the_same_training_and_stays_out_of_the_key(tiny_model, tmp_path,
                                                                                    monkeypatch):
    from pipeline.stages import sft

    from trl import DPOConfig, SFTConfig

    for config in (SFTConfig, DPOConfig):   # TRL's configs default it to True: the stage's setting is explicit
        for gc in (False, True):
            args = config(**training.common_args(train_config(), str(tmp_path / "o"), "float32", "none", gc))
            assert args.gradient_checkpointing is gc
    data = counting_data(tmp_path / "d")
    logs = []
    for gc in (False, True):
        out = tmp_path / f"gc-{gc}"
        out.mkdir()
        sft.run(out, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="sft", data={"d": data},
                chat_template=ROOT / "recipes/templates/chatml.jinja", config=train_config(),
                gradient_checkpointing=gc)
        logs.append((out / "train_log.jsonl").read_text())
    assert logs[0] == logs[1] and logs[0]

    a, b = (sft_task(tmp_path / f"p{gc}", monkeypatch, f"[train.sft]\ngradient_checkpointing = {gc}\n")
            for gc in ("false", "true"))
    assert a["config"] == b["config"] and "gradient_checkpointing" not in a["config"]
    assert (a["unkeyed"]["gradient_checkpointing"], b["unkeyed"]["gradient_checkpointing"]) == (False, True)


def sft_task(folder, monkeypatch, extra: str, name: str = "sft") -> dict:
    """The action arguments of task `sft:r.<name>` of a recipe extending the demo with `extra`."""
    from conftest import copy_project
    from pipeline.core.graph import Project

    folder.mkdir()
    project = copy_project(folder, recipes=("mini_lima.toml", "demo.toml"))
    (project / "recipes/r.toml").write_text('extends = "demo.toml"\n' + extra)
    monkeypatch.chdir(project)
    tasks = {f"{b}:{t['name']}": t for b, _, ts in Project(project).task_table() for t in ts}
    return tasks[f"sft:r.{name}"]["actions"][0][2]


def test_kernels_that_cannot_run_here_are_refused_in_one_line():
    with pytest.raises(Unavailable, match=r"train.x.attn_implementation: attn_implementation = 'flash_attention_2' "
                                          r"needs a CUDA GPU"):
        precision.attn_implementation("flash_attention_2", "bfloat16", "train.x")
    assert precision.attn_implementation("auto", "float32", "train.x") is None
    assert precision.attn_implementation("eager", "float32", "train.x") == "eager"
    if not precision.installed("liger_kernel"):
        with pytest.raises(TunebuildError, match=r"train.x.liger_kernel: needs the liger-kernel package: "
                                                 r"pip install -e '.\[liger\]'"):
            precision.check_liger(True, "train.x")
    precision.check_liger(False, "train.x")


def test_attn_implementation_reaches_the_model(tiny_model):
    model, _, _ = training.load_for_training(str(tiny_model), "builtin:tiny", train_config(attn_implementation="eager"),
                                             "train.x", "float32")
    assert model.config._attn_implementation == "eager"
    model, _, _ = training.load_for_training(str(tiny_model), "builtin:tiny", train_config(), "train.x", "float32")
    assert model.config._attn_implementation == "sdpa"
