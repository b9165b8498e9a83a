"""Stage `judge`: an LLM judge compares a candidate model's answers with a reference model's, or grades them.

Pairwise (default): for every instruction the judge sees the two answers in both orders (reference first, then
candidate first). Verdicts are parsed MT-Bench style (`[[A]]`, `[[B]]`, `[[C]]` for a tie). Two orders that
disagree count as a tie and as a position-biased pair. An instruction where either order has no verdict is its own
outcome, `no_verdict` (never a tie), and is left out of every rate but `no_verdict_rate`, as MT-Bench's
show_result drops "error" judgments. Reported, over the judged instructions only (with their number, `n`): win,
tie and loss rates of the candidate, the position-bias rate, the score (win 1, tie ½) and a length-controlled win
rate: a logistic model of the outcome on the (tanh-scaled) answer length difference, fitted on the instruction set
at hand, evaluated at equal lengths (no downloaded difficulty table, unlike alpaca_eval's, which only works on its
805 instructions); and `no_verdict_rate` over all instructions. Above `max_no_verdict_rate` the stage warns.

Single (`mode = "single"`): each answer of both models is graded 1–10 (`Rating: [[x]]`), and the mean grades
over the graded answers are reported (an answer without a grade counts in `ungraded_rate` only).

Every judge call goes through the LLM client and its ledger, keyed by (judge model, rendered prompt, sampling),
and the rendered prompt holds the two answers in their order: editing the judge prompt re-judges, nothing else.

A local judge (`backend = "local"`) runs on `eval.engine` (`[eval.vllm]` for vLLM); its model id, the ledger's key,
names the engine when it is vLLM. `results.json` names the engine that wrote the judged answers.

Contract: reads `[eval.judge]` (and, for a local judge, `eval.engine` and `[eval.vllm]`); consumes the `answers`
of the recipe's final model (the candidate) and of the reference model (`eval.judge.reference`, `base` by default:
any model the recipe evaluates) and, for the local backend, the judge model; gets its LLM client from
`pipeline.llm.client.make_client` with the ledger; writes `artifacts/<recipe>/judge/` and provides it as a `judgement`
for the scores stage.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.llm import engines
from pipeline.errors import TunebuildError
from pipeline.llm.prompts import read_template, render
from pipeline.core.stage import Stage

STAGE = Stage(name="judge", version=3, phase="compare", section="eval.judge", gpus="eval.gpus",
              doc="LLM-as-judge: the final model vs a reference model, both orders (or single-answer grading).")
ANSWER_KEYS = ("answer_max_tokens", "judge_max_items")  # the answers stage's part of [eval.judge]


def tasks(plan):
    j = plan.section("eval")["judge"]
    cand, ref = plan.product("answers", plan.final()), plan.product("answers", j["reference"])
    if not j["enabled"] or not cand or not ref or cand is ref:
        return
    inputs, params = {"candidate": cand.out, "reference": ref.out, "prompt": plan.rel(j["prompt"])}, {}
    config = {k: v for k, v in j.items() if k not in ANSWER_KEYS}
    unkeyed, engine, gpus = {"ledger": plan.ledger, "recipe": plan.name}, None, 0
    if j["backend"] == "local":  # a local judge runs on eval.engine
        i, p = plan.model(j["model"]).as_arg("generator")
        inputs.update(i)
        params.update(p)
        ev = plan.section("eval")
        keyed, run_settings = engines.task_settings(ev["engine"], ev["vllm"])
        config.update(keyed)
        unkeyed.update({"engine_run": run_settings} if run_settings else {})
        engine, gpus = ev["engine"], engines.task_gpus(ev["gpus"], run_settings)
    yield plan.task(STAGE, plan.name, plan.out(STAGE), inputs=inputs,
                    params={**params, "candidate_name": cand.name, "reference_name": ref.name},
                    config=config, unkeyed=unkeyed, engine=engine, gpus=gpus,
                    provides=("judgement", f"{cand.name}-vs-{ref.name}",
                              {"model": cand.info["model"], "role": cand.name, "reference": ref.name,
                               "prompt": plan.rel(j["prompt"])}),
                    doc=f"{j['mode']} LLM judging of {cand.name} vs {ref.name} answers for {plan.name}")

VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
SAMPLING = {"max_tokens": 512, "temperature": 0.0, "top_p": 1.0, "stop": []}


def read_answers(folder: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (Path(folder) / "answers.jsonl").read_text(encoding="utf-8").splitlines() if x]
    return {r["id"]: r for r in rows}


def answers_engine(*folders: Path) -> str:
    """The engine that wrote the judged answers (their `summary.json`; `hf` before answers named it), one name
    or `<candidate's> / <reference's>`."""
    found = []
    for folder in folders:
        try:
            found.append(json.loads((Path(folder) / "summary.json").read_text(encoding="utf-8")).get("engine", "hf"))
        except (OSError, ValueError):
            found.append("hf")
    return " / ".join(dict.fromkeys(found))


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'C' (tie), or None when the judge gave no verdict. The last verdict in the text counts."""
    found = VERDICT.findall(text)
    return found[-1] if found else None


