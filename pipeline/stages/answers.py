"""Stage `answers`: one model's answers to the judge's instruction set (greedy decoding, the model's own chat
template when it has one), as `answers.jsonl` (id, prompt, answer), and `summary.json`: how many answers, how
many of them empty (`""`, e.g. a model that ends its turn at once) and which, and the engine that wrote them
(`hf`, or `vllm <version>`); the stage prints the counts. Every prompt goes to the engine at once
(`pipeline.llm.engines`: the batched HF engine, whose greedy answers equal one-at-a-time `generate`, or vLLM).
Deterministic, so the run cache shares the answers of one model across recipes; the engine and its version are
part of the key.

Contract: reads `[eval.judge]` (instructions, reference, answer_max_tokens, judge_max_items) and `eval.engine`
with `[eval.vllm]`; consumes the recipe's final model (the candidate) and the judge's reference model (`base` by
default, or any model the recipe evaluates); writes `artifacts/<recipe>/answers/<model>/` and provides it as
`answers` for the judge stage."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.llm import engines
from pipeline.errors import TunebuildError
from pipeline.core.stage import Stage

STAGE = Stage(name="answers", version=3, phase="eval", section="eval.judge", gpus="eval.gpus",
              doc="A model's answers to the LLM judge's instruction set.")


def tasks(plan):
    ev = plan.section("eval")
    j = ev["judge"]
    if not j["enabled"]:
        return
    models = plan.models()
    keyed, run_settings = engines.task_settings(ev["engine"], ev["vllm"])
    for role in sorted({plan.final(), j["reference"]}):
        if role not in models:
            from pipeline.core.recipe.schema import RecipeError

            raise RecipeError(f"{plan.recipe.path}: eval.judge.reference: no model named {role!r} (the recipe's "
                              f"models: {', '.join(models)})")
        inputs, params = models[role].as_arg("model")
        inputs["instructions"] = plan.rel(j["instructions"])
        yield plan.task(STAGE, f"{plan.name}.{role}", plan.out(STAGE, role), inputs=inputs, params=params,
                        config={**{k: j[k] for k in ("answer_max_tokens", "judge_max_items")}, **keyed},
                        unkeyed={"engine_run": run_settings} if run_settings else None, engine=ev["engine"],
                        gpus=engines.task_gpus(ev["gpus"], run_settings),
                        provides=("answers", role, {"model": models[role]}),
                        doc=f"the {role} model's answers to the judge's instructions for {plan.name}")


def read_instructions(path: Path) -> list[dict]:
    from pipeline.data.read import read_rows

    out = []
    for n, row in read_rows(Path(path)):
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise TunebuildError(f"{path}:{n}: key 'instruction' missing or empty")
        prompt = row["instruction"].strip() + ("\n\n" + row["input"] if row.get("input") else "")
        out.append({"id": str(row.get("id", n)), "prompt": prompt})
    if not out:
        raise TunebuildError(f"{path}: no instructions")
    return out


def run(out_dir: Path, *, model: str, instructions: Path, config: dict, engine_run: dict | None = None) -> dict:
    engine_name = config.get("engine", engines.DEFAULT)
    rows = read_instructions(instructions)[: config["judge_max_items"] or None]
    engine = engines.open_engine(engine_name, str(model), max_model_len=config.get("max_model_len"), run=engine_run)
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                     add_generation_prompt=True) if tok.chat_template else row["prompt"] + "\n"
             for row in rows]
    try:
        done = engine.generate(texts, max_new_tokens=config["answer_max_tokens"])
    finally:
        if hasattr(engine, "close"):
            engine.close()
    empty = []
    with open(out_dir / "answers.jsonl", "w", encoding="utf-8") as f:
        for row, completion in zip(rows, done):
            answer = completion.text.strip()
            if not answer:
                empty.append(row["id"])
            f.write(json.dumps({"id": row["id"], "prompt": row["prompt"], "answer": answer},
                               ensure_ascii=False) + "\n")
    summary = {"answers": len(rows), "empty": len(empty), "empty_ids": empty,
               "engine": engines.identity(engine_name)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"answers: {len(rows)} answers ({summary['engine']}), {len(empty)} empty" + (' ("")' if empty else "")
          + (": every answer is empty" if rows and len(empty) == len(rows) else ""), flush=True)
    return summary
