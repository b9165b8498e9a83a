"""The same build gives the same bytes wherever it runs: two clean clones at different paths, with different
PYTHONHASHSEED, write byte-identical manifests; a built checkout moved to another folder still compares its
models after a training setting changes (no absolute path in the eval-config digest)."""
import shutil
from pathlib import Path

import pytest

from conftest import copy_project, run_doit

RECIPE = """extends = "alpaca_lora_demo.toml"
[train.sft]
max_steps = 4
batch_size = 2
logging_steps = 1
[eval]
heldout_max_items = 4
[eval.suites.tb_basic]
limit = 4
[eval.suites.subjects]
limit = 2
"""


def manifests(project: Path) -> dict[str, bytes]:
    arts = project / "artifacts"
    return {str(p.relative_to(arts)): p.read_bytes() for p in sorted(arts.rglob("manifest.json"))
            if ".cache" not in p.parts}


def build(project: Path, seed: str):
    return run_doit(project, "build:r", env={"PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_two_clones_same_manifests_and_a_moved_checkout_still_compares(tmp_path):
    (tmp_path / "a" / "proj").mkdir(parents=True)
    (tmp_path / "elsewhere" / "b" / "proj").mkdir(parents=True)
    a = copy_project(tmp_path / "a" / "proj", recipes=("alpaca_lora_demo.toml",))
    b = copy_project(tmp_path / "elsewhere" / "b" / "proj", recipes=("alpaca_lora_demo.toml",))
    for p in (a, b):
        (p / "recipes/r.toml").write_text(RECIPE)
    build(a, "1")
    build(b, "2")
    ma, mb = manifests(a), manifests(b)
    assert {"r/sft/sft/manifest.json", "r/models/sft/manifest.json", "r/eval/sft-subjects/manifest.json", "r/data/alpaca/manifest.json"} <= set(ma)
    differ = sorted(k for k in ma if ma[k] != mb.get(k))
    assert set(ma) == set(mb) and not differ, differ

    moved = tmp_path / "moved" / "proj"
    shutil.move(str(a), str(moved))
    (moved / "recipes/r.toml").write_text(RECIPE.replace("max_steps = 4", "max_steps = 5"))
    executed, _, out, _ = build(moved, "3")
    assert {"sft:r.sft", "merge:r.sft", "evaluate:r.sft.subjects", "scores:r"} <= set(executed), out
    assert "evaluate:r.base.subjects" not in executed and "not compared" not in out, out
