"""Prompt templates shipped as recipe files: `{name}` placeholders, checked when read, filled by plain
replacement (so a prompt may hold other braces, e.g. JSON examples)."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import TunebuildError


def read_template(path: Path, placeholders: tuple[str, ...], what: str = "prompt template") -> str:
    text = Path(path).read_text(encoding="utf-8")
    for ph in placeholders:
        if "{" + ph + "}" not in text:
            raise TunebuildError(f"{path}: {what} lacks the placeholder {{{ph}}}")
    return text


def render(template: str, **values) -> str:
    for k, v in values.items():
        template = template.replace("{" + k + "}", str(v))
    return template
