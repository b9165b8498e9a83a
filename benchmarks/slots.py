"""How well heavy tasks share a node's GPU slots: `doit build:mini_lima_sweep_demo` with 1, 2 and 4 slots.

    python benchmarks/slots.py [--slots 1 2 4] [--recipe mini_lima_sweep_demo]

Each run builds the recipe from scratch in a fresh temporary copy of the project, with `TUNEBUILD_GPUS` declaring
that many fake GPU ids, `doit -n <slots>`, and one thread per task (`OMP_NUM_THREADS=1`, so on a CPU a slot is a
core). From `artifacts/runs.jsonl` it takes the total task time (the sum of every stage task's duration) and
prints, per slot count: the wall time, the ideal wall time (total task time / slots, what perfect packing would
give), their ratio (1.00 = ideal), the most tasks that ran at once, and the speed-up over one slot.
On a machine with fewer cores than slots the ideal is out of reach: the figures show how far.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _t(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def build(slots: int, recipe: str, work: Path) -> dict:
    project = work / f"slots{slots}"
    project.mkdir()
    shutil.copy(ROOT / "dodo.py", project / "dodo.py")
    shutil.copytree(ROOT / "recipes", project / "recipes")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TUNEBUILD_GPUS": ",".join(map(str, range(slots))),
           "TUNEBUILD_LOCK_DIR": str(work / f"locks{slots}")}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "doit", "-n", str(slots), f"build:{recipe}"], cwd=project, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"build with {slots} slot(s) failed:\n{(p.stdout + p.stderr)[-3000:]}")
    runs = [json.loads(line) for line in (project / "artifacts" / "runs.jsonl").read_text().splitlines()]
    busy = sum(r["seconds"] for r in runs)
    events = sorted([(_t(r["start"]), 1) for r in runs] + [(_t(r["end"]), -1) for r in runs])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return {"slots": slots, "wall": wall, "busy": busy, "tasks": len(runs), "peak": peak,
            "heavy": sum(r["executor"] != "doit" for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--recipe", default="mini_lima_sweep_demo")
    args = ap.parse_args()
    print(f"{args.recipe}, built from scratch per row; {os.cpu_count()} CPU core(s); one thread per task")
    print(f"{'slots':>5} {'wall s':>8} {'task s':>8} {'ideal s':>8} {'wall/ideal':>10} {'at once':>7} "
          f"{'tasks':>6} {'speed-up':>8}")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for slots in args.slots:
            r = build(slots, args.recipe, Path(tmp))
            first = first or r["wall"]
            ideal = r["busy"] / slots
            print(f"{slots:>5} {r['wall']:>8.1f} {r['busy']:>8.1f} {ideal:>8.1f} {r['wall'] / ideal:>10.2f} "
                  f"{r['peak']:>7} {r['tasks']:>6} {first / r['wall']:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
