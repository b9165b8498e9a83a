"""Stage `sweep`: one results table for the variants of a sweep (a recipe with a `[sweep]` grid).

Contract: reads no recipe section (a variant's `sweep` info: its axes, labels and baseline); consumes every
variant's `scores`, its datasets' reports and its judge verdicts; writes `artifacts/report/<sweep>/` with
`sweep.md` and `sweep.csv` (a row per variant: its swept keys, the dataset size actually kept, the judge's win
rate with a 95% bootstrap CI and its length-controlled win rate, the held-out loss and each suite's micro average
of the final model), `sweep.png` (the headline metric per variant with its CI) and the comparison of every
variant with the baseline (the first value of every axis) on the same instructions, with Holm's correction
across variants, so a grid of twelve does not crown a winner by luck. Task `sweep:<sweep>`, part of
`doit build:<sweep>`. Never cached: it reads the scores database.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.stage import Stage

STAGE = Stage(name="sweep", version=2, phase="project", cache=False,
              doc="One results table for the variants of a sweep, each compared with the baseline (Holm).")
RESAMPLES = 2000


def tasks(plan):
    for name, variants in sorted(plan.project.sweeps().items()):
        scores, judges, data, rows = {}, {}, {}, []
        for v in variants:
            vp = plan.project.plans[v.name]
            s = vp.product("scores", v.name)
            if s is None:
                continue
            scores[v.name] = s.out
            for j in vp.products("judgement"):
                judges[v.name] = j.out
            final = vp.final()
            model = vp.product("model", final)
            for d in (model.info.get("datasets", ()) if model else ()):
                data[f"{v.name}/{Path(d).name}"] = d
            rows.append({"variant": v.name, "final": final, "axes": v.sweep["axes"]})
        if not rows:
            continue
        info = variants[0].sweep
        yield plan.task(STAGE, name, Path("artifacts") / "report" / name,
                        inputs={"scores": scores, "judges": judges, "data": data},
                        params={"sweep": name, "variants": rows, "baseline": info["baseline"],
                                "sort_by": info.get("sort_by"), "descending": info.get("descending", True)},
                        unkeyed={"db": plan.db}, provides=("sweep_report", name, {"group": name}),
                        meta={"recipe": name}, doc=f"the results table of the sweep {name} ({len(rows)} variants)")


def _outcomes(folder: Path | None) -> tuple[dict[str, float], int]:
    """The judged instructions' outcomes (win 1, tie ½, loss 0), and how many instructions were put to the judge:
    an instruction without a verdict is no outcome (never a tie)."""
    if folder is None:
        return {}, 0
    path = Path(folder) / "verdicts.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x] if path.is_file() else []
    rows = [r for r in rows if "outcome" in r]
    return {r["id"]: r["outcome"] for r in rows if r["outcome"] is not None}, len(rows)


def _ci(values, seed: int = 0) -> tuple[float, float]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(RESAMPLES, len(v)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _suite_means(db: Path, variant: str, final: str) -> dict[str, float]:
    """Each suite's micro average of the final model (documents pooled), and the held-out loss."""
    import duckdb

    from pipeline.core.store import file_lock

    with file_lock(Path(db)):
        con = duckdb.connect(str(db), read_only=True)
        try:
            micro = con.execute("SELECT suite, metric, b FROM paired WHERE recipe = ? AND model_b = ? AND "
                                "level = 'overall' AND average = 'micro' ORDER BY suite, metric",
                                [variant, final]).fetchall()
            loss = con.execute("SELECT value FROM scores WHERE recipe = ? AND model = ? AND suite = 'heldout' AND "
                               "metric = 'loss'", [variant, final]).fetchone()
            judge = dict(con.execute("SELECT metric, value FROM scores WHERE recipe = ? AND suite = 'judge'",
                                     [variant]).fetchall())
        finally:
            con.close()
    out = {}
    for suite, metric, value in micro:
        out.setdefault(f"{suite} {metric}", value)
    if loss:
        out["heldout loss"] = loss[0]
    if judge.get("lc_win_rate") is not None:
        out["lc win rate"] = judge["lc_win_rate"]
    return out


