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


def make_wide_model(out: Path, seed: int = 0) -> Path:
    """A tiny Llama (2 layers, hidden 64, 2 heads of 32, 1 KV head) with the built-in byte-level tokenizer and
    ChatML template: heads vLLM's CPU attention kernel takes (the built-in tiny model's 16 it refuses), weights
    initialised wide (std 0.3) so that greedy answers vary from token to token instead of repeating one byte."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from pipeline.models import tiny

    tok = tiny.byte_level_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True, initializer_range=0.3,
                         dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory):
    return make_wide_model(tmp_path_factory.mktemp("vllm") / "wide")


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
