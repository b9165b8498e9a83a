"""The vLLM tests, run in the second venv (`.venv-vllm`, built by tests/vllm_venv.sh; README: Generation engines).

vLLM's CPU build pins a transformers the project's venv is past, so the tests that need vLLM (test_vllm_engine.py,
test_vllm_stages.py) skip in the project's venv and run here, in a child pytest with the second venv's Python,
as one test of the ordinary `pytest` run: the README's test command stays the one CI runs. Without that venv the
test skips, except in CI (`CI=true`), where it fails: there, vLLM's tests must have run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
FILES = ("tests/test_vllm_engine.py", "tests/test_vllm_stages.py")


@pytest.mark.slow
def test_the_vllm_tests_pass_in_the_vllm_venv():
    if not VENV_PYTHON.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{VENV_PYTHON} is missing: CI builds it with tests/vllm_venv.sh before pytest (.ci/run)")
        pytest.skip(".venv-vllm is not built (tests/vllm_venv.sh; README: Generation engines)")
    if Path(sys.prefix).resolve() == VENV_PYTHON.parents[1].resolve():
        pytest.skip("this is the vLLM venv: its tests run directly")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(VENV_PYTHON), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *FILES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    # every test ran: none skipped for want of vLLM (only the CPU-only check may skip, on a GPU)
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert all("the head-size limit is the CPU backend's" in line for line in skipped), skipped
    assert re.search(r"\d+ passed", out), out[-2000:]