def outcome(first: str | None, second: str | None) -> tuple[float | None, bool]:
    """The candidate's outcome from both orders: (1 win / 0.5 tie / 0 loss, position-biased?), or (None, False)
    when either order has no verdict: no verdict is its own outcome, never a tie.

    Order 1 shows the reference as A and the candidate as B; order 2 the candidate as A."""
    one = {"A": 0.0, "B": 1.0, "C": 0.5}.get(first or "")
    two = {"A": 1.0, "B": 0.0, "C": 0.5}.get(second or "")
    if one is None or two is None:
        return None, False
    if one == two:
        return one, False
    return 0.5, True


def length_controlled(y, len_candidate, len_reference) -> float:
    """Win rate at equal answer lengths: logistic regression of the outcome (1/0.5/0, as fractional
    responses) on tanh(length difference / its standard deviation), fitted by Newton's method; the intercept's
    probability."""
    import numpy as np

    d = (len_candidate - len_reference).astype(float)
    scale = d.std() or 1.0
    x = np.column_stack([np.ones_like(d), np.tanh(d / scale)])
    beta = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(x @ beta)))
        w = p * (1 - p) + 1e-9
        step = np.linalg.solve(x.T @ (x * w[:, None]) + 1e-6 * np.eye(2), x.T @ (y - p))
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(1 / (1 + np.exp(-beta[0])))


def run(out_dir: Path, *, candidate: Path, reference: Path, prompt: Path, config: dict, ledger: str,
        recipe: str = "", generator: str | None = None, candidate_name: str = "tuned",
        reference_name: str = "base", engine_run: dict | None = None) -> dict:
    from pipeline.llm.client import make_client

    client = make_client(config, generator=generator, ledger=ledger, recipe=recipe, engine_run=engine_run)
    try:
        return judge(out_dir, candidate=candidate, reference=reference, prompt=prompt, config=config,
                     client=client, candidate_name=candidate_name, reference_name=reference_name)
    finally:
        client.close()


