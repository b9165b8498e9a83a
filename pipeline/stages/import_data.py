"""Stage `import`: a dataset people already publish, from a file under recipes/ or the Hugging Face hub, into the
canonical dataset artifact.

Contract: reads `[data.<name>]` (every table whose source is not `generate`); consumes the file it names (a hub
dataset is a keyed parameter: pin `revision` to make it reproducible); writes `artifacts/<recipe>/data/<name>/`
(`train.jsonl`, `heldout.jsonl`, `dropped.jsonl`, `report.json`, `lengths.png`, and `similarity.png` with
`dedup`) and provides it as a `dataset`. An import that keeps no training example fails, and its report (with
every dropped row and why) is kept as a log, `artifacts/<recipe>/logs/import-<name>.report.json`.

Steps: read the rows (JSON, JSONL, Parquet, CSV, or `datasets.load_dataset` for a hub id), shuffle with
`shuffle_seed` and keep `limit` rows, recognise the format (`auto`) or use the one given, convert each row to the
canonical record (`pipeline.data.formats`), drop or refuse bad rows (`on_bad_row`), with `dedup` drop instructions
whose ROUGE-L against an earlier kept one is above `rouge_threshold`, then split train / held-out by content hash.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from pipeline.core.recipe.checks import is_local_source
from pipeline.core.stage import Stage
from pipeline.errors import TunebuildError

STAGE = Stage(name="import", version=1, phase="data", section="data.<name>",
              doc="Import a dataset (Alpaca, ShareGPT, Dolly, messages, preference pairs) from a file or the hub.")
SHOW_BAD_ROWS = 5
DETECT_ROWS = 100


def tasks(plan):
    for name, d in sorted(plan.recipe.config["data"].items()):
        if d["source"] == "generate":
            continue
        inputs, params = {}, {"where": f"{plan.recipe.path.name}: data.{name}"}
        if is_local_source(d["source"]):
            inputs["file"] = plan.rel(d["source"])
        else:
            params["hub_id"] = d["source"]
        yield plan.task(STAGE, f"{plan.name}.{name}", plan.out("data", name), inputs=inputs, params=params,
                        unkeyed={"failure_log": str(plan.out("logs", f"import-{name}.report.json"))},
                        config=d, provides=("dataset", name, {"format": d["format"]}),
                        doc=f"import {d['source']} as {plan.name}'s dataset {name}")


def _hub_rows(hub_id: str, c: dict, where: str):
    """(label, rows, resolved revision) of a hub dataset, or one line saying why it cannot be had."""
    from pipeline.models.hf import load_hub_dataset

    rows, revision = load_hub_dataset(hub_id, subset=c["subset"], split=c["split"], revision=c["revision"],
                                      where=where)
    return f"hub:{hub_id}[{c['split']}]", rows, revision


def instruction_of(record: dict) -> str:
    """The text ROUGE dedup compares: the first user turn (SFT) or the last user turn of the prompt (preference)."""
    msgs = record["prompt"] if "prompt" in record else record["messages"]
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return (users[-1] if "prompt" in record else users[0]) if users else ""


def _failure_log(path) -> Path | None:
    """Where the report of an import that keeps no training example goes: a log, `artifacts/<recipe>/logs/`,
    outside the artifact's temporary folder (removed when the task fails) and outside any artifact."""
    if path is None:
        return None
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or p.parts[:1] != ("artifacts",) or not p.name.endswith(".report.json"):
        raise TunebuildError(f"import: failure log {path!r} is not a report file under artifacts/")
    return p


