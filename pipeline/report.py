"""Stage `report`: the base-vs-tuned comparison of one recipe, read from `artifacts/scores.duckdb`.

Prints the table and writes it as `comparison.md`. A delta is marked better/worse by the metric's direction;
a pair whose eval configs differ is flagged instead of silently compared.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.store import file_lock


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def table(db: Path, recipe: str) -> list[tuple]:
    import duckdb

    with file_lock(Path(db)):
        con = duckdb.connect(str(db), read_only=True)
        try:
            return con.execute(
                "SELECT suite, task, metric, n, base, tuned, delta, higher_is_better, same_eval_config "
                "FROM comparison WHERE recipe = ? ORDER BY suite, task, metric", [recipe]).fetchall()
        finally:
            con.close()


def render(recipe: str, rows: list[tuple]) -> str:
    lines = [f"## {recipe}: base vs tuned", "",
             "| suite | task | metric | n | base | tuned | delta | |", "|---|---|---|---:|---:|---:|---:|---|"]
    for suite, task, metric, n, base, tuned, delta, hib, same in rows:
        if not same:
            verdict = "eval configs differ: not comparable"
        elif delta is None or hib is None or delta == 0:
            verdict = ""
        else:
            verdict = "better" if (delta > 0) == bool(hib) else "worse"
        lines.append(f"| {suite} | {task} | {metric} | {n} | {_fmt(base)} | {_fmt(tuned)} | {_fmt(delta)} | {verdict} |")
    return "\n".join(lines) + "\n"


def run(out_dir: Path, *, recipe: str, db: Path, scores: Path, config: dict | None = None) -> dict:
    text = render(recipe, table(Path(db), recipe))
    (out_dir / "comparison.md").write_text(text, encoding="utf-8")
    print("\n" + text, flush=True)
    return {}
