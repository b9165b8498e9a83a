"""Stage `report`: the comparisons of one recipe (base → each trained model → extras), read from
`artifacts/scores.duckdb`.

Writes `comparison.md` (and prints it): per suite and metric the before/after summary the anchor projects
tabulate by hand (average before, after, average / max / min improvement over subjects), per-subject and
per-category tables (micro and macro averages, labelled) with paired bootstrap CIs and p-values, and the plain
table of every metric. Plots: `subjects-<suite>-<metric>.png`, the per-subject improvement with its CI.
A delta whose CI contains 0 is shown as not significant; a delta is better/worse by the metric's direction.

Contract: reads nothing of the recipe; consumes the recipe's `scores`; writes `artifacts/report/<recipe>/`.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.stage import Stage
from pipeline.store import file_lock

STAGE = Stage(name="report", version=2, phase="report", cache=False,
              doc="Print and write a recipe's comparisons (base → trained models → extra models).")


def tasks(plan):
    for p in plan.products("scores"):
        yield plan.task(STAGE, plan.name, Path("artifacts") / "report" / plan.name, inputs={"scores": p.out},
                        params={"recipe": plan.name}, unkeyed={"db": plan.db},
                        doc=f"comparison tables for {plan.name}")


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def table(db: Path, recipe: str) -> list[tuple]:
    import duckdb

    with file_lock(Path(db)):
        con = duckdb.connect(str(db), read_only=True)
        try:
            return con.execute(
                "SELECT model_a, model_b, suite, task, metric, n, a, b, delta, higher_is_better, same_eval_config "
                "FROM comparison WHERE recipe = ? AND subject = '' ORDER BY position, suite, task, metric",
                [recipe]).fetchall()
        finally:
            con.close()


def render(recipe: str, rows: list[tuple]) -> str:
    lines = []
    for pair in dict.fromkeys((r[0], r[1]) for r in rows):
        a_name, b_name = pair
        lines += [f"## {recipe}: {a_name} vs {b_name}", "",
                  f"| suite | task | metric | n | {a_name} | {b_name} | delta | |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for _, _, suite, task, metric, n, a, b, delta, hib, same in (r for r in rows if (r[0], r[1]) == pair):
            if not same:
                verdict = "eval configs differ: not comparable"
            elif delta is None or hib is None or delta == 0:
                verdict = ""
            else:
                verdict = "better" if (delta > 0) == bool(hib) else "worse"
            lines.append(f"| {suite} | {task} | {metric} | {n} | {_fmt(a)} | {_fmt(b)} | {_fmt(delta)} | {verdict} |")
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


def render_paired(rows: list[dict], out_dir: Path) -> str:
    from pipeline.plots import bar_chart

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
            best = max(subj, key=lambda r: r["delta"])
            worst = min(subj, key=lambda r: r["delta"])
            mi, ma = overall["micro"], overall["macro"]
            lines += ["| | average before | average after | average improvement | 95% CI | max improvement | "
                      "min improvement | subjects improved |", "|---|---:|---:|---:|---|---:|---:|---:|",
                      f"| micro (documents) | {mi['a']:.4f} | {mi['b']:.4f} | {mi['delta']:+.4f} | "
                      f"[{mi['ci_low']:+.4f}, {mi['ci_high']:+.4f}] {_sig(mi)} | {best['delta']:+.4f} "
                      f"({best['name']}) | {worst['delta']:+.4f} ({worst['name']}) | "
                      f"{sum(r['delta'] > 0 for r in subj)}/{len(subj)} |",
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


def render_judge(recipe: str, db: Path, out_dir: Path) -> str:
    import duckdb

    from pipeline.plots import bar_chart

    with file_lock(db):
        con = duckdb.connect(str(db), read_only=True)
        try:
            rows = con.execute("SELECT task, metric, value, n, model, subject FROM scores WHERE recipe = ? AND "
                               "suite = 'judge' ORDER BY metric", [recipe]).fetchall()
        finally:
            con.close()
    if not rows:
        return ""
    mode, n, cand, ref = rows[0][0], rows[0][3], rows[0][4], rows[0][5]
    values = {r[1]: r[2] for r in rows}
    lines = ["", f"## LLM judge ({mode}, {n} instructions): {cand} vs {ref}", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {m} | {v:.4f} |" for m, v in values.items() if v is not None]
    if mode == "pairwise":
        bar_chart(out_dir / "judge.png", [f"{cand} vs {ref}"],
                  {"win": [values["win_rate"]], "tie": [values["tie_rate"]], "loss": [values["loss_rate"]]},
                  title="LLM judge, both orders (inconsistent verdicts are ties)", ylabel="share",
                  stacked=True, colors=["#31a354", "#bdbdbd", "#de2d26"])
        lines += ["", "![win / tie / loss](judge.png)"]
    return "\n".join(lines) + "\n"


def render_curves(recipe: str, db: Path, out_dir: Path) -> str:
    """Each training stage's curves from the `train_log` table: loss, and for DPO the rewards of the chosen and
    rejected answers, their margin and accuracy (`train-<stage>.png`)."""
    import duckdb

    from pipeline.plots import _pyplot, save

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
    for stage in dict.fromkeys(r[0] for r in rows):
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


def run(out_dir: Path, *, recipe: str, db: Path, scores: Path, config: dict | None = None) -> dict:
    text = render(recipe, table(Path(db), recipe))
    text += render_judge(recipe, Path(db), out_dir)
    text += render_curves(recipe, Path(db), out_dir)
    pair = paired(Path(db), recipe)
    if pair:
        text += "\n## Paired comparisons (same documents)\n\n" + render_paired(pair, out_dir)
    (out_dir / "comparison.md").write_text(text, encoding="utf-8")
    print("\n" + text, flush=True)
    return {}
