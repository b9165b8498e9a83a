"""Stage `scores`: the only writer of `artifacts/scores.duckdb`.

Loads a recipe's evaluation results (one artifact per model x suite) as rows of the `scores` table: one row per
(recipe, model, suite, task, subject, metric) with value, stderr, n and lineage: model digest (the model folder's
manifest, or the hub id), dataset digest (the filtered dataset the model was tuned on), eval config digest (the
resolved lm-eval task configs, the eval settings and the harness version) and package versions. A recipe's rows
are replaced in one transaction, under a file lock, so parallel builds never write the database at once.
The view `comparison` pairs base and tuned per (recipe, suite, task, subject, metric).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.store import digest_json, file_lock, input_digest

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    recipe TEXT, model TEXT, model_ref TEXT, suite TEXT, task TEXT, subject TEXT, metric TEXT, filter TEXT,
    value DOUBLE, stderr DOUBLE, n INTEGER, higher_is_better BOOLEAN,
    model_digest TEXT, dataset_digest TEXT, eval_config_digest TEXT, packages JSON
);
CREATE OR REPLACE VIEW comparison AS
SELECT b.recipe, b.suite, b.task, b.subject, b.metric, b.filter, b.n,
       b.value AS base, t.value AS tuned, t.value - b.value AS delta, b.higher_is_better,
       b.eval_config_digest = t.eval_config_digest AS same_eval_config
FROM scores b JOIN scores t
  ON b.recipe = t.recipe AND b.suite = t.suite AND b.task = t.task AND b.subject = t.subject
 AND b.metric = t.metric AND b.filter = t.filter
WHERE b.model = 'base' AND t.model = 'tuned';
"""
COLUMNS = ["recipe", "model", "model_ref", "suite", "task", "subject", "metric", "filter", "value", "stderr", "n",
           "higher_is_better", "model_digest", "dataset_digest", "eval_config_digest", "packages"]


def rows_for(recipe: str, entry: dict) -> list[dict]:
    result = json.loads((Path(entry["result"]) / "results.json").read_text())
    model = entry["model"]
    model_digest = input_digest(Path(model)) if Path(model).is_dir() else f"hub:{model}"
    dataset_digest = input_digest(Path(entry["dataset"])) if entry.get("dataset") else None
    eval_digest = digest_json({"eval": result["eval_config"], "configs": result.get("configs", {}),
                               "lm_eval": result["packages"].get("lm_eval")})
    better = result.get("higher_is_better", {})
    rows = []
    for m in result["metrics"]:
        rows.append({"recipe": recipe, "model": entry["role"], "model_ref": entry["model_ref"],
                     "suite": entry["suite"], "task": m["task"], "subject": m["subject"], "metric": m["metric"],
                     "filter": m["filter"], "value": m["value"], "stderr": m["stderr"], "n": m["n"],
                     "higher_is_better": better.get(m["task"], {}).get(m["metric"]),
                     "model_digest": model_digest, "dataset_digest": dataset_digest,
                     "eval_config_digest": eval_digest, "packages": json.dumps(result["packages"], sort_keys=True)})
    return rows


def run(out_dir: Path, *, recipe: str, entries: list[dict], db: Path, config: dict | None = None) -> dict:
    import duckdb

    rows = [r for e in entries for r in rows_for(recipe, e)]
    with open(out_dir / "rows.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    db = Path(db)
    with file_lock(db):
        con = duckdb.connect(str(db))
        try:
            con.execute(SCHEMA)
            con.execute("BEGIN TRANSACTION")
            con.execute("DELETE FROM scores WHERE recipe = ?", [recipe])
            if rows:
                con.executemany(f"INSERT INTO scores ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                                [[r[c] for c in COLUMNS] for r in rows])
            con.execute("COMMIT")
        finally:
            con.close()
    print(f"scores: {len(rows)} rows for recipe {recipe} in {db}")
    return {"rows": len(rows)}
