"""A model is its content, not its name: run-cache keys hold content digests only (a stage that starts `from` another
is shared between recipes and sweep variants), every adapter folder loads with AutoPeftModelForCausalLM from the
project root, and a local model folder counts by the digests of its files."""
import json
import re

import pytest

from conftest import copy_project, run_doit

COPY = 'extends = "zh_dpo_demo.toml"\ndescription = "the same experiment under another name"\n'
SWEEP = 'extends = "zh_dpo_demo.toml"\n[sweep.h]\nkey = "eval.heldout_max_items"\nvalues = [20, 10]\n'


def restored(out: str, task: str) -> bool:
    return re.search(rf"^{re.escape(task)}: restored from the run cache", out, re.M) is not None


@pytest.mark.slow
def test_a_stage_from_another_is_shared_by_extends_copies_and_sweep_variants(tmp_path):
    project = copy_project(tmp_path, recipes=("zh_dpo_demo.toml",))
    (project / "recipes/zh_copy.toml").write_text(COPY)
    (project / "recipes/zh_sweep.toml").write_text(SWEEP)
    env = {"HF_HUB_OFFLINE": "1"}
    executed, _, out, _ = run_doit(project, "merge:zh_dpo_demo.dpo", env=env)
    assert {"sft:zh_dpo_demo.sft", "dpo:zh_dpo_demo.dpo", "merge:zh_dpo_demo.dpo"} <= set(executed), out
    others = ("zh_copy", "zh_sweep.h20", "zh_sweep.h10")
    executed, _, out, _ = run_doit(project, *(f"merge:{r}.dpo" for r in others), env=env)
    for r in others:
        for task in (f"sft:{r}.sft", f"merge:{r}.sft", f"dpo:{r}.dpo", f"merge:{r}.dpo"):
            assert task in executed and restored(out, task), (task, out[-4000:])
    arts = project / "artifacts"
    for r in others:  # the same bytes, and nothing in them names another recipe
        for folder in ("sft/sft", "dpo/dpo", "models/sft", "models/dpo"):
            mine, first = arts / r / folder, arts / "zh_dpo_demo" / folder
            assert json.loads((mine / "manifest.json").read_text())["files"].keys() == \
                json.loads((first / "manifest.json").read_text())["files"].keys()
            for f in mine.rglob("*"):
                assert not f.is_file() or b"zh_dpo_demo" not in f.read_bytes(), f
        for folder in ("models/sft", "models/dpo"):
            assert (arts / r / folder / "manifest.json").read_bytes() == \
                (arts / "zh_dpo_demo" / folder / "manifest.json").read_bytes()
    # each adapter names the folder it starts from, in its own recipe
    for r in ("zh_dpo_demo", *others):
        cfg = json.loads((arts / r / "dpo/dpo/adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == f"artifacts/{r}/models/sft", cfg
        cfg = json.loads((arts / r / "sft/sft/adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "artifacts/models/builtin-tiny", cfg
    assert_adapters_load(project, ("zh_dpo_demo", *others))


def assert_adapters_load(project, recipes):
    """Every adapter of the recipes loads with AutoPeftModelForCausalLM from the project root and gives the logits
    of the merged model."""
    import contextlib

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 70, 80, 90, 100, 110, 5, 6]])
    checked = 0
    with contextlib.chdir(project):
        for r in recipes:
            for adapter in sorted(p.parent for p in (project / "artifacts" / r).glob("*/*/adapter_config.json")):
                rel = adapter.relative_to(project)
                peft_model = AutoPeftModelForCausalLM.from_pretrained(str(rel)).eval()
                merged = AutoModelForCausalLM.from_pretrained(f"artifacts/{r}/models/{adapter.name}").eval()
                with torch.no_grad():
                    a, b = peft_model(ids).logits, merged(ids).logits
                assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (rel, (a - b).abs().max())
                checked += 1
    assert checked >= len(recipes)


# -- a local model folder counts by its content -------------------------------------------------------------------
LOCAL = """description = "LoRA SFT of a local model folder under recipes/models/"
[model]
base = "models/tiny"
chat_template = "templates/default.jinja"
[data.alpaca]
source = "data/alpaca_sample.json"
format = "alpaca"
heldout_fraction = 0.15
[train.sft]
max_steps = 6
learning_rate = 2e-2
batch_size = 4
max_length = 256
logging_steps = 2
[eval]
batch_size = 16
heldout_max_items = 4
[eval.suites.basic]
include_path = "evals/tb_basic"
tasks = ["tb_capitals_mc"]
limit = 6
[eval.models.other]
model = "models/other"
"""
SMALL = {"hidden_size": 128, "intermediate_size": 512}  # a 2 MB model.safetensors: its digest is cached


def local_model(folder, seed: int):
    """A random-init small Llama with the byte-level tokenizer, saved with save_pretrained (in place)."""
    from pipeline.models import tiny

    folder.mkdir(parents=True, exist_ok=True)
    tiny.build(folder, {"seed": seed, **SMALL})


def scores_digests(project, recipe: str) -> dict:
    import duckdb

    con = duckdb.connect(str(project / "artifacts/scores.duckdb"), read_only=True)
    try:
        return dict(con.execute("SELECT DISTINCT model, model_digest FROM scores WHERE recipe = ?", [recipe])
                    .fetchall())
    finally:
        con.close()


@pytest.mark.slow
def test_retrained_local_base_folder_rebuilds_everything_that_used_it(tmp_path):
    import os
    import sqlite3
    import time

    from pipeline.digests import folder_digests, input_digest

    project = copy_project(tmp_path, recipes=())
    (project / "recipes/r.toml").write_text(LOCAL)
    tiny_dir, other_dir = project / "recipes/models/tiny", project / "recipes/models/other"
    local_model(tiny_dir, 1)
    local_model(other_dir, 2)
    env = {"HF_HUB_OFFLINE": "1"}
    executed, _, out, _ = run_doit(project, "build:r", env=env)
    assert {"sft:r.sft", "merge:r.sft", "evaluate:r.base.basic", "evaluate:r.other.basic", "report:r"} \
        <= set(executed), out
    arts = project / "artifacts"
    adapter = json.loads((arts / "r/sft/sft/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "recipes/models/tiny"
    before = scores_digests(project, "r")
    assert before["base"].endswith(input_digest(tiny_dir)) and before["other"].endswith(input_digest(other_dir))
    results = json.loads((arts / "r/eval/base-basic/results.json").read_text())
    assert results["model_digest"] == f"sha256:{input_digest(tiny_dir)}"

    # the weights are replaced in place: every stage that used the folder rebuilds, nothing else
    local_model(tiny_dir, 3)
    time.sleep(2.1)  # older than the digest cache's racy window
    _, _, why, _ = run_doit(project, "why", "build:r", env=env)
    assert re.search(r"^sft:r\.sft\s+will run\s+file changed: recipes/models/tiny/model\.safetensors$", why, re.M), why
    assert "evaluate:r.other.basic" not in why, why
    other_cfg = other_dir / "tokenizer_config.json"
    saved = other_cfg.read_bytes()
    local_model(other_dir, 4)
    other_cfg.write_bytes(saved + b"\n")
    _, _, why, _ = run_doit(project, "why", "evaluate:r.other.basic", env=env)
    assert re.search(r"^evaluate:r\.other\.basic\s+will run\s+2 files changed in recipes/models/other: "
                     r"model\.safetensors, tokenizer_config\.json$", why, re.M), why
    local_model(other_dir, 2)  # back as it was: the same bytes, so nothing of it reruns
    other_cfg.write_bytes(saved)
    executed, _, out, _ = run_doit(project, "build:r", env=env)
    rebuilt = {"sft:r.sft", "merge:r.sft", "evaluate:r.base.basic", "evaluate:r.sft.basic",
               "evaluate:r.base.heldout", "evaluate:r.sft.heldout", "scores:r", "report:r"}
    assert rebuilt <= set(executed), (executed, out)
    assert not any(restored(out, t) for t in rebuilt), out
    assert not {"evaluate:r.other.basic", "evaluate:r.other.heldout", "import:r.alpaca"} & set(executed), executed
    after = scores_digests(project, "r")
    assert after["base"].endswith(input_digest(tiny_dir)) and after["base"] != before["base"]
    assert after["other"] == before["other"]

    # the digest cache holds the weights' digest by size, mtime and inode: the next key is not a re-read
    weights = tiny_dir / "model.safetensors"
    st = weights.stat()
    con = sqlite3.connect(str(arts / ".cache/digests.sqlite"))
    row = con.execute("SELECT size, mtime_ns, ino, sha256 FROM digests WHERE path = ?",
                      [str(weights.resolve())]).fetchone()
    con.close()
    assert row == (st.st_size, st.st_mtime_ns, st.st_ino, folder_digests(tiny_dir)["model.safetensors"])
    executed, uptodate, out, _ = run_doit(project, "build:r", env=env)
    assert not executed and "sft:r.sft" in uptodate, out
    # new times, the same bytes (a copy back, a checkout): doit's md5 check sees no change
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, _, why, _ = run_doit(project, "why", "build:r", env=env)
    assert "nothing would run" in why, why


def test_the_digest_cache_reads_an_unchanged_file_once(tmp_path, monkeypatch):
    import os

    from pipeline import digests as store

    monkeypatch.chdir(tmp_path)
    big = tmp_path / "weights.bin"
    big.write_bytes(b"\0" * (store.CACHED_DIGEST_MIN_SIZE + 1))
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns - 10 * 10**9))  # outside the racy window
    reads = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: reads.append(p) or real(p))
    first = store.file_digest(big)
    assert store.file_digest(big) == first == real(big) and len(reads) == 1
    with open(big, "r+b") as f:  # rewritten in place, same size
        f.write(b"x")  # differs from the zero byte it replaces
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns - 5 * 10**9))
    assert store.file_digest(big) == real(big) != first and len(reads) == 2
    fresh = tmp_path / "fresh.bin"  # just written: hashed, not remembered (it may still change within its mtime)
    fresh.write_bytes(os.urandom(store.CACHED_DIGEST_MIN_SIZE))
    store.file_digest(fresh)
    store.file_digest(fresh)
    assert len(reads) == 4


