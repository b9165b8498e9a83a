"""Stage `scores`: the only writer of `artifacts/scores.duckdb`.

Loads a recipe's evaluation results (one artifact per model x suite) as rows of the `scores` table: one row per
(recipe, model, suite, task, subject, metric) with value, stderr, n and lineage: model digest (the model folder's
manifest, or the hub id), dataset digest (the filtered dataset the model was tuned on), eval config digest (the
resolved lm-eval task configs, the eval settings, the engine and the harness version), package versions and
the engine that made the number (`hf`, or `vllm <version>`; for the judge's rates, the engine of the judged
answers). A recipe's rows are replaced in one transaction, under a file lock, so parallel builds never write the
database at once.
The table `pairs` holds the pairs a recipe compares (base → sft → dpo: each training stage with the model it
started from, then base → the final model when that is not one of them; the final model with each
`[eval.models]` model); the view `comparison` joins their scores per (recipe, suite, task, subject, metric).
A metric lm-eval gives no count for (a group's) gets n from the documents behind it (`group_n`).

Per-document scores (lm-eval's samples) go into `items`, and base vs tuned is compared on the same documents
(matched by lm-eval's doc_hash) in `paired`: per subject (each lm-eval leaf task), per category of the suite's
`categories` mapping and overall, micro (documents pooled) and macro (subjects weighted equally) averages
labelled as such, with the delta, a paired bootstrap CI (`ci_low`, `ci_high`), `p_value` (McNemar's exact test
for 0/1 metrics, Wilcoxon otherwise, bootstrap for macro averages) and `p_holm` (Holm across a suite's subjects).
Views: `subject_deltas`, `category_deltas`, `micro`, `macro`. Two models evaluated with different eval configs are
never paired: the stage fails and says which settings differ.

Contract: reads nothing of the recipe but what its evaluations were; consumes every `evaluation` and `judgement`
of the recipe; writes `artifacts/scores.duckdb` (unkeyed, under a file lock) and `artifacts/<recipe>/scores/`
(the rows it loaded), and provides `scores` for the report. Never cached: the database is the output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.core.store import file_lock
from pipeline.digests import digest_json, input_digest

STAGE = Stage(name="scores", version=5, phase="scores", cache=False, verbosity=1,
              doc="Load a recipe's evaluation results into artifacts/scores.duckdb.")


def tasks(plan):
    entries, results = [], {}
    for p in plan.products("evaluation"):
        src = p.info["model"]
        entries.append({"role": p.info["role"], "model_ref": src.ref, "suite": p.info["suite"], "result": p.out,
                        "model": src.location, "dataset": list(src.datasets) or None,
                        "categories": p.info["categories"]})
        results[p.name] = p.out
    judge = None
    for p in plan.products("judgement"):
        judge = {"result": p.out, "model": p.info["model"].location, "model_ref": p.info["model"].ref,
                 "role": p.info["role"], "reference": p.info["reference"], "prompt": p.info["prompt"]}
        results[p.name] = p.out
    pairs = [list(p) for p in plan.comparisons()]
    final, stages = plan.final(), len(plan.section("train"))
    if final != "base" and ["base", final] not in pairs:  # base → final too, after each stage with its start
        pairs.insert(stages, ["base", final])
    logs = {p.name: p.info["log"] for p in plan.products("model") if "log" in p.info}
    results.update({f"log:{k}": v for k, v in logs.items()})
    categories = sorted({e["categories"] for e in entries if e["categories"]})
    if not entries and not judge:
        return
    db = plan.db
    yield plan.task(STAGE, plan.name, plan.out(STAGE), file_dep=[*(str(Path(o) / "manifest.json")
                                                                   for o in results.values()), *categories],
                    config={"entries": entries, "judge": judge, "pairs": pairs, "logs": logs},
                    params={"recipe": plan.name, "entries": entries, "judge": judge, "pairs": pairs, "logs": logs},
                    unkeyed={"db": db},
                    uptodate=((os.path.exists, [db]),), provides=("scores", plan.name, {}),
                    doc=f"load {plan.name}'s results into {db}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    recipe TEXT, model TEXT, model_ref TEXT, suite TEXT, task TEXT, subject TEXT, metric TEXT, filter TEXT,
    value DOUBLE, stderr DOUBLE, n INTEGER, higher_is_better BOOLEAN,
    model_digest TEXT, dataset_digest TEXT, eval_config_digest TEXT, packages JSON, engine TEXT
);
ALTER TABLE scores ADD COLUMN IF NOT EXISTS engine TEXT;
CREATE TABLE IF NOT EXISTS pairs (recipe TEXT, model_a TEXT, model_b TEXT, position INTEGER);
CREATE TABLE IF NOT EXISTS train_log (recipe TEXT, stage TEXT, step INTEGER, epoch DOUBLE, metric TEXT, value DOUBLE);
CREATE OR REPLACE VIEW comparison AS
SELECT p.recipe, p.model_a, p.model_b, a.suite, a.task, a.subject, a.metric, a.filter, a.n,
       a.value AS a, b.value AS b, b.value - a.value AS delta, a.higher_is_better,
       a.eval_config_digest = b.eval_config_digest AS same_eval_config, a.engine AS engine_a, b.engine AS engine_b,
       p.position
FROM pairs p
JOIN scores a ON a.recipe = p.recipe AND a.model = p.model_a
JOIN scores b ON b.recipe = p.recipe AND b.model = p.model_b AND a.suite = b.suite AND a.task = b.task
 AND a.subject = b.subject AND a.metric = b.metric AND a.filter = b.filter;
CREATE TABLE IF NOT EXISTS items (
    recipe TEXT, model TEXT, suite TEXT, task TEXT, metric TEXT, filter TEXT, doc_hash TEXT, doc_id INTEGER,
    value DOUBLE
);
CREATE TABLE IF NOT EXISTS paired (
    recipe TEXT, suite TEXT, metric TEXT, filter TEXT, model_a TEXT, model_b TEXT, level TEXT, name TEXT,
    average TEXT, n INTEGER, subjects INTEGER, a DOUBLE, b DOUBLE, delta DOUBLE, ci_low DOUBLE, ci_high DOUBLE,
    p_value DOUBLE, p_holm DOUBLE, test TEXT, ci_excludes_zero BOOLEAN
);
CREATE OR REPLACE VIEW subject_deltas AS SELECT * FROM paired WHERE level = 'subject';
CREATE OR REPLACE VIEW category_deltas AS SELECT * FROM paired WHERE level IN ('category', 'overall');
CREATE OR REPLACE VIEW micro AS SELECT * FROM paired WHERE average = 'micro';
CREATE OR REPLACE VIEW macro AS SELECT * FROM paired WHERE average = 'macro';
"""
PAIRED = ["recipe", "suite", "metric", "filter", "model_a", "model_b", "level", "name", "average", "n", "subjects",
          "a", "b", "delta", "ci_low", "ci_high", "p_value", "p_holm", "test", "ci_excludes_zero"]
