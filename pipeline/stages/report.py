"""Stage `report`: the comparisons of one recipe (base → each trained model → extras), read from
`artifacts/scores.duckdb`.

Writes `comparison.md`: per suite and metric the before/after summary the anchor projects
tabulate by hand (average before, after, average / max / min improvement over subjects), per-subject and
per-category tables (micro and macro averages, labelled) with paired bootstrap CIs and p-values, and the plain
table of every metric. Plots: `subjects-<model_a>-vs-<model_b>-<suite>-<metric>.png`, the per-subject
improvement with its CI.
The first table names the engine that made each number (`hf`, or `vllm <version>`; the held-out loss is always
transformers'), and the judge's section the engine that wrote the judged answers.
Every table says better / worse only where the paired CI excludes 0 (by the metric's direction), else "CI
contains 0"; a metric without per-document scores has "no paired test". The LLM judge's rates are over the judged
instructions (n), no verdict is its own outcome (its own bar), a no-verdict rate above
`eval.judge.max_no_verdict_rate` and empty answers are called out. Training curves come in training order.
`summary.txt` holds what the build ends with (the task's `summary`): a headline line (the final model against
its start of training, a few deltas), then one line per suite and metric of that comparison with its paired CI and
verdict, the judge's outcome, the warnings, and the report's path. `TUNEBUILD_VERBOSE=1` prints the whole report.

Contract: reads `eval.judge.max_no_verdict_rate` and the recipe's training order; consumes the recipe's `scores`
and the judge's `answers`; writes `artifacts/report/<recipe>/`.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.core.store import file_lock

STAGE = Stage(name="report", version=5, phase="report", cache=False,
              doc="Print and write a recipe's comparisons (base → trained models → extra models).")


def tasks(plan):
    from pipeline.core.recipe.load import train_order

    answers = {p.name: p.out for p in plan.products("answers")}
    config = {"stages": train_order(plan.recipe.config),
              "max_no_verdict_rate": plan.section("eval")["judge"]["max_no_verdict_rate"]}
    out = Path("artifacts") / "report" / plan.name
    for p in plan.products("scores"):
        yield plan.task(STAGE, plan.name, out, inputs={"scores": p.out, "answers": answers},
                        params={"recipe": plan.name}, unkeyed={"db": plan.db}, config=config,
                        meta={"summary": str(out / "summary.txt")}, doc=f"comparison tables for {plan.name}")


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def table(db: Path, recipe: str) -> list[tuple]:
    import duckdb

    with file_lock(Path(db)):
        con = duckdb.connect(str(db), read_only=True)
        try:
            return con.execute(
                "SELECT model_a, model_b, suite, task, metric, filter, n, a, b, delta, higher_is_better, "
                "same_eval_config, engine_a, engine_b FROM comparison WHERE recipe = ? AND subject = '' "
                "ORDER BY position, suite, task, metric, filter", [recipe]).fetchall()
        finally:
            con.close()


def paired_tests(rows: list[dict]) -> dict[tuple, dict]:
    """The paired test behind each (model_a, model_b, suite, metric, filter, task) of the plain table: a subject's
    own row; `None` as the task: the suite's overall micro average (a group's)."""
    out = {}
    for r in rows:
        key = (r["model_a"], r["model_b"], r["suite"], r["metric"], r["filter"])
        if r["level"] == "subject":
            out[(*key, r["name"])] = r
        elif r["level"] == "overall" and r["average"] == "micro":
            out[(*key, None)] = r
    return out


def verdict(delta, higher_is_better, same: bool, test: dict | None) -> str:
    """better / worse only when the paired CI excludes 0, as the paired tables say; never by a delta's sign."""
    if not same:
        return "eval configs differ: not comparable"
    if delta is None or higher_is_better is None:
        return ""
    if test is None:
        return "no paired test"
    if not test["ci_excludes_zero"]:
        return "CI contains 0"
    return "better" if (test["delta"] > 0) == bool(higher_is_better) else "worse"