def test_listing_tasks_hashes_no_model_folder(tmp_path, monkeypatch):
    from pipeline import digests
    from pipeline.core import graph

    project = copy_project(tmp_path, recipes=())
    (project / "recipes/r.toml").write_text(LOCAL)
    local_model(project / "recipes/models/tiny", 1)
    local_model(project / "recipes/models/other", 2)
    monkeypatch.chdir(project)

    def refuse(path):
        raise AssertionError(f"hashed {path} while listing tasks")

    monkeypatch.setattr(digests, "sha256_file", refuse)
    tasks = {f"{b}:{t['name']}": t for b, _, ts in graph.Project(project).task_table() for t in ts}
    sft = tasks["sft:r.sft"]
    assert "recipes/models/tiny/model.safetensors" in sft["file_dep"]
    kwargs = sft["actions"][0][2]
    assert kwargs["inputs"]["base_model"] == "recipes/models/tiny" and "base_model" not in kwargs["params"]
    assert "recipes/models/other/config.json" in tasks["evaluate:r.other.basic"]["file_dep"]
    # names are for messages: nothing recipe-named is keyed
    assert "base_ref" not in kwargs["params"] and kwargs["unkeyed"]["stage_name"] == "sft"


def test_task_list_with_local_and_hub_models_is_cached_as_data(tmp_path, monkeypatch):
    from pipeline.core import graph, task_cache

    project = copy_project(tmp_path, recipes=())
    (project / "recipes/r.toml").write_text(LOCAL)
    (project / "recipes/h.toml").write_text(HUB)
    local_model(project / "recipes/models/tiny", 1)
    local_model(project / "recipes/models/other", 2)
    monkeypatch.chdir(project)
    table = graph.Project(project).task_table()
    assert task_cache.save(project / "artifacts/.tasks.json", "k", table)
    loaded = {f"{b}:{t['name']}": t for b, _, ts in task_cache.load(project / "artifacts/.tasks.json", "k") for t in ts}
    kwargs = loaded["sft:h.sft"]["actions"][0][2]
    assert kwargs["params"]["base_model"] == "org/tiny@v1" and kwargs["hub"] == {"base_model": "org/tiny@v1"}
    assert loaded["sft:h.sft"]["uptodate"][0].config["hub_models"] == {"base_model": "org/tiny@v1"}
    assert loaded["sft:r.sft"]["actions"][0][2]["inputs"]["base_model"] == "recipes/models/tiny"