COLUMNS = ["recipe", "model", "model_ref", "suite", "task", "subject", "metric", "filter", "value", "stderr", "n",
           "higher_is_better", "model_digest", "dataset_digest", "eval_config_digest", "packages", "engine"]


def rows_for(recipe: str, entry: dict) -> list[dict]:
    result = _result(entry)
    model = entry["model"]
    model_digest = input_digest(Path(model)) if Path(model).is_dir() else f"hub:{model}"
    datasets = entry.get("dataset") or []
    dataset_digest = (input_digest(Path(datasets[0])) if len(datasets) == 1 else
                      digest_json([input_digest(Path(d)) for d in datasets])) if datasets else None
    eval_digest = digest_json(eval_config_of(result, documents_of(entry)))
    better = result.get("higher_is_better", {})
    counts = item_counts(entry)
    rows = []
    for m in result["metrics"]:
        rows.append({"recipe": recipe, "model": entry["role"], "model_ref": entry["model_ref"],
                     "suite": entry["suite"], "task": m["task"], "subject": m["subject"], "metric": m["metric"],
                     "filter": m["filter"], "value": m["value"], "stderr": m["stderr"],
                     "n": m["n"] if m["n"] is not None else group_n(result, m, counts),
                     "higher_is_better": better.get(m["task"], {}).get(m["metric"]),
                     "model_digest": model_digest, "dataset_digest": dataset_digest,
                     "eval_config_digest": eval_digest, "packages": json.dumps(result["packages"], sort_keys=True),
                     "engine": result["eval_config"].get("engine", "hf")})
    return rows


def _samples(entry: dict):
    """(task, sample) for every line of an evaluation's samples/<task>.jsonl."""
    folder = Path(entry["result"]) / "samples"
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line:
                yield path.stem, json.loads(line)


def item_counts(entry: dict) -> dict[tuple, int]:
    """(task, metric, filter) -> how many documents the evaluation scored."""
    counts: dict[tuple, int] = {}
    for task, s in _samples(entry):
        for metric in s.get("metrics", []):
            key = (task, metric, s.get("filter", "none"))
            counts[key] = counts.get(key, 0) + 1
    return counts


