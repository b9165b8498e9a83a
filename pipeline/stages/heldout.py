"""Stage `heldout`: what fine-tuning taught, measured on held-out dataset instances.

For each held-out prompt/completion record, the mean negative log-likelihood of the reference response given the
prompt, both rendered with the chat template the tuned model was trained with (the same template for the base
and the tuned model, so the two numbers compare). Metrics: `loss` (token-weighted mean NLL) and `perplexity`
(exp of it), with a standard error over items and per-item samples. The last assistant turn of each held-out
conversation is the scored response.

Contract: reads `eval.heldout` / `eval.heldout_max_items` and `model.chat_template`; consumes every model of the
recipe and the held-out split of the datasets the trained models learned from; writes
`artifacts/<recipe>/eval/<model>-heldout/` (task `evaluate:<recipe>.<model>.heldout`) and provides it as an
`evaluation`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.errors import TunebuildError
from pipeline.stage import Stage

STAGE = Stage(name="heldout", basename="evaluate", version=2, phase="eval", section="eval", gpus="eval.gpus",
              doc="Evaluate one model on one suite (lm-eval tasks, or the held-out loss).")


def tasks(plan):
    ev = plan.section("eval")
    datasets = sorted({d for p in plan.products("model") for d in p.info.get("datasets", ())})
    if not ev["heldout"] or not datasets:
        return
    template = plan.rel(plan.recipe.config["model"]["chat_template"])
    for role, src in plan.models().items():
        inputs, params = src.as_arg("model")
        inputs.update(data={Path(d).name: d for d in datasets}, chat_template=template)
        yield plan.task(STAGE, f"{plan.name}.{role}.heldout", plan.out("eval", f"{role}-heldout"), inputs=inputs,
                        params=params, config={"heldout_max_items": ev["heldout_max_items"]}, gpus=ev["gpus"],
                        provides=("evaluation", f"{role}.heldout",
                                  {"role": role, "suite": "heldout", "model": src, "categories": None}),
                        doc=f"held-out loss of the {role} model of {plan.name}")


def run(out_dir: Path, *, model: str, data: dict, chat_template: Path, config: dict) -> dict:
    import torch

    from pipeline.dataset import read_records
    from pipeline.hf import load_causal_lm, package_versions

    records = []
    for _, folder in sorted(data.items()):
        for rec in read_records(Path(folder) / "heldout.jsonl"):
            if "messages" in rec:
                records.append({"prompt": rec["messages"][:-1], "completion": rec["messages"][-1:],
                                "task_id": rec.get("task_id")})
    heldout = ", ".join(f"{Path(f).name}/heldout.jsonl" for f in data.values())
    records = records[: config["heldout_max_items"]]
    if not records:
        raise TunebuildError(f"{heldout}: no held-out example (raise the dataset's heldout_fraction, or set "
                             f"eval.heldout = false)")
    lm, tok = load_causal_lm(model, dtype="float32")
    tok.chat_template = Path(chat_template).read_text(encoding="utf-8")
    lm.eval()
    limit = getattr(lm.config, "max_position_embeddings", 4096)
    samples, total_nll, total_tokens, too_long = [], 0.0, 0, 0
    for i, r in enumerate(records):
        try:
            prompt_ids = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
            full_ids = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)
        except Exception as e:  # jinja2's UndefinedError, raise_exception() in the template, ...
            raise TunebuildError(f"{chat_template}: the chat template fails on held-out conversation {i + 1}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        start = len(prompt_ids)
        if full_ids[:start] != prompt_ids or start >= len(full_ids):
            raise TunebuildError(f"{chat_template}: rendering a conversation does not extend its prompt "
                                 "(the template must render the prompt as a prefix)")
        if start >= limit:  # no response token fits in the model's context
            too_long += 1
            continue
        full_ids = full_ids[:limit]
        ids = torch.tensor([full_ids], device=lm.device)
        with torch.no_grad():
            logits = lm(ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[start - 1:]
        item_nll, n_tok = float(nll.sum()), int(nll.numel())
        total_nll += item_nll
        total_tokens += n_tok
        samples.append({"doc_id": i, "task_id": r.get("task_id"), "tokens": n_tok,
                        "loss": round(item_nll / n_tok, 6)})
    if not samples:
        raise TunebuildError(f"every held-out prompt is longer than the model's context ({limit} tokens)")
    if too_long:
        print(f"heldout: {too_long} of {len(records)} held-out prompts are longer than the model's context "
              f"({limit} tokens) and were skipped", flush=True)
    loss = total_nll / total_tokens
    per_item = [s["loss"] for s in samples]
    mean = sum(per_item) / len(per_item)
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_item) / max(len(per_item) - 1, 1))
    stderr = sd / math.sqrt(len(per_item))
    metrics = [
        {"task": "heldout", "subject": "", "metric": "loss", "filter": "", "value": round(loss, 6),
         "stderr": round(stderr, 6), "n": len(samples)},
        {"task": "heldout", "subject": "", "metric": "perplexity", "filter": "", "value": round(math.exp(loss), 6),
         "stderr": None, "n": len(samples)},
    ]
    result = {"skipped_too_long": too_long, "eval_config": {"heldout_max_items": config["heldout_max_items"],
                              "chat_template": tok.chat_template}, "metrics": metrics, "packages": package_versions(),
              "higher_is_better": {"heldout": {"loss": False, "perplexity": False}}}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (out_dir / "samples").mkdir()
    with open(out_dir / "samples" / "heldout.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    return {"loss": loss}