def render(recipe: str, rows: list[tuple], tests: dict[tuple, dict] | None = None) -> str:
    tests = tests or {}
    lines = []
    subjects = {k for k in tests if k[5] is not None}
    for pair in dict.fromkeys((r[0], r[1]) for r in rows):
        a_name, b_name = pair
        mine = [r for r in rows if (r[0], r[1]) == pair]
        groups: dict[tuple, set] = {}  # the tasks of a suite that are no subject of a paired test: groups
        for _, _, suite, task, metric, filt, *_ in mine:
            if (*pair, suite, metric, filt, task) not in subjects:
                groups.setdefault((suite, metric, filt), set()).add(task)
        lines += [f"## {recipe}: {a_name} vs {b_name}", "",
                  f"| suite | task | metric | engine | n | {a_name} | {b_name} | delta | 95% CI | |",
                  "|---|---|---|---|---:|---:|---:|---:|---|---|"]
        for _, _, suite, task, metric, filt, n, a, b, delta, hib, same, engine_a, engine_b in mine:
            key = (*pair, suite, metric, filt)
            test = tests.get((*key, task))
            pooled = tests.get((*key, None))
            if test is None and groups.get((suite, metric, filt)) == {task} and pooled \
                    and n in (None, pooled["n"]):
                test = pooled  # the suite's one group: the documents of its subjects pooled
            if n is None:
                n = test["n"] if test else "—"
            ci = f"[{test['ci_low']:+.4f}, {test['ci_high']:+.4f}]" if test else ""
            if test and delta is not None and abs(test["delta"] - delta) > 5e-5:  # e.g. a token-weighted loss
                ci += f" (of the per-document delta {test['delta']:+.4f})"
            engine = engine_a if engine_a == engine_b else f"{engine_a or 'hf'} / {engine_b or 'hf'}"
            lines.append(f"| {suite} | {task} | {metric} | {engine or 'hf'} | {n} | {_fmt(a)} | {_fmt(b)} | "
                         f"{_fmt(delta)} | {ci} | {verdict(delta, hib, same, test)} |")
        lines.append("")
    return "\n".join(lines) + "\n" if lines else f"## {recipe}: nothing to compare\n"


def paired(db: Path, recipe: str) -> list[dict]:
    import duckdb

    with file_lock(Path(db)):
        con = duckdb.connect(str(db), read_only=True)
        try:
            cur = con.execute("SELECT p.* FROM paired p LEFT JOIN pairs q ON q.recipe = p.recipe AND "
                              "q.model_a = p.model_a AND q.model_b = p.model_b WHERE p.recipe = ? ORDER BY "
                              "q.position, p.suite, p.metric, p.filter, p.level DESC, p.name, p.average", [recipe])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]
        except duckdb.CatalogException:
            return []
        finally:
            con.close()


def _sig(r: dict) -> str:
    return "CI excludes 0" if r["ci_excludes_zero"] else "CI contains 0"


def _p(x) -> str:
    return "" if x is None else (f"{x:.3g}" if x >= 0.001 else "<0.001")


def directions(db: Path, recipe: str) -> dict[tuple, bool]:
    """(suite, metric) -> higher is better, for the metrics whose direction is known."""
    import duckdb

    with file_lock(Path(db)):
        con = duckdb.connect(str(db), read_only=True)
        try:
            return {(s, m): bool(h) for s, m, h in con.execute(
                "SELECT DISTINCT suite, metric, higher_is_better FROM scores WHERE recipe = ? AND "
                "higher_is_better IS NOT NULL", [recipe]).fetchall()}
        finally:
            con.close()