def judge(out_dir: Path, *, candidate: Path, reference: Path, prompt: Path, config: dict, client,
          candidate_name: str = "tuned", reference_name: str = "base") -> dict:
    import numpy as np

    cand, ref = read_answers(candidate), read_answers(reference)
    ids = [i for i in cand if i in ref]
    if not ids:
        raise TunebuildError(f"no instruction answered by both {candidate_name} and {reference_name}")
    empty = {name: sum(not a[i]["answer"].strip() for i in ids) for name, a in ((candidate_name, cand),
                                                                               (reference_name, ref))}
    for name, k in empty.items():
        if k:
            print(f"judge: {k} of {name}'s {len(ids)} answers are empty (\"\")", flush=True)
    if config["mode"] == "single":
        template = read_template(prompt, ("instruction", "answer"), "judge prompt")
        prompts = [render(template, instruction=cand[i]["prompt"], answer=a[i]["answer"])
                   for a in (ref, cand) for i in ids]
        texts = client.complete_many(prompts, SAMPLING)
        grades = [float(m[-1]) if (m := RATING.findall(t)) else None for t in texts]
        ref_g, cand_g = grades[: len(ids)], grades[len(ids):]
        with open(out_dir / "verdicts.jsonl", "w", encoding="utf-8") as f:
            for i, g_ref, g_cand, t_ref, t_cand in zip(ids, ref_g, cand_g, texts[: len(ids)], texts[len(ids):]):
                f.write(json.dumps({"id": i, "reference_grade": g_ref, "candidate_grade": g_cand,
                                    "reference_judgment": t_ref, "candidate_judgment": t_cand},
                                   ensure_ascii=False) + "\n")

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return float(np.mean(xs)) if xs else None
        metrics = {"grade": mean(cand_g), "reference_grade": mean(ref_g),
                   "ungraded_rate": float(np.mean([g is None for g in ref_g + cand_g]))}
        counts = {"grade": sum(g is not None for g in cand_g), "reference_grade": sum(g is not None for g in ref_g),
                  "ungraded_rate": 2 * len(ids)}
        missing, asked, rate_key = sum(g is None for g in ref_g + cand_g), 2 * len(ids), "ungraded_rate"
        judged = min(counts["grade"], counts["reference_grade"])
    else:
        template = read_template(prompt, ("instruction", "answer_a", "answer_b"), "judge prompt")
        first = [render(template, instruction=cand[i]["prompt"], answer_a=ref[i]["answer"],
                        answer_b=cand[i]["answer"]) for i in ids]
        second = [render(template, instruction=cand[i]["prompt"], answer_a=cand[i]["answer"],
                         answer_b=ref[i]["answer"]) for i in ids]
        texts = client.complete_many(first + second, SAMPLING)
        v1 = [parse_verdict(t) for t in texts[: len(ids)]]
        v2 = [parse_verdict(t) for t in texts[len(ids):]]
        results = [outcome(a, b) for a, b in zip(v1, v2)]
        keep = [k for k, r in enumerate(results) if r[0] is not None]  # the judged instructions
        y = np.array([results[k][0] for k in keep])
        lens_c = np.array([len(cand[ids[k]]["answer"].split()) for k in keep])
        lens_r = np.array([len(ref[ids[k]]["answer"].split()) for k in keep])
        with open(out_dir / "verdicts.jsonl", "w", encoding="utf-8") as f:
            for i, a, b, (o, biased) in zip(ids, v1, v2, results):
                f.write(json.dumps({"id": i, "reference_first": a, "candidate_first": b, "outcome": o,
                                    "result": RESULT[o], "position_biased": biased}, ensure_ascii=False) + "\n")

        def rate(xs):
            return float(np.mean(xs)) if len(keep) else None
        judged = len(keep)
        metrics = {"win_rate": rate(y == 1.0), "tie_rate": rate(y == 0.5), "loss_rate": rate(y == 0.0),
                   "position_bias_rate": rate([results[k][1] for k in keep]),
                   "no_verdict_rate": float(np.mean([r[0] is None for r in results])),
                   "score": rate(y), "lc_win_rate": length_controlled(y, lens_c, lens_r) if judged else None}
        counts = {k: judged for k in metrics}
        counts["no_verdict_rate"] = len(ids)
        missing, asked, rate_key = len(ids) - judged, len(ids), "no_verdict_rate"
    limit = config.get("max_no_verdict_rate", 0.2)
    warning = no_verdict_warning(missing, asked, limit, rate_key, judged)
    result = {"mode": config["mode"], "candidate": candidate_name, "reference": reference_name, "n": len(ids),
              "answers_engine": answers_engine(candidate, reference),
              "judged": judged, "metric_n": counts, "empty_answers": empty, "max_no_verdict_rate": limit,
              "warning": warning,
              "judge": client.model_id, "metrics": metrics, "usage": client.usage.as_dict()}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    rates = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None and k != rate_key)
    print(f"judge: {candidate_name} vs {reference_name}: {judged} of {len(ids)} instructions judged, {rate_key} "
          f"{metrics[rate_key]:.3f}" + (f"; over the {judged} judged: {rates}" if rates else ""), flush=True)
    if warning:
        print(f"judge: warning: {warning}", flush=True)
    return result


RESULT = {1.0: "win", 0.5: "tie", 0.0: "loss", None: "no_verdict"}


def no_verdict_warning(missing: int, asked: int, limit: float, rate_key: str = "no_verdict_rate",
                       judged: int | None = None) -> str | None:
    """The warning when more than `limit` of the judge's answers hold no verdict (or no grade), else None."""
    if not asked or missing / asked <= limit:
        return None
    what = "verdict" if rate_key == "no_verdict_rate" else "grade"
    rest = f" the rates rest on the {judged} judged instruction(s)" if judged else " nothing was judged"
    return (f"the judge gave no {what} on {missing} of {asked} ({rate_key} {missing / asked:.3f}, above "
            f"eval.judge.max_no_verdict_rate = {limit:g}):{rest}; check the judge prompt and model (it must answer "
            + ("[[A]], [[B]] or [[C]])" if what == "verdict" else "Rating: [[x]])"))