def group_n(result: dict, m: dict, counts: dict[tuple, int]) -> int | None:
    """The documents behind a metric lm-eval gives no count for: its own samples, or for a group (a task with
    no config of its own) the documents of its subtasks: those lm-eval lists (`group_subtasks`), else, when the
    evaluation holds one group only, every subtask. None when that cannot be known (nested groups)."""
    own = counts.get((m["task"], m["metric"], m["filter"]))
    if own is not None:
        return own
    configs = result.get("configs", {})
    if m["task"] in configs:
        return None
    members = result.get("group_subtasks", {}).get(m["task"])
    if members is None:
        groups = {x["task"] for x in result["metrics"] if x["task"] not in configs}
        members = list(configs) if groups == {m["task"]} else []
    found = [counts[k] for t in members if (k := (t, m["metric"], m["filter"])) in counts]
    return sum(found) if found else None


def documents_of(entry: dict) -> dict[str, str]:
    """Per task, a digest of the documents the evaluation scored (lm-eval's `doc_hash` of each document, i.e. the
    content of each data row): an edit of one row of a suite's data file changes it."""
    docs: dict[str, set] = {}
    for task, s in _samples(entry):
        docs.setdefault(task, set()).add((s.get("doc_id"), s.get("doc_hash")))
    return {t: digest_json(sorted(d, key=repr)) for t, d in sorted(docs.items())}


def items_for(recipe: str, entry: dict) -> list[tuple]:
    """Per-document metric values from lm-eval's samples (numeric metrics only)."""
    out = []
    for task, s in _samples(entry):
        for metric in s.get("metrics", []):
            v = s.get(metric)
            if isinstance(v, bool) or isinstance(v, (int, float)):
                out.append((recipe, entry["role"], entry["suite"], task, metric, s.get("filter", "none"),
                            s.get("doc_hash") or str(s.get("doc_id")), s.get("doc_id"), float(v)))
    return out


def eval_config_of(result: dict, documents: dict | None = None) -> dict:
    """What makes two evaluations comparable: the eval settings, the resolved lm-eval task configs, the harness
    version and the documents scored (`documents_of`: the suite's data, row by row). Its digest is each score
    row's `eval_config_digest`; pairing refuses when it differs."""
    return {"eval": result["eval_config"], "configs": result.get("configs", {}),
            "lm_eval": result["packages"].get("lm_eval"), "data": documents or {}}


def _result(entry: dict) -> dict:
    return json.loads((Path(entry["result"]) / "results.json").read_text())


def check_comparable(suite: str, a: dict, b: dict, name_a: str = "base", name_b: str = "tuned") -> None:
    """Refuse to compare two evaluations whose configs differ, saying what differs."""
    from pipeline.core.store import config_diff
    from pipeline.errors import TunebuildError

    diff = config_diff(a, b)
    if diff:
        more = f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""
        raise TunebuildError(f"suite {suite}: {name_a} and {name_b} were evaluated with different eval configs, "
                             f"so they are not compared: {'; '.join(diff[:5])}{more}")


def read_categories(path: str | None, subjects: list[str]) -> dict[str, list[str]]:
    from pipeline.errors import TunebuildError

    if not path:
        return {}
    mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [s for s in subjects if s not in mapping]
    if missing:
        raise TunebuildError(f"{path}: no category for subject(s) {', '.join(missing)}: every lm-eval task of "
                             f"the suite needs one")
    return {s: [mapping[s]] if isinstance(mapping[s], str) else list(mapping[s]) for s in subjects}


def paired_rows(recipe: str, entries: list[dict], items: list[tuple], pairs: list[list[str]]) -> list[dict]:
    """Each pair of models (base → sft, sft → dpo, final → each extra) on the same documents, per suite, metric
    and filter."""
    from pipeline.evaluation.stats import paired_summary

    by_role_suite = {(e["role"], e["suite"]): e for e in entries}
    values: dict[tuple, dict[str, float]] = {}
    for _, role, suite, task, metric, filt, doc, _, v in items:
        values.setdefault((role, suite, task, metric, filt), {})[doc] = v
    out = []
    for suite, (role_a, role_b) in [(s, p) for s in sorted({e["suite"] for e in entries}) for p in pairs]:
        base, tuned = by_role_suite.get((role_a, suite)), by_role_suite.get((role_b, suite))
        if not base or not tuned:
            continue
        keys = sorted({k[2:] for k in values if k[1] == suite and k[0] == role_a} &
                      {k[2:] for k in values if k[1] == suite and k[0] == role_b})
        if not keys:
            continue
        check_comparable(suite, eval_config_of(_result(base), documents_of(base)),
                         eval_config_of(_result(tuned), documents_of(tuned)), role_a, role_b)
        for metric, filt in sorted({(m, f) for _, m, f in keys}):
            subjects = {}
            for task in sorted({t for t, m, f in keys if (m, f) == (metric, filt)}):
                a, b = values[(role_a, suite, task, metric, filt)], values[(role_b, suite, task, metric, filt)]
                docs = sorted(set(a) & set(b))
                subjects[task] = ([a[d] for d in docs], [b[d] for d in docs])
            categories = read_categories(tuned.get("categories"), sorted(subjects))
            for r in paired_summary(subjects, categories):
                out.append({"recipe": recipe, "suite": suite, "metric": metric, "filter": filt, "model_a": role_a,
                            "model_b": role_b, **r.__dict__,
                            "ci_excludes_zero": bool(r.ci_low > 0 or r.ci_high < 0)})
    return out