@pytest.mark.parametrize("base, revision, message", [
    ("models/nope", None, "model.base: no model folder 'models/nope' (tried {recipes}/models/nope; model folders "
                          "are relative to {recipes}"),
    ("../outside", None, "model.base: '../outside' is outside {recipes}"),
    ("/abs/models/x", None, "model.base: '/abs/models/x' is outside {recipes}"),
    ("data/alpaca_sample.json", None, "model.base: 'data/alpaca_sample.json' is a file"),
    ("models/tiny", "v1", "model.revision: only for a hub model ('models/tiny' is a local folder)"),
    ("builtin:tiny", "main", "model.revision: only for a hub model"),
    ("org/model", "v 1", "model.revision: expected a branch, tag or commit"),
])
def test_model_references_resolve_inside_recipes(tmp_path, base, revision, message):
    from pipeline.core.recipe.load import load_recipes
    from pipeline.core.recipe.schema import RecipeError

    project = copy_project(tmp_path, recipes=())
    local_model(project / "recipes/models/tiny", 1)
    text = LOCAL.replace('base = "models/tiny"', f'base = "{base}"' + (f'\nrevision = "{revision}"' if revision
                                                                           else ""))
    (project / "recipes/r.toml").write_text(text.replace('[eval.models.other]\nmodel = "models/other"\n', ""))
    with pytest.raises(RecipeError) as e:
        load_recipes(project / "recipes")
    assert message.format(recipes=project / "recipes") in str(e.value)
    assert "\n" not in str(e.value)