def run(out_dir: Path, *, sweep: str, variants: list[dict], baseline: str, db: Path, scores: dict, judges: dict,
        data: dict, sort_by: str | None = None, descending: bool = True, config: dict | None = None) -> dict:
    from pipeline.evaluation.plots import bar_chart
    from pipeline.evaluation.stats import holm, paired_p

    keys = [a["key"] for a in variants[0]["axes"]]
    asked = {v["variant"]: _outcomes(judges.get(v["variant"])) for v in variants}
    outcomes = {name: o for name, (o, _) in asked.items()}
    base = outcomes.get(baseline, {})
    table = []
    for v in variants:
        name = v["variant"]
        row = {"variant": name.split(".", 1)[1], **{a["key"]: a["value"] for a in v["axes"]}}
        reports = [json.loads((Path(d) / "report.json").read_text()) for k, d in sorted(data.items())
                   if k.startswith(name + "/")]
        row["train examples"] = sum(r.get("train_examples", 0) for r in reports)
        if any("seed_tasks_kept" in r for r in reports):
            row["tasks kept (seeds + machine)"] = sum(r.get("seed_tasks_kept", 0) + r.get("machine_tasks_kept", 0)
                                                      for r in reports)
        o, total = asked[name]
        if total:
            row["judged"] = len(o)
            row["no verdict rate"] = (total - len(o)) / total
        if o:
            vals = list(o.values())
            row["win rate"] = sum(x == 1.0 for x in vals) / len(vals)
            row["score"] = sum(vals) / len(vals)
            row["score CI"] = _ci(vals)
        row.update(_suite_means(Path(db), name, v["final"]))
        ids = sorted(set(o) & set(base)) if name != baseline else []
        if ids:
            import numpy as np

            a, b = np.array([base[i] for i in ids]), np.array([o[i] for i in ids])
            row["vs baseline"] = float((b - a).mean())
            row["vs baseline CI"] = _ci(b - a, seed=1)
            row["p"] = paired_p(a, b)[0]
        table.append(row)
    ps = [r.get("p") for r in table]
    for r, ph in zip(table, holm(ps)):
        if "p" in r:
            r["p (Holm)"] = ph
    headline = sort_by or ("score" if any("score" in r for r in table) else
                           next((k for k in table[0] if k.endswith(("acc", "acc_norm", "exact_match"))), None))
    if headline and all(headline in r for r in table):
        table.sort(key=lambda r: r[headline], reverse=descending)
    columns = list(dict.fromkeys(k for r in table for k in r))
    text = _markdown(sweep, baseline.split(".", 1)[1], keys, columns, table)
    (out_dir / "sweep.md").write_text(text, encoding="utf-8")
    _csv(out_dir / "sweep.csv", columns, table)
    if not (headline and all(headline in r for r in table)) and all("heldout loss" in r for r in table):
        headline = "heldout loss"  # nothing judged and no suite: plot what every variant has
    if headline and all(headline in r for r in table):
        errors = {headline: [r[f"{headline} CI"] for r in table]} if all(f"{headline} CI" in r for r in table) \
            else None
        bar_chart(out_dir / "sweep.png", [r["variant"] for r in table], {headline: [r[headline] for r in table]},
                  errors=errors, title=f"{sweep}: {headline} by variant (95% bootstrap CI)", ylabel=headline)
        text += f"\n![{headline} by variant](sweep.png)\n"
        (out_dir / "sweep.md").write_text(text, encoding="utf-8")
    print("\n" + text, flush=True)
    return {"variants": len(table)}


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _markdown(sweep: str, baseline: str, keys: list[str], columns: list[str], table: list[dict]) -> str:
    lines = [f"## Sweep {sweep}: {len(table)} variants", "",
             f"Swept: {', '.join(f'`{k}`' for k in keys)}. Baseline: `{baseline}` (the first value of every axis); "
             f"`vs baseline` is the mean difference of the judge's per-instruction outcome (win 1, tie ½, loss 0) on "
             f"the same instructions, with a 95% paired bootstrap CI, Wilcoxon's p and Holm's correction across "
             f"variants. `win rate` and `score` are over the `judged` instructions only (an instruction without a "
             f"verdict is no tie: it counts in `no verdict rate`).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in table:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _csv(path: Path, columns: list[str], table: list[dict]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in table:
            w.writerow([_fmt(r.get(c)) if isinstance(r.get(c), tuple) else r.get(c, "") for c in columns])