def render_paired(rows: list[dict], out_dir: Path, higher: dict[tuple, bool] | None = None) -> str:
    """`higher`: (suite, metric) -> higher is better; an improvement of a lower-is-better metric (a loss) is a
    negative delta."""
    from pipeline.evaluation.plots import bar_chart

    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model_a"], r["model_b"], r["suite"], r["metric"], r["filter"]), []).append(r)
    for (model_a, model_b, suite, metric, filt), rs in groups.items():
        subj = [r for r in rs if r["level"] == "subject"]
        overall = {r["average"]: r for r in rs if r["level"] == "overall"}
        cats = [r for r in rs if r["level"] == "category"]
        title = f"{model_a} → {model_b} · {suite} · {metric}" + (f" ({filt})" if filt not in ("none", "") else "")
        lines += [f"### {title}", ""]
        if subj and overall:
            sign = -1 if (higher or {}).get((suite, metric)) is False else 1
            best = max(subj, key=lambda r: sign * r["delta"])
            worst = min(subj, key=lambda r: sign * r["delta"])
            mi, ma = overall["micro"], overall["macro"]
            lines += ["| | average before | average after | average improvement | 95% CI | max improvement | "
                      "min improvement | subjects improved |", "|---|---:|---:|---:|---|---:|---:|---:|",
                      f"| micro (documents) | {mi['a']:.4f} | {mi['b']:.4f} | {mi['delta']:+.4f} | "
                      f"[{mi['ci_low']:+.4f}, {mi['ci_high']:+.4f}] {_sig(mi)} | {best['delta']:+.4f} "
                      f"({best['name']}) | {worst['delta']:+.4f} ({worst['name']}) | "
                      f"{sum(sign * r['delta'] > 0 for r in subj)}/{len(subj)} |",
                      f"| macro (subjects) | {ma['a']:.4f} | {ma['b']:.4f} | {ma['delta']:+.4f} | "
                      f"[{ma['ci_low']:+.4f}, {ma['ci_high']:+.4f}] {_sig(ma)} | | | |", ""]
        lines += [f"| subject | n | {model_a} | {model_b} | delta | 95% CI | p | p (Holm) | |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in subj:
            lines.append(f"| {r['name']} | {r['n']} | {r['a']:.4f} | {r['b']:.4f} | {r['delta']:+.4f} | "
                         f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {_p(r['p_value'])} | {_p(r['p_holm'])} | "
                         f"{_sig(r)} |")
        if cats or overall:
            lines += ["", f"| category | average | subjects | n | {model_a} | {model_b} | delta | 95% CI | p | |",
                      "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
            for r in cats + [overall[k] for k in ("micro", "macro") if k in overall]:
                lines.append(f"| {r['name']} | {r['average']} | {r['subjects']} | {r['n']} | {r['a']:.4f} | "
                             f"{r['b']:.4f} | {r['delta']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
                             f"{_p(r['p_value'])} ({r['test']}) | {_sig(r)} |")
        if subj:
            pair = f"{model_a}-vs-{model_b}-"
            png = f"subjects-{pair}{suite}-{metric}.png".replace("/", "_")
            label = f"{model_b} − {model_a}"
            bar_chart(out_dir / png, [r["name"] for r in subj], {label: [r["delta"] for r in subj]},
                      errors={label: [(r["ci_low"], r["ci_high"]) for r in subj]},
                      title=f"{title}: improvement per subject (95% paired bootstrap CI)", ylabel="delta")
            lines += ["", f"![per-subject improvement]({png})"]
        lines.append("")
    return "\n".join(lines)


JUDGE_COLORS = {"win": "#31a354", "tie": "#bdbdbd", "loss": "#de2d26", "no verdict": "#6a51a3"}


def render_judge(recipe: str, db: Path, out_dir: Path, max_no_verdict_rate: float = 0.2) -> str:
    """The judge's rates (each over the instructions it is a rate of, n), a warning when the no-verdict (or
    ungraded) rate is above the limit, and for pairwise judging the shares of win / tie / loss / no verdict."""
    import duckdb

    from pipeline.evaluation.plots import bar_chart

    with file_lock(db):
        con = duckdb.connect(str(db), read_only=True)
        try:
            rows = con.execute("SELECT task, metric, value, n, model, subject, engine FROM scores WHERE recipe = ? "
                               "AND suite = 'judge' ORDER BY metric", [recipe]).fetchall()
        finally:
            con.close()
    if not rows:
        return ""
    mode, cand, ref = rows[0][0], rows[0][4], rows[0][5]
    values, ns = {r[1]: r[2] for r in rows}, {r[1]: r[3] for r in rows}
    rate_key = "no_verdict_rate" if mode == "pairwise" else "ungraded_rate"
    asked = ns.get(rate_key) or 0
    total = asked if mode == "pairwise" else asked // 2
    missing = round((values.get(rate_key) or 0.0) * asked)
    judged = ns.get("win_rate" if mode == "pairwise" else "grade")
    lines = ["", f"## LLM judge ({mode}, {total} instructions): {cand} vs {ref}", "",
             f"The answers were generated by the {rows[0][6] or 'hf'} engine.", ""]
    if mode == "pairwise":
        lines += [f"{judged} judged, {missing} without a verdict (either order gave none: its own outcome, not a "
                  f"tie); the rates are over the judged instructions, `no_verdict_rate` over all {total}.", ""]
    else:
        lines += [f"{missing} of {asked} answers without a grade; each mean grade is over the graded answers.", ""]
    if asked and missing / asked > max_no_verdict_rate:
        what = "verdict" if mode == "pairwise" else "grade"
        lines += [f"> **Warning**: the judge gave no {what} on {missing} of {asked} ({rate_key} "
                  f"{missing / asked:.3f}, above eval.judge.max_no_verdict_rate = {max_no_verdict_rate:g}): "
                  + (f"the rates rest on {judged} judged instruction(s)." if judged else "nothing was judged."), ""]
    lines += ["| metric | value | n |", "|---|---:|---:|"]
    lines += [f"| {m} | {'—' if v is None else f'{v:.4f}'} | {ns[m]} |" for m, v in values.items()]
    if mode == "pairwise" and total:
        share = (judged or 0) / total
        series = {"win": values.get("win_rate"), "tie": values.get("tie_rate"), "loss": values.get("loss_rate")}
        series = {k: [(v or 0.0) * share] for k, v in series.items()}
        series["no verdict"] = [missing / total]
        bar_chart(out_dir / "judge.png", [f"{cand} vs {ref}"], series,
                  title=f"LLM judge, both orders: shares of the {total} instructions (inconsistent verdicts are "
                        f"ties)", ylabel="share", stacked=True, colors=[JUDGE_COLORS[k] for k in series])
        lines += ["", "![win / tie / loss / no verdict](judge.png)"]
    return "\n".join(lines) + "\n"


def render_answers(answers: dict) -> str:
    """How many of each model's answers to the judge's instructions are empty."""
    import json

    if not answers:
        return ""
    counts = {}
    for role, folder in sorted(answers.items()):
        path = Path(folder) / "answers.jsonl"
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x] if path.is_file() else []
        counts[role] = (len(rows), sum(not r["answer"].strip() for r in rows))
    lines = ["", "Answers to the judge's instructions: " + "; ".join(
        f"{role} {n} ({empty} empty)" for role, (n, empty) in counts.items()) + ".", ""]
    for role, (n, empty) in counts.items():
        if empty:
            lines += [f"> **Warning**: {empty} of {role}'s {n} answers are empty (\"\"): the judge compared "
                      f"nothing with the other model's answer there.", ""]
    return "\n".join(lines)


def render_curves(recipe: str, db: Path, out_dir: Path, stages: list[str] | None = None) -> str:
    """Each training stage's curves from the `train_log` table, in training order (`stages`): loss, and for DPO
    the rewards of the chosen and rejected answers, their margin and accuracy (`train-<stage>.png`)."""
    import duckdb

    from pipeline.evaluation.plots import _pyplot, save

    with file_lock(db):
        con = duckdb.connect(str(db), read_only=True)
        try:
            rows = con.execute("SELECT stage, step, metric, value FROM train_log WHERE recipe = ? "
                               "ORDER BY stage, metric, step", [recipe]).fetchall()
        except duckdb.CatalogException:
            rows = []
        finally:
            con.close()
    if not rows:
        return ""
    plt = _pyplot()
    lines = ["", "## Training curves", ""]
    order = list(stages or [])
    for stage in sorted(dict.fromkeys(r[0] for r in rows),
                        key=lambda x: (order.index(x) if x in order else len(order), x)):
        series: dict[str, list] = {}
        for _, step, metric, value in (r for r in rows if r[0] == stage):
            series.setdefault(metric, []).append((step, value))
        panels = [["loss"], [m for m in ("rewards/chosen", "rewards/rejected", "rewards/margins") if m in series],
                  ["rewards/accuracies"] if "rewards/accuracies" in series else []]
        panels = [p for p in panels if p and all(m in series for m in p)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        for ax, metrics in zip(axes[0], panels):
            for m in metrics:
                xs, ys = zip(*series[m])
                ax.plot(xs, ys, marker=".", label=m)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.suptitle(f"{recipe}: training stage {stage}", fontsize=10)
        name = f"train-{stage}.png"
        save(fig, out_dir / name)
        last = {m: v[-1][1] for m, v in series.items()}
        summary = ", ".join(f"{m} {last[m]:.4f}" for m in ("loss", "rewards/margins", "rewards/accuracies")
                            if m in last)
        lines += [f"### {stage}: {summary} (last logged step)", "", f"![{stage} curves]({name})", ""]
    return "\n".join(lines)


def run(out_dir: Path, *, recipe: str, db: Path, scores: Path, answers: dict | None = None,
        config: dict | None = None) -> dict:
    config = config or {}
    pair = paired(Path(db), recipe)
    text = render(recipe, table(Path(db), recipe), paired_tests(pair))
    judge = render_judge(recipe, Path(db), out_dir, config.get("max_no_verdict_rate", 0.2))
    text += judge + render_answers(answers or {})
    text += render_curves(recipe, Path(db), out_dir, config.get("stages"))
    if pair:
        text += "\n## Paired comparisons (same documents)\n\n" + render_paired(pair, out_dir,
                                                                            directions(Path(db), recipe))
    (out_dir / "comparison.md").write_text(text, encoding="utf-8")
    lines = summary(recipe, pair, table(Path(db), recipe), config.get("stages") or [])
    lines += [line for line in text.splitlines() if line.startswith("> **Warning**")]
    lines.append(f"report: {out_dir.parent / recipe / 'comparison.md'}")
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from pipeline.core.console import verbose

    if verbose():
        print("\n" + text, flush=True)
    return {}


SUMMARY_LINES = 8


def _headline_pair(pairs: list[tuple[str, str]], stages: list[str]) -> tuple[str, str] | None:
    """The comparison a summary leads with: base → the final model where the recipe compares them, else the
    first pair it compares."""
    final = stages[-1] if stages else None
    if ("base", final) in pairs:
        return ("base", final)
    return pairs[0] if pairs else None


def summary(recipe: str, paired_rows: list[dict], plain: list[tuple], stages: list[str]) -> list[str]:
    """The build's closing lines for a recipe: first a one-line headline, then a line per suite and metric of the
    headline comparison (the paired overall, micro average, where there is one; else the plain row)."""
    pairs = list(dict.fromkeys([(r["model_a"], r["model_b"]) for r in paired_rows] + [(r[0], r[1]) for r in plain]))
    pair = _headline_pair(pairs, stages)
    if pair is None:
        return [f"{recipe}: nothing compared"]
    entries = []   # (suite, metric, a, b, delta, ci, verdict)
    seen = set()
    for r in paired_rows:
        if (r["model_a"], r["model_b"]) == pair and r["level"] == "overall" and r["average"] == "micro":
            name = (r["suite"], r["metric"] + ("" if r["filter"] in ("none", "") else f" ({r['filter']})"))
            if name not in seen:
                seen.add(name)
                hib = next((x[10] for x in plain if (x[0], x[1], x[2], x[4]) == (*pair, r["suite"], r["metric"])),
                           None)
                entries.append((*name, r["a"], r["b"], r["delta"], (r["ci_low"], r["ci_high"]),
                                verdict(r["delta"], hib, True, r)))
    for a_name, b_name, suite, task, metric, filt, n, a, b, delta, hib, same, *_ in plain:
        name = (suite, metric + ("" if filt in ("none", "") else f" ({filt})"))
        if (a_name, b_name) == pair and name not in seen and suite == task:  # a suite's own row: its headline
            seen.add(name)
            entries.append((*name, a, b, delta, None, verdict(delta, hib, same, None)))
    entries.sort(key=lambda e: (e[0] == "judge", e[0], e[1]))
    short = "; ".join(f"{s} {m} {d:+.4f} ({v})" for s, m, a, b, d, ci, v in entries[:3] if d is not None)
    lines = [f"{recipe}: {pair[0]} → {pair[1]}: " + (short or "no metric in common")]
    for s_, m, a, b, d, ci, v in entries[:SUMMARY_LINES]:
        ci_text = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
        lines.append(f"  {s_} {m}: {_fmt(a)} → {_fmt(b)}, {'' if d is None else f'{d:+.4f}'}{ci_text}"
                     + (f" {v}" if v else ""))
    if len(entries) > SUMMARY_LINES:
        lines.append(f"  ... {len(entries) - SUMMARY_LINES} more in the report")
    return lines
