"""Several training processes (`processes`, `strategy`) under accelerate launch, on this CPU over gloo: two DDP
processes train SFT and DPO like one process with the same global batch, rank 0 alone writes the output, a rank that
fails or dies fails the task in one line naming the rank and its log, a killed two-process build resumes from its
checkpoint, and what this machine cannot run (FSDP, DeepSpeed without GPUs) is refused in one line.

Tolerance of "the same": one process with batch 8 and two with batch 4 see the same 8 rows per step (accelerate
shards each global batch of the seeded sampler), normalise the loss by the same token count (transformers'
`average_tokens_across_devices`), and differ only in the order float32 sums are reduced (gloo's all-reduce). Measured
on the tiny model, 4 steps at lr 1e-2 with LoRA dropout 0: logged losses agree to the log's rounding (1e-6), adapter
weights to 1.3e-6 (SFT) and 1e-4 (DPO, whose Adam steps on near-zero gradients amplify the last bits). The bounds
below are 2e-5 on losses and 5e-4 on weights; the control, one process at batch 4, is off by more than 1e-3.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_project, run_doit
from pipeline.finetuning import launch
from pipeline.errors import TunebuildError, Unavailable
from pipeline.stages import dpo, sft
from test_precision import counting_data, train_config

TEMPLATE = ROOT / "recipes/templates/chatml.jinja"
DPO = dict(method="dpo", beta=0.1, loss_type="sigmoid", precompute_ref_log_probs=False)


def pair_data(folder, n=16):
    from pipeline.data.dataset import write_dataset

    folder.mkdir()
    write_dataset(folder, [{"prompt": [{"role": "user", "content": f"Say {i}."}],
                            "chosen": [{"role": "assistant", "content": f"{i} " * (i % 5 + 1)}],
                            "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(n)], 0.0)
    return folder


def train(stage, tiny_model, out, data, processes, batch_size, **over):
    from safetensors.torch import load_file

    cfg = train_config(processes=processes, batch_size=batch_size, max_steps=4, learning_rate=1e-2, **over)
    cfg["lora"]["dropout"] = 0.0  # dropout masks are drawn per process: off, to compare the arithmetic
    out.mkdir()
    summary = stage.run(out, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="x", data={"d": data},
                        chat_template=TEMPLATE, config=cfg)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return summary, log, load_file(out / "adapter_model.safetensors")


def assert_same_training(a, b):
    (sa, la, wa), (sb, lb, wb) = a, b
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        for k in ra:
            if k not in ("step", "epoch", "learning_rate"):
                assert abs(ra[k] - rb[k]) < 2e-5, (k, ra, rb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 5e-4
    assert max(v.abs().max().item() for v in wa.values()) > 0.05        # the adapter did train


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_ddp_processes_train_like_one_with_the_same_global_batch(tiny_model, tmp_path, stage):
    module, extra = (sft, {}) if stage == "sft" else (dpo, DPO)
    # 16 rows, a multiple of the global batch: else accelerate's even_batches tops the last global batch of two
    # processes up with the first rows, where one process trains a short batch
    data = counting_data(tmp_path / "d", 16) if stage == "sft" else pair_data(tmp_path / "d", 16)
    one = train(module, tiny_model, tmp_path / "one", data, 1, 8, **extra)
    two = train(module, tiny_model, tmp_path / "two", data, 2, 4, **extra)
    assert_same_training(one, two)
    assert set(os.listdir(tmp_path / "two")) == set(os.listdir(tmp_path / "one"))   # written once, by rank 0
    if stage == "sft":
        assert one[0]["tokens_trained"] == two[0]["tokens_trained"] and one[0]["loss_tokens"] == two[0]["loss_tokens"]
    control = train(module, tiny_model, tmp_path / "control", data, 1, 4, **extra)   # half the global batch
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(one[1], control[1])) > 1e-3


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_task_in_one_line_naming_it_and_its_log(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBUILD_LOG", str(tmp_path / "sft-r.x.log"))
    rank1_log = tmp_path / "sft-r.x.rank1.log"
    data = counting_data(tmp_path / "d")
    killed = []

    def kill_rank_1():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if rank1_log.exists() and "training conversations" in rank1_log.read_text(errors="replace"):
                pid = rank_pid(1, str(tmp_path / "sft-r.x.log"))
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)
    watcher = threading.Thread(target=kill_rank_1)
    watcher.start()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TunebuildError) as e:
        sft.run(out, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="x", data={"d": data},
                chat_template=TEMPLATE, config=train_config(processes=2, max_steps=100000))
    watcher.join()
    assert killed and str(e.value) == f"train.x: rank 1 of the training was killed (SIGKILL); log: {rank1_log}"
    assert not list(out.iterdir()) and not rank_pid(0, str(tmp_path / "sft-r.x.log"))   # no rank left behind


def rank_pid(rank: int, log: str) -> int | None:
    """The pid of rank `rank` of a launch whose task log is `log` (read from /proc)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"pipeline.finetuning.launch" in cmd and f"RANK={rank}".encode() in env and f"TUNEBUILD_LOG={log}".encode() in env:
            return int(p.name)
    return None


@pytest.mark.slow
def test_a_failing_rank_gives_the_same_one_line_as_one_process(tiny_model, tmp_path):
    data = counting_data(tmp_path / "d")
    errors = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        with pytest.raises(TunebuildError) as e:   # every answer is cut off at 8 tokens
            sft.run(out, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="x", data={"d": data},
                    chat_template=TEMPLATE, config=train_config(processes=processes, max_length=8))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith("train.x.max_length: 12 of 12 training conversations have "
                                                           "no answer token within 8 tokens")


