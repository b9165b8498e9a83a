"""Incremental-build figures, in a temporary copy of the project (nothing here is touched).

    python benchmarks/incremental.py [--recipes 50]

1. Builds `r00` (the demo recipe) from scratch and times it, then `r01..r49` (the same recipe under other
   names: every stage is restored from the run cache), then times a no-op `doit` over all of them against a
   bare dodo.py with as many trivial up-to-date tasks (each with a file_dep, a target and a config check, on the
   same sqlite3 state backend), and `doit list`.
2. Edits the generation prompt, rebuilds `r00`, reverts the edit and times the rebuild (run-cache restores)
   against the original build.
3. Edits an eval prompt (the multiple-choice task's doc_to_text) and times the rebuild of `r00` against the
   original build.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def doit(cwd: Path, *args: str) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "doit", *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"doit {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return wall, len(re.findall(r"^\.  ", p.stdout, re.M)), p.stdout + p.stderr


BARE = '''
from doit.tools import config_changed
DOIT_CONFIG = {{"backend": "sqlite3", "dep_file": ".doit.sqlite", "verbosity": 0}}

def _touch(target):
    open(target, "w").write("x")

def task_t():
    for i in range({n}):
        yield {{"name": str(i), "actions": [(_touch, ["out/%d" % i])], "file_dep": ["in/%d" % (i % 50)],
               "targets": ["out/%d" % i], "uptodate": [config_changed({{"i": i, "lr": 2e-4}})]}}
'''


def best_of(k: int, fn) -> float:
    return min(fn() for _ in range(k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp) / "project"
        proj.mkdir()
        shutil.copy(ROOT / "dodo.py", proj)
        shutil.copytree(ROOT / "recipes", proj / "recipes", ignore=shutil.ignore_patterns("*.toml"))
        for name in ("mini_lima.toml", "demo.toml"):
            shutil.copy(ROOT / "recipes" / name, proj / "recipes")
        (proj / "recipes/demo.toml").rename(proj / "recipes/r00.toml")
        full, n, _ = doit(proj, "build:r00")
        print(f"full build of r00 (the demo recipe): {full:.1f} s, {n} tasks executed")
        for i in range(1, args.recipes):
            (proj / f"recipes/r{i:02d}.toml").write_text(f'extends = "r00.toml"\ndescription = "copy {i}"\n')
        wall, n, out = doit(proj, *[f"build:r{i:02d}" for i in range(1, args.recipes)])
        restored = out.count("restored from the run cache")
        print(f"{args.recipes - 1} more recipes with the same content: {wall:.1f} s, {n} tasks executed, "
              f"{restored} of them restored from the run cache")
        builds = [f"build:r{i:02d}" for i in range(args.recipes)]  # mini_lima itself needs the network
        _, n, out = doit(proj, *builds)
        if n:
            sys.exit("the no-op build executed tasks:\n" + "\n".join(re.findall(r"^\.  .*", out, re.M)))
        tasks = len(re.findall(r"^-- ", out, re.M))
        noop = best_of(3, lambda: doit(proj, *builds)[0])
        list_s = best_of(3, lambda: doit(proj, "list")[0])

        bare = Path(tmp) / "bare"
        (bare / "in").mkdir(parents=True)
        (bare / "out").mkdir()
        for i in range(50):
            (bare / f"in/{i}").write_text(str(i))
        (bare / "dodo.py").write_text(BARE.format(n=tasks))
        doit(bare)
        bare_s = best_of(3, lambda: doit(bare)[0])
        print(f"no-op over {args.recipes} recipes ({tasks} up-to-date tasks): {noop:.2f} s; bare dodo with "
              f"{tasks} trivial tasks: {bare_s:.2f} s; ratio {noop / bare_s:.2f}x (goal <= 1.5x)")
        print(f"doit list: {list_s:.2f} s (goal < 0.5 s)")

        prompt = proj / "recipes/prompts/self_instruct.txt"
        original = prompt.read_text()
        prompt.write_text(original.replace("Come up with a series of tasks:", "Come up with a list of tasks:"))
        edited, n_edit, _ = doit(proj, "build:r00")
        prompt.write_text(original)
        revert, n_rev, out = doit(proj, "build:r00")
        print(f"prompt edit: rebuild {edited:.1f} s ({n_edit} tasks); revert: {revert:.1f} s ({n_rev} tasks, "
              f"{out.count('restored from the run cache')} restored) = {revert / full:.1%} of the full build")

        yaml = proj / "recipes/evals/tb_basic/tb_capitals_mc.yaml"
        yaml.write_text(yaml.read_text().replace('doc_to_text: "Question:', 'doc_to_text: "Q:'))
        ev, n_ev, _ = doit(proj, "build:r00")
        print(f"eval-prompt edit: rebuild {ev:.1f} s ({n_ev} tasks) = {ev / full:.1%} of the full build "
              f"(goal <= 5%)")


if __name__ == "__main__":
    main()