def _keep_failure_report(log: Path | None, report: dict, dropped: list[dict]) -> str:
    """Write the report (and every dropped row with its reason) to `log`; the words pointing at it."""
    if log is None:
        return ""
    log.parent.mkdir(parents=True, exist_ok=True)
    tmp = log.with_name(f"{log.name}.tmp")
    tmp.write_text(json.dumps({**report, "dropped": dropped}, indent=1, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    tmp.replace(log)
    return f" (see {log} for what was dropped and why)"


def run(out_dir: Path, *, config: dict, where: str, file: Path | None = None, hub_id: str | None = None,
        failure_log: str | None = None) -> dict:
    from pipeline.data.convert import to_canonical
    from pipeline.data.dataset import NoTrainingExample
    from pipeline.data.detect import detect
    from pipeline.data.formats import BadRow, FormatError, RowError
    from pipeline.data.read import read_rows

    c = config
    log = _failure_log(failure_log)
    revision = None
    try:
        if file is not None:
            label, rows = Path(file).as_posix(), list(read_rows(Path(file)))
        else:
            label, rows, revision = _hub_rows(hub_id, c, where)
    except RowError as e:
        raise TunebuildError(str(e)) from None
    except FormatError as e:
        raise TunebuildError(f"{where}: {e}") from None
    rows_read = len(rows)
    if c["shuffle_seed"] is not None:
        random.Random(c["shuffle_seed"]).shuffle(rows)
    if c["limit"]:
        rows = rows[: c["limit"]]
    if not rows:
        raise TunebuildError(f"{label}: no rows")
    columns = c["columns"] or None
    fmt = c["format"]
    if fmt == "auto":
        try:
            fmt = detect([r for _, r in rows[:DETECT_ROWS]], columns)
        except FormatError as e:
            raise TunebuildError(f"{label}: {e}") from None
        print(f"import: {label}: format detected as {fmt!r} (set data.<name>.format to choose)", flush=True)

    records, bad = [], []
    for n, row in rows:
        try:
            rec = to_canonical(row, fmt, columns)
        except BadRow as e:
            bad.append({"row": n, "field": e.field, "expected": e.expected})
            continue
        records.append({**rec, "row": n})
    if bad:
        shown = "; ".join(f"{label}:{b['row']}: {b['field']}: {b['expected']}" for b in bad[:SHOW_BAD_ROWS])
        more = f" (+{len(bad) - SHOW_BAD_ROWS} more)" if len(bad) > SHOW_BAD_ROWS else ""
        if c["on_bad_row"] == "error":
            raise TunebuildError(f"{len(bad)} bad row(s) as {fmt}: {shown}{more} — fix them, or set "
                                 f"on_bad_row = 'skip' to drop them")
        print(f"import: {label}: skipped {len(bad)} bad row(s) of {len(rows)}: {shown}{more}", flush=True)

    dropped = [{"row": b["row"], "reason": f"bad row: {b['field']}: {b['expected']}"} for b in bad]
    report = {"source": label, "format": fmt, "format_detected": c["format"] == "auto", "revision": revision,
              "rows_read": rows_read, "rows_used": len(rows), "bad_rows": len(bad)}
    if c["dedup"]:
        records, dup = _dedup(records, c, out_dir)
        dropped += dup
        report["dedup_dropped"] = len(dup)
    dropped.sort(key=lambda d: d["row"])
    reasons = Counter("bad row" if d["reason"].startswith("bad row") else d["reason"] for d in dropped)
    report.update(kept=len(records), dropped_by_reason=dict(sorted(reasons.items())))
    with open(out_dir / "dropped.jsonl", "w", encoding="utf-8") as f:
        for d in dropped:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    from pipeline.data.dataset import finish

    try:
        report = finish(out_dir, records, c["heldout_fraction"], report, f"{label} ({fmt}): {len(records)} records")
    except NoTrainingExample as e:
        r = e.report
        why = [f"{r['bad_rows']} bad row(s) skipped (on_bad_row = 'skip')" if r["bad_rows"] else "",
               f"{r.get('dedup_dropped', 0)} ROUGE-L duplicate(s) dropped" if r.get("dedup_dropped") else "",
               f"{r['heldout_examples']} held out (heldout_fraction = {c['heldout_fraction']})"
               if r["heldout_examples"] else ""]
        raise TunebuildError(f"{label}: no training example left of {r['rows_used']} row(s): "
                             f"{', '.join(w for w in why if w) or 'none kept'}"
                             f"{_keep_failure_report(log, r, dropped)}") from None
    if log is not None:
        log.unlink(missing_ok=True)  # the import succeeds now: an earlier failure's report no longer applies
    print(f"import: {label}: {rows_read} rows read, {len(records)} kept ({report['train_examples']} train, "
          f"{report['heldout_examples']} held out), {len(dropped)} dropped", flush=True)
    return report


def _dedup(records: list[dict], c: dict, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """The filter's exact ROUGE-L rule over the records' instructions, in row order."""
    from pipeline.data.rouge import dedup
    from pipeline.evaluation.plots import similarity_histogram

    texts = [instruction_of(r) for r in records]
    tokenizer = "auto" if c["language"] == "zh" else "default"
    result = dedup(texts, (), c["rouge_threshold"], tokenizer)
    kept, dropped = [], []
    for rec, keep, (similar, score) in zip(records, result.keep, result.match):
        if keep:
            kept.append(rec)
        else:
            dropped.append({"row": rec["row"], "reason": f"ROUGE-L above {c['rouge_threshold']}",
                            "instruction": instruction_of(rec), "most_similar": similar, "score": round(score, 4)})
    similarity_histogram(out_dir / "similarity.png", result.histogram, threshold=c["rouge_threshold"],
                         title=f"{len(texts)} instructions ({tokenizer} tokens)")
    return kept, dropped