HIGHER = {"win_rate": True, "lc_win_rate": True, "score": True, "grade": True, "reference_grade": True,
          "loss_rate": False, "position_bias_rate": False, "no_verdict_rate": False, "ungraded_rate": False}


def judge_rows(recipe: str, judge: dict | None) -> list[dict]:
    """The LLM judge's rates as score rows of the judged model (suite 'judge', task = the mode). Each row's n is
    what its rate is over: the judged instructions for win / tie / loss / score (no verdict is its own outcome),
    every instruction for `no_verdict_rate`; a rate with nothing judged is NULL."""
    if not judge:
        return []
    result = json.loads((Path(judge["result"]) / "results.json").read_text())
    engine = result.get("answers_engine", "hf")
    digest = digest_json({"mode": result["mode"], "judge": result["judge"],
                          "prompt": input_digest(Path(judge["prompt"])), "answers_engine": engine})
    return [{"recipe": recipe, "model": judge["role"], "model_ref": judge["model_ref"], "suite": "judge",
             "task": result["mode"], "subject": judge.get("reference", ""), "metric": k, "filter": "none", "value": v,
             "stderr": None,
             "n": result.get("metric_n", {}).get(k, result["n"]), "higher_is_better": HIGHER.get(k),
             "model_digest": input_digest(Path(judge["model"])),
             "dataset_digest": None, "eval_config_digest": digest, "packages": json.dumps({"judge": result["judge"]}),
             "engine": engine}
            for k, v in sorted(result["metrics"].items())]


def train_rows(recipe: str, logs: dict) -> list[tuple]:
    """Each training stage's log history (loss, learning rate, grad norm, DPO rewards) as long rows."""
    out = []
    for stage, folder in sorted(logs.items()):
        path = Path(folder) / "train_log.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            row = json.loads(line)
            out += [(recipe, stage, row["step"], row.get("epoch"), k, v) for k, v in sorted(row.items())
                    if k not in ("step", "epoch")]
    return out


def run(out_dir: Path, *, recipe: str, entries: list[dict], db: Path, judge: dict | None = None,
        pairs: list | None = None, logs: dict | None = None, config: dict | None = None) -> dict:
    import duckdb

    pairs = pairs or []
    curves = train_rows(recipe, logs or {})
    rows = [r for e in entries for r in rows_for(recipe, e)] + judge_rows(recipe, judge)
    items = [i for e in entries for i in items_for(recipe, e)]
    paired = paired_rows(recipe, entries, items, pairs)
    with open(out_dir / "paired.jsonl", "w", encoding="utf-8") as f:
        for r in paired:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    with open(out_dir / "train_log.jsonl", "w", encoding="utf-8") as f:
        for r in curves:
            f.write(json.dumps(r) + "\n")
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
            con.execute("DELETE FROM train_log WHERE recipe = ?", [recipe])
            if curves:
                con.executemany("INSERT INTO train_log VALUES (?, ?, ?, ?, ?, ?)", curves)
            con.execute("DELETE FROM pairs WHERE recipe = ?", [recipe])
            if pairs:
                con.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?)",
                                [[recipe, a, b, i] for i, (a, b) in enumerate(pairs)])
            con.execute("DELETE FROM items WHERE recipe = ?", [recipe])
            if items:
                con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", items)
            con.execute("DELETE FROM paired WHERE recipe = ?", [recipe])
            if paired:
                con.executemany(f"INSERT INTO paired ({', '.join(PAIRED)}) VALUES ({', '.join('?' * len(PAIRED))})",
                                [[r[c] for c in PAIRED] for r in paired])
            con.execute("COMMIT")
        finally:
            con.close()
    print(f"scores: {len(rows)} rows, {len(items)} per-document scores, {len(paired)} paired comparisons "
          f"for recipe {recipe} in {db}")
    return {"rows": len(rows), "items": len(items), "paired": len(paired)}
