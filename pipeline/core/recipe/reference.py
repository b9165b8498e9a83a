"""The recipe reference, `recipes/REFERENCE.md`, generated from the schema (`pipeline/core/recipe/schema.py`)."""
from __future__ import annotations

from pipeline.core.recipe.schema import REQUIRED, SCHEMA, TableOf


def reference() -> str:
    """The recipe reference (recipes/REFERENCE.md), generated from SCHEMA: every key, its type, default, allowed
    values and meaning. `python -m pipeline.core.recipe.reference > recipes/REFERENCE.md` rewrites it; a test keeps
    it current."""
    import json

    lines = ["# Recipe reference", "",
             "Generated from the schema (`pipeline/core/recipe/schema.py`) by "
             "`python -m pipeline.core.recipe.reference > recipes/REFERENCE.md`; a test fails when it is out of date. "
             "`<name>` stands for a name you choose. File keys are paths relative to `recipes/` and must stay inside "
             "it.", "",
             "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]

    def walk(schema: dict, prefix: str):
        for k, spec in schema.items():
            dotted = f"{prefix}{k}"
            if isinstance(spec, dict):
                walk(spec, dotted + ".")
            elif isinstance(spec, TableOf):
                walk(spec.schema, f"{dotted}.<name>.")
            else:
                short = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "table"}
                kind = "folder" if spec.folder else "file" if spec.file else short.get(spec.type, str(spec.type))
                default = "required" if spec.default is REQUIRED else (
                    "—" if spec.default is None else f"`{json.dumps(spec.default, ensure_ascii=False)}`")
                allowed = ", ".join(f"`{c}`" for c in spec.choices) if spec.choices else spec.range_text()
                lines.append(f"| `{dotted}` | {kind} | {default} | {allowed} | {spec.doc} |")

    walk(SCHEMA, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
