import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from openai_server import FakeOpenAI  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from pipeline.models import tiny

    out = tmp_path_factory.mktemp("tiny") / "builtin-tiny"
    out.mkdir()
    tiny.build(out, {"seed": 0})
    return out


@pytest.fixture
def openai_server():
    with FakeOpenAI() as server:
        yield server


def copy_project(dest: Path, recipes=("mini_lima.toml",)) -> Path:
    """A project folder: the real dodo.py and recipe files, with only the named recipes."""
    shutil.copy(ROOT / "dodo.py", dest / "dodo.py")
    shutil.copytree(ROOT / "recipes", dest / "recipes", ignore=shutil.ignore_patterns("*.toml"))
    for name in recipes:
        shutil.copy(ROOT / "recipes" / name, dest / "recipes" / name)
    return dest


def run_doit(project: Path, *args, env=None, check=True, timeout=900):
    """Run doit in `project`; return (executed task names, up-to-date task names, output)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=project, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}")
    executed = re.findall(r"^\.  (\S+)", proc.stdout, re.M)
    uptodate = re.findall(r"^-- (\S+)", proc.stdout, re.M)
    return executed, uptodate, out, proc.returncode
