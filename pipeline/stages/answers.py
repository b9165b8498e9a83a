"""Stage `answers`: one model's answers to the judge's instruction set (greedy decoding, the model's own chat
template when it has one), as `answers.jsonl` (id, prompt, answer), and `summary.json`: how many answers, how
many of them empty (`""`, e.g. a model that ends its turn at once) and which; the stage prints the counts.
Deterministic, so the run cache shares the answers of one model across recipes.

Contract: reads `[eval.judge]` (instructions, reference, answer_max_tokens, judge_max_items); consumes the recipe's
final model (the candidate) and the judge's reference model (`base` by default, or any model the recipe
evaluates); writes `artifacts/<recipe>/answers/<model>/` and provides it as `answers` for the judge stage."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.errors import TunebuildError

STAGE = Stage(name="answers", version=2, phase="eval", section="eval.judge", gpus="eval.gpus",
              doc="A model's answers to the LLM judge's instruction set.")


def tasks(plan):
    j = plan.section("eval")["judge"]
    if not j["enabled"]:
        return
    models = plan.models()
    for role in sorted({plan.final(), j["reference"]}):
        if role not in models:
            from pipeline.core.recipe.schema import RecipeError

            raise RecipeError(f"{plan.recipe.path}: eval.judge.reference: no model named {role!r} (the recipe's "
                              f"models: {', '.join(models)})")
        inputs, params = models[role].as_arg("model")
        inputs["instructions"] = plan.rel(j["instructions"])
        yield plan.task(STAGE, f"{plan.name}.{role}", plan.out(STAGE, role), inputs=inputs, params=params,
                        config={k: j[k] for k in ("answer_max_tokens", "judge_max_items")},
                        gpus=plan.section("eval")["gpus"],
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


def run(out_dir: Path, *, model: str, instructions: Path, config: dict) -> dict:
    import torch

    from pipeline.models.hf import load_causal_lm

    rows = read_instructions(instructions)[: config["judge_max_items"] or None]
    lm, tok = load_causal_lm(str(model))
    lm.eval()
    empty = []
    with open(out_dir / "answers.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            if tok.chat_template:
                text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
            else:
                text = row["prompt"] + "\n"
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(lm.device)
            with torch.no_grad():
                out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=config["answer_max_tokens"],
                                  pad_token_id=tok.pad_token_id or tok.eos_token_id)
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            if not answer:
                empty.append(row["id"])
            f.write(json.dumps({"id": row["id"], "prompt": row["prompt"], "answer": answer},
                               ensure_ascii=False) + "\n")
    summary = {"answers": len(rows), "empty": len(empty), "empty_ids": empty}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"answers: {len(rows)} answers, {len(empty)} empty" + (' ("")' if empty else "")
          + (": every answer is empty" if rows and len(empty) == len(rows) else ""), flush=True)
    return summary