def test_what_this_machine_cannot_run_is_refused_in_one_line(tiny_model):
    for strategy, why in (("fsdp", "accelerate runs FSDP on GPUs only (on a CPU it would silently be DDP)"),
                          ("zero2", "DeepSpeed ZeRO runs on GPUs"), ("zero3", "DeepSpeed ZeRO runs on GPUs")):
        with pytest.raises(Unavailable) as e:
            launch.check({"strategy": strategy, "processes": 2}, "train.x")
        assert str(e.value) == f"train.x.strategy: '{strategy}' needs CUDA GPUs ({why}), and this machine has none"
    launch.check({"strategy": "ddp", "processes": 4}, "train.x")   # DDP over gloo: any number on a CPU
    assert not launch.distributed({"strategy": "ddp", "processes": 1})
    assert launch.distributed({"strategy": "fsdp", "processes": 1}) and launch.distributed({"processes": 2})


def test_processes_follow_gpus_and_are_keyed(tmp_path, monkeypatch):
    from test_precision import sft_task

    plain = sft_task(tmp_path / "a", monkeypatch, "")
    assert plain["config"]["processes"] == 1 and plain["config"]["strategy"] == "ddp"
    eight = sft_task(tmp_path / "b", monkeypatch, "[train.sft]\ngpus = 8\n")
    assert eight["config"]["processes"] == 8 and "gpus" not in eight["config"]
    two = sft_task(tmp_path / "c", monkeypatch, "[train.sft]\nprocesses = 2\n")
    assert two["config"]["processes"] == 2 and two["config"] != plain["config"]
    from pipeline.core.recipe.load import load_recipes
    from pipeline.core.recipe.schema import RecipeError
    (tmp_path / "c/recipes/r.toml").write_text('extends = "demo.toml"\n[train.sft]\ngpus = 8\nprocesses = 4\n')
    with pytest.raises(RecipeError, match=r"r.toml: train.sft.processes: 4, but gpus = 8: one process per GPU"):
        load_recipes(tmp_path / "c/recipes")


RESUME = """extends = "alpaca_lora_demo.toml"
[train.sft]
max_steps = 40
save_steps = 4
logging_steps = 3
batch_size = 2
processes = 2
[train.sft.lora]
dropout = 0.0
[eval]
heldout = false
"""


@pytest.mark.slow
def test_a_killed_two_process_training_resumes_from_its_last_checkpoint(tmp_path):
    from test_training import _kill_after_second_checkpoint, _summary_without_resume

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = copy_project(tmp_path / "a", recipes=("alpaca_lora_demo.toml",))
    b = copy_project(tmp_path / "b", recipes=("alpaca_lora_demo.toml",))
    for p in (a, b):
        (p / "recipes/r.toml").write_text(RESUME)
    env = {"HF_HUB_OFFLINE": "1"}
    _, _, out_b, _ = run_doit(b, "sft:r.sft", env=env)                    # uninterrupted, 2 processes
    assert "2 processes (ddp) under accelerate launch" in out_b
    run_doit(a, "import:r.alpaca", "builtin:tiny", env=env)
    killed_at = _kill_after_second_checkpoint(a)
    time.sleep(2)
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _in(p, str(a))]   # no rank survived
    assert killed_at >= 8 and not (a / "artifacts/r/sft/sft/manifest.json").exists()
    executed, _, out, _ = run_doit(a, "sft:r.sft", env=env)               # resumes, in 2 processes again
    assert "sft:r.sft" in executed and "resuming from checkpoint-" in out, out
    summary = json.loads((a / "artifacts/r/sft/sft/train_summary.json").read_text())
    assert summary["resumed_from_step"] >= killed_at > 0 and summary["steps"] == 40
    assert _summary_without_resume(a / "artifacts/r/sft/sft") == _summary_without_resume(b / "artifacts/r/sft/sft")


def _in(proc: Path, folder: str) -> bool:
    try:
        return b"pipeline.finetuning.launch" in (proc / "cmdline").read_bytes() and \
            os.readlink(proc / "cwd").startswith(folder)
    except OSError:
        return False


def test_the_readmes_eight_gpu_zh_dpo_keeps_its_global_batches(tmp_path, monkeypatch):
    """README "Training at scale": zh_dpo on 8 GPUs, written as the README shows it, validates and trains each stage
    in 8 processes with the one-GPU recipe's global batch."""
    import re

    from pipeline.core.graph import Project

    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```toml\n(# recipes/zh_dpo_8gpu.toml.*?)```", readme, re.S).group(1)
    project = copy_project(tmp_path, recipes=("zh_dpo.toml",))
    (project / "recipes/zh_dpo_8gpu.toml").write_text(snippet)
    monkeypatch.chdir(project)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = {f"{b}:{t['name']}": t["actions"][0][2] for b, _, ts in Project(project).task_table() for t in ts
             if t.get("actions")}
    for stage in ("sft", "dpo"):
        one, eight = tasks[f"{stage}:zh_dpo.{stage}"], tasks[f"{stage}:zh_dpo_8gpu.{stage}"]
        assert (one["config"]["processes"], eight["config"]["processes"], eight["gpus"]) == (1, 8, 8)
        assert "gradient_checkpointing" not in one["config"] and one["unkeyed"]["gradient_checkpointing"]
        assert one["config"]["batch_size"] * one["config"]["gradient_accumulation_steps"] == \
            eight["config"]["batch_size"] * eight["config"]["gradient_accumulation_steps"] * 8
    assert one["config"]["packing"] is False and tasks["sft:zh_dpo.sft"]["config"]["packing"] is True
