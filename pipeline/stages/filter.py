"""Stage `filter`: turn the generated task pool into the training dataset.

Rules, in order (self-instruct's bootstrap and prepare_for_finetuning rules):
1. instruction rules (machine tasks only): fewer than `min_words` or more than `max_words` words, a blocklisted
   keyword, "Write a program", starting with punctuation, starting with a non-English character (unless the
   recipe's language is zh);
2. instance rules (all tasks): empty output, output equal to input, the same input with conflicting outputs;
   duplicates removed, at most `max_instances_per_task`; a task left with no instance is dropped;
3. ROUGE-L novelty: a machine instruction whose ROUGE-L F-measure against any instruction already kept (seed
   instructions first) is above `rouge_threshold` is dropped.

Contract: reads `[filter]`; consumes the `pool` of a generate task; writes the canonical dataset
`artifacts/<recipe>/data/<name>/` (the same shape the import stage writes) and provides it as a `dataset`.
Writes `train.jsonl` and `heldout.jsonl` (canonical `messages` records, split per instance by a content hash so
the split is stable), `dropped.jsonl` (each dropped task with its reason, and for ROUGE drops the
kept instruction it matched and the score), `similarity.png` (histogram of each machine instruction's highest
ROUGE-L against the instructions before it: exact above the threshold, a sampled estimate below it) and `report.json`.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.data.dataset import finish
from pipeline.errors import TunebuildError

STAGE = Stage(name="filter", version=4, phase="data", section="filter", verbosity=1,
              doc="Rule and ROUGE-L filtering of a generated pool into a canonical dataset.")


def tasks(plan):
    for pool in plan.products("pool"):
        out = plan.out("data", pool.name)
        yield plan.task(STAGE, f"{plan.name}.{pool.name}", out, inputs={"pool": pool.out},
                        config=plan.section("filter"), provides=("dataset", pool.name, {"kind": "sft"}),
                        doc=f"rule + ROUGE-L filtering of {plan.name}'s {pool.name} into its training set")


CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]")


def count_words(text: str, language: str) -> int:
    """Words for English; for Chinese (`zh`), each CJK character counts as a word, plus the non-CJK words."""
    if language == "zh":
        return len(CJK.findall(text)) + len(CJK.sub(" ", text).split())
    return len(text.split())


def instruction_problem(inst: str, c: dict) -> str | None:
    words = count_words(inst, c["language"])
    unit = "words" if c["language"] == "en" else "words (CJK characters count one each)"
    if words < c["min_words"]:
        return f"fewer than {c['min_words']} {unit}"
    if words > c["max_words"]:
        return f"more than {c['max_words']} {unit}"
    low = inst.lower()
    for kw in c["blocklist"]:
        if re.search(r"\b" + re.escape(kw.lower()) + r"\b", low):
            return f"blocklisted keyword '{kw}'"
    if low.startswith("write a program"):
        return "starts with 'Write a program'"
    if inst[0] in string.punctuation:
        return "starts with punctuation"
    if c["language"] == "en" and not inst[0].isascii():
        return "starts with a non-English character"
    return None


def clean_instances(instances: list[dict], limit: int) -> tuple[list[dict], Counter]:
    dropped: Counter = Counter()
    outputs_by_input: dict[str, set[str]] = {}
    for ins in instances:
        outputs_by_input.setdefault(ins["input"].strip(), set()).add(ins["output"].strip())
    kept, seen = [], set()
    for ins in instances:
        inp, out = ins["input"].strip(), ins["output"].strip()
        if not out:
            dropped["empty output"] += 1
        elif inp == out:
            dropped["output equals input"] += 1
        elif len(outputs_by_input[inp]) > 1:
            dropped["conflicting outputs for the same input"] += 1
        elif (inp, out) in seen:
            dropped["duplicate instance"] += 1
        elif len(kept) >= limit:
            dropped["over max_instances_per_task"] += 1
        else:
            seen.add((inp, out))
            kept.append({"input": inp, "output": out})
    return kept, dropped


def to_example(task: dict, ins: dict) -> dict:
    user = task["instruction"].strip() + ("\n\n" + ins["input"] if ins["input"] else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ins["output"]}],
            "task_id": task["id"], "source": task["source"]}


def run(out_dir: Path, *, pool: Path, config: dict) -> dict:
    from pipeline.data.rouge import dedup
    from pipeline.evaluation.plots import similarity_histogram

    c = config
    instructions = Path(pool) / "instructions.jsonl"
    tasks = [json.loads(line) for line in Path(instructions).read_text(encoding="utf-8").splitlines() if line]
    dropped = []
    instance_drops: Counter = Counter()
    survivors = []
    for t in tasks:
        problem = instruction_problem(t["instruction"], c) if t["source"] == "machine" else None
        if problem:
            dropped.append({"id": t["id"], "instruction": t["instruction"], "reason": problem})
            continue
        instances, why = clean_instances(t["instances"], c["max_instances_per_task"])
        instance_drops.update(why)
        if not instances:
            dropped.append({"id": t["id"], "instruction": t["instruction"], "reason": "no valid instance"})
            continue
        survivors.append(dict(t, instances=instances))

    seeds = [t for t in survivors if t["source"] == "seed"]
    machine = [t for t in survivors if t["source"] == "machine"]
    tokenizer = "auto" if c["language"] == "zh" else "default"
    result = dedup([t["instruction"] for t in machine], [t["instruction"] for t in seeds], c["rouge_threshold"],
                   tokenizer)
    kept = list(seeds)
    for t, ok, (similar, score) in zip(machine, result.keep, result.match):
        if ok:
            kept.append(t)
        else:
            dropped.append({"id": t["id"], "instruction": t["instruction"],
                            "reason": f"ROUGE-L above {c['rouge_threshold']}", "most_similar": similar,
                            "score": round(score, 4)})

    with open(out_dir / "dropped.jsonl", "w", encoding="utf-8") as f:
        for d in dropped:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    reasons = Counter(re.sub(r"'.*'", "'…'", d["reason"]) if d["reason"].startswith("blocklisted") else d["reason"]
                      for d in dropped)
    similarity_histogram(out_dir / "similarity.png", result.histogram, threshold=c["rouge_threshold"],
                         title=f"{len(machine)} machine instructions after the instruction rules ({tokenizer} tokens)")
    report = {
        "source": "generate", "tasks_in": len(tasks), "seed_tasks_kept": len(seeds),
        "machine_tasks_in": sum(t["source"] == "machine" for t in tasks),
        "machine_tasks_kept": len(kept) - len(seeds), "dropped_by_reason": dict(sorted(reasons.items())),
        "instances_dropped_by_reason": dict(sorted(instance_drops.items())),
        "max_similarity_histogram": result.histogram,
    }
    records = [to_example(t, ins) for t in kept for ins in t["instances"]]
    try:
        return finish(out_dir, records, c["heldout_fraction"], report,
                      f"{len(records)} examples from {len(kept)} tasks")
    except TunebuildError:
        raise TunebuildError(f"filter kept no training example out of {len(tasks)} tasks "
                             f"(dropped: {dict(sorted(reasons.items()))})") from None