def test_a_local_folder_outside_recipes_is_refused_by_link_too(tmp_path):
    from pipeline.core.recipe.load import load_recipes
    from pipeline.core.recipe.schema import RecipeError

    project = copy_project(tmp_path, recipes=())
    local_model(tmp_path / "elsewhere", 1)
    (project / "recipes/models").mkdir()
    (project / "recipes/models/tiny").symlink_to(tmp_path / "elsewhere")
    (project / "recipes/r.toml").write_text(LOCAL.replace('[eval.models.other]\nmodel = "models/other"\n', ""))
    with pytest.raises(RecipeError, match=r"model.base: 'models/tiny' is outside .*links leading out are refused"):
        load_recipes(project / "recipes")


# -- a hub model is keyed by its id, its revision and the commit that resolves to ---------------------------------
HUB = """description = "LoRA SFT of a hub model at a pinned revision"
[model]
base = "org/tiny"
revision = "v1"
chat_template = "templates/default.jinja"
[data.alpaca]
source = "data/alpaca_sample.json"
format = "alpaca"
heldout_fraction = 0.15
[train.sft]
max_steps = 4
learning_rate = 2e-2
batch_size = 4
max_length = 256
logging_steps = 2
[eval]
heldout_max_items = 4
"""


def hub_snapshot(cache, commit: str, seed: int, refs=("v1",)):
    """A model in a Hugging Face hub cache as a download leaves it: snapshots/<commit>/ and refs/<revision>."""
    root = cache / "models--org--tiny"
    local_model(root / "snapshots" / commit, seed)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


