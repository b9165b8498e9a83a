"""The stage architecture: stages declare themselves, never import each other, and the graph and runner know
none of them by name."""
import ast
import re

from conftest import ROOT
from pipeline.core.graph import discover_stages
from pipeline.core.stage import PHASES, Stage

STAGES = ROOT / "pipeline" / "stages"


def test_every_stage_module_declares_its_contract():
    found = discover_stages()
    modules = sorted(p.stem for p in STAGES.glob("*.py") if p.stem != "__init__")
    assert sorted(m.__name__.rsplit(".", 1)[1] for _, m in found) == modules
    for stage, module in found:
        assert isinstance(stage, Stage) and stage.phase in PHASES and stage.doc and stage.version >= 1
        assert callable(module.tasks) and callable(module.run), module.__name__
        assert f"Stage `{stage.name}`" in module.__doc__ and "Contract" in module.__doc__, module.__name__


def test_no_stage_imports_another_stage():
    for path in STAGES.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("pipeline.stages") for n in names), f"{path.name} imports {names}"


def test_graph_and_runner_name_no_stage():
    names = {s.name for s, _ in discover_stages()} | {s.task_basename for s, _ in discover_stages()}
    for path in (ROOT / "pipeline/core/graph.py", ROOT / "pipeline/core/runner.py"):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        tree = ast.parse(code)
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not names & strings, f"{path.name} names stages {names & strings}"
        assert not re.search(r"stage\s*(==|!=|in)\s*[\(\[\"']", code), path.name


def test_stage_modules_are_light_to_import():
    """dodo.py imports every stage module: none may pull in torch, numpy, transformers or duckdb at load."""
    import subprocess
    import sys

    code = ("import sys, pipeline.core.graph as g; g.discover_stages(); "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'duckdb', 'datasets', 'trl', 'lm_eval') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
