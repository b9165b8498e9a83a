"""The package's floors and the stage architecture: stages declare themselves and never import each other, the
graph and runner know none of them by name, and every module keeps to who may import whom (`pipeline/__init__.py`)."""
import ast
import re
import shutil

from conftest import ROOT
from pipeline.core.graph import discover_stages
from pipeline.core.stage import PHASES, Stage

PIPELINE = ROOT / "pipeline"
STAGES = PIPELINE / "stages"
GROUND = {"pipeline.errors", "pipeline.digests"}
LIBRARIES = ("pipeline.data", "pipeline.finetuning", "pipeline.evaluation", "pipeline.llm", "pipeline.models")
MAX_LINES = 420


def floor(name: str) -> str | None:
    """'ground', 'core', 'stage', 'library' or 'package' (pipeline/__init__.py, pipeline/stages/__init__.py);
    None for a module on no floor."""
    if name in GROUND:
        return "ground"
    if name in ("pipeline", "pipeline.stages"):
        return "package"
    if name == "pipeline.core" or name.startswith("pipeline.core."):
        return "core"
    if name.startswith("pipeline.stages."):
        return "stage"
    if any(name == lib or name.startswith(lib + ".") for lib in LIBRARIES):
        return "library"
    return None


def modules(root) -> dict:
    """{dotted name: path} of every module of the package under `root`, and of dodo.py (bound by the core's rules)."""
    found = {}
    for path in sorted((root / "pipeline").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found["dodo"] = root / "dodo.py"
    return found


def imports(path, name: str, known: dict) -> list[tuple[str, int, bool]]:
    """(imported pipeline module, line, inside a function?) for every import of the file, nested ones included:
    `from pipeline.core import graph` is pipeline.core.graph; a relative import is resolved against the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            out.extend((t, child.lineno, in_function) for t in targets if t == "pipeline" or t.startswith("pipeline."))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


def violations(root=ROOT, max_lines: int = MAX_LINES) -> list[str]:
    """One line per module that breaks the floors' rules (pipeline/__init__.py): `<file>:<line> imports <module>:
    <the rule>`, `<file>: N lines`, or a module on no floor."""
    known = modules(root)
    found = []
    for name, path in known.items():
        where = path.relative_to(root).as_posix()
        mine = "core" if name == "dodo" else floor(name)
        if mine is None:
            found.append(f"{where}: on no floor: the ground is {' and '.join(sorted(GROUND))}, then pipeline/core/, "
                         f"pipeline/stages/ and the libraries {', '.join(LIBRARIES)}")
            continue
        lines = len(path.read_text().splitlines())
        if lines > max_lines:
            found.append(f"{where}: {lines} lines, more than {max_lines}: split it")
        for target, line, nested in imports(path, name, known):
            theirs = "stage" if target == "pipeline.stages" else floor(target)
            at = f"{where}:{line} imports {target}"
            if mine == "ground":
                found.append(f"{at}: the ground imports nothing else from pipeline")
            elif mine == "library" and theirs in ("core", "stage"):
                found.append(f"{at}: a library imports only libraries and the ground, never the core or a stage")
            elif mine == "stage" and theirs == "stage":
                found.append(f"{at}: a stage never imports another stage (share through a library or the core)")
            elif mine == "core" and theirs == "stage" and target != "pipeline.stages":
                found.append(f"{at}: the core names no stage module (the graph discovers pipeline/stages/)")
            elif mine == "core" and theirs == "library" and not nested:
                found.append(f"{at}: the core imports a library only inside a function (dodo.py stays light)")
    return found


def test_every_module_keeps_to_its_floor():
    """Who may import whom (imports inside functions included) and at most MAX_LINES lines per module."""
    found = violations()
    assert not found, f"{len(found)} break(s) of the rule in pipeline/__init__.py:\n" + "\n".join(found)


def test_each_broken_rule_is_reported_with_its_file_and_line(tmp_path):
    shutil.copytree(PIPELINE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dodo.py", tmp_path / "dodo.py")
    planted = {
        "pipeline/stages/merge.py": ("from pipeline.stages import sft", "pipeline.stages.sft: a stage never imports"),
        "pipeline/stages/sweep.py": ("def f():\n    import pipeline.stages.report", "pipeline.stages.report: a stage"),
        "pipeline/data/dataset.py": ("from pipeline.core.store import file_lock", "pipeline.core.store: a library"),
        "pipeline/llm/ledger.py": ("def f():\n    from pipeline.stages import judge",
                                   "pipeline.stages.judge: a library"),
        "pipeline/core/runner.py": ("def f():\n    from pipeline.stages import sft",
                                    "pipeline.stages.sft: the core names"),
        "pipeline/core/graph.py": ("from pipeline.models import hf", "pipeline.models.hf: the core imports a library"),
        "pipeline/digests.py": ("from pipeline import errors", "pipeline.errors: the ground imports nothing"),
        "dodo.py": ("from pipeline.data.read import read_rows", "pipeline.data.read: the core imports a library"),
    }
    expected = []
    for rel, (code, message) in planted.items():
        path = tmp_path / rel
        text = path.read_text()
        path.write_text(text + code + "\n")
        target, rule = message.split(": ", 1)
        expected.append(f"{rel}:{len(text.splitlines()) + 1 + code.count(chr(10))} imports {target}: {rule}")
    (tmp_path / "pipeline/helpers.py").write_text("")
    (tmp_path / "pipeline/core/stage.py").write_text((PIPELINE / "core/stage.py").read_text() + "#\n" * 500)
    found = violations(tmp_path)
    for line in expected:
        assert any(v.startswith(line) for v in found), f"not reported: {line}\n" + "\n".join(found)
    assert any(v.startswith("pipeline/helpers.py: on no floor") for v in found)
    assert any(re.match(r"pipeline/core/stage.py: \d+ lines, more than 420", v) for v in found)
    assert len(found) == len(planted) + 2, "\n".join(found)


def test_every_stage_module_declares_its_contract():
    found = discover_stages()
    stage_modules = sorted(p.stem for p in STAGES.glob("*.py") if p.stem != "__init__")
    assert sorted(m.__name__.rsplit(".", 1)[1] for _, m in found) == stage_modules
    for stage, module in found:
        assert isinstance(stage, Stage) and stage.phase in PHASES and stage.doc and stage.version >= 1
        assert callable(module.tasks) and callable(module.run), module.__name__
        assert f"Stage `{stage.name}`" in module.__doc__ and "Contract" in module.__doc__, module.__name__


def test_graph_and_runner_name_no_stage():
    names = {s.name for s, _ in discover_stages()} | {s.task_basename for s, _ in discover_stages()}
    for rel in ("graph.py", "runner.py", "tasklist.py", "task_cache.py", "uptodate.py", "executor.py"):
        path = PIPELINE / "core" / rel
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


def _names_defined(path) -> set[str]:
    """What a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _resolves(dotted: str) -> bool:
    """`pipeline.a.b[.name[.attr]]` names a module of the tree, or something a module defines."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:k])
        module = next((m for m in (base.with_suffix(".py"), base / "__init__.py") if m.is_file()), None)
        if module is not None:
            rest = parts[k:]
            return not rest or (len(rest) <= 2 and rest[0] in _names_defined(module))
    return False


def test_the_module_paths_the_docs_name_exist():
    """Every `pipeline/...` path and `pipeline.x.y` name in the README, the recipe reference, dodo.py, pyproject.toml
    (the doit command entry points) and the package's own docstrings points at something that exists."""
    files = [ROOT / "README.md", ROOT / "recipes/REFERENCE.md", ROOT / "dodo.py", ROOT / "pyproject.toml",
             *sorted(PIPELINE.rglob("*.py"))]
    stale = []
    for path in files:
        text = path.read_text()
        stale += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"\bpipeline(?:\.\w+)+", text)
                  if not _resolves(m)]
        stale += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"\bpipeline/[\w./]*\w/?", text)
                  if not (ROOT / m).exists()]
    assert not stale, "\n".join(stale)