@pytest.mark.slow
def test_a_hub_revision_is_keyed_recorded_and_watched(tmp_path):
    project = copy_project(tmp_path, recipes=())
    (project / "recipes/h.toml").write_text(HUB)
    cache = tmp_path / "hf"
    first, second = "1" * 40, "2" * 40
    hub_snapshot(cache, first, 1)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    executed, _, out, _ = run_doit(project, "build:h", env=env)
    assert {"sft:h.sft", "merge:h.sft", "evaluate:h.base.heldout", "report:h"} <= set(executed), out
    arts = project / "artifacts"
    adapter = json.loads((arts / "h/sft/sft/adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("org/tiny", first)
    assert json.loads((arts / "h/sft/sft/train_summary.json").read_text())["start_model"] == f"hub:org/tiny@{first}"
    results = json.loads((arts / "h/eval/base-heldout/results.json").read_text())
    assert results["model_digest"] == f"hub:org/tiny@{first}"
    assert scores_digests(project, "h")["base"].startswith("hub:org/tiny@")

    # the revision moves to another commit in the cache: what used the model rebuilds, from the new weights
    hub_snapshot(cache, second, 2)
    _, _, why, _ = run_doit(project, "why", "build:h", env=env)
    assert re.search(rf"^sft:h\.sft\s+will run\s+hub model org/tiny@v1 now resolves to commit {second} \(built "
                     rf"from {first}\)", why, re.M), why
    executed, _, out, _ = run_doit(project, "build:h", env=env)
    assert {"sft:h.sft", "merge:h.sft", "evaluate:h.base.heldout", "evaluate:h.sft.heldout"} <= set(executed), out
    assert not restored(out, "sft:h.sft") and not restored(out, "evaluate:h.base.heldout"), out
    assert json.loads((arts / "h/sft/sft/train_summary.json").read_text())["start_model"] == f"hub:org/tiny@{second}"
    executed, _, out, _ = run_doit(project, "build:h", env=env)
    assert not executed, out

    # a revision the cache does not hold, offline: one line naming it
    (project / "recipes/h.toml").write_text(HUB.replace('revision = "v1"', 'revision = "v2"'))
    executed, _, out, code = run_doit(project, "sft:h.sft", env=env, check=False)
    assert code != 0
    line = "sft:h.sft: cannot run here: model 'org/tiny' at revision 'v2' is not a local folder and not in the " \
           "Hugging Face cache, and HF_HUB_OFFLINE is set"
    assert line in out.splitlines(), out


CHAIN = """extends = "zh_dpo_demo.toml"
[train.dpo2]
method = "dpo"
from = "dpo"
data = ["dpo_zh"]
max_steps = 2
"""


def test_no_run_cache_key_holds_a_recipe_or_stage_name(tmp_path, monkeypatch):
    """sft -> dpo -> dpo2 in a recipe and in a copy under another name: every cached stage task's keyed values
    (config, params, the shape of its inputs) are the same, and none names the recipe."""
    from pipeline.core import graph

    project = copy_project(tmp_path, recipes=("zh_dpo_demo.toml",))
    (project / "recipes/chain_a.toml").write_text(CHAIN)
    (project / "recipes/chain_b.toml").write_text(CHAIN)
    monkeypatch.chdir(project)
    tasks = {f"{b}:{t['name']}": t for b, _, ts in graph.Project(project).task_table() for t in ts}

    def keyed(name: str):
        kw = tasks[name]["actions"][0][2]
        shape = {k: sorted(v) if isinstance(v, dict) else None for k, v in kw["inputs"].items()}
        return kw["config"], kw["params"], shape

    names = [n.split(":", 1)[1].split(".", 1)[1] for n in tasks if n.split(":", 1)[1].startswith("chain_a.")]
    checked = 0
    for rest in names:
        base = next(n.split(":")[0] for n in tasks if n.endswith(f":chain_a.{rest}"))
        a, b = f"{base}:chain_a.{rest}", f"{base}:chain_b.{rest}"
        kw = tasks[a]["actions"][0][2]
        if not kw.get("cache") or base == "import":  # import keys the recipe file's name (pipeline/stages/import_data)
            continue
        assert keyed(a) == keyed(b), a
        assert "chain_a" not in json.dumps(keyed(a)), (a, keyed(a))
        checked += 1
    assert {"sft:chain_a.sft", "dpo:chain_a.dpo", "dpo:chain_a.dpo2", "merge:chain_a.dpo2"} <= set(tasks)
    assert checked >= 10
