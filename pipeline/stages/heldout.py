"""Stage `heldout`: what fine-tuning taught, measured on held-out dataset instances.

For each held-out prompt/completion record, the mean negative log-likelihood of the reference response given the
prompt, both rendered with the chat template the tuned model was trained with (the same template for the base
and the tuned model, so the two numbers compare). Metrics: `loss` (token-weighted mean NLL) and `perplexity`
(exp of it), with a standard error over items and per-item samples. The last assistant turn of each held-out
conversation is the scored response.

Held-out preference pairs (the pairs DPO did not train on): each answer's log-probability given the prompt, summed
over its tokens as DPO scores an answer (the prompt and answers tokenized as TRL's DPOTrainer does). Metrics, task
`heldout_preference`: `preference_accuracy` (the share of pairs whose chosen answer has the higher log-prob) and
`margin` (the mean of chosen minus rejected log-prob, nats). Every metric has per-item samples (`doc_hash`: the
record's content), so the scores stage compares models on them with paired statistics like any other metric.

Contract: reads `eval.heldout` / `eval.heldout_max_items` and `model.chat_template`; consumes every model of the
recipe and the held-out split of the datasets the trained models learned from; writes
`artifacts/<recipe>/eval/<model>-heldout/` (task `evaluate:<recipe>.<model>.heldout`) and provides it as an
`evaluation`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.errors import TunebuildError
from pipeline.finetuning.chat_templates import common_prefix

STAGE = Stage(name="heldout", basename="evaluate", version=3, phase="eval", section="eval", gpus="eval.gpus",
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


def _doc_hash(record: dict) -> str:
    """What pairs one model's item with another's: the record's content."""
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _nll(lm, ids: list[int], start: int):
    """Per-token negative log-likelihood of `ids[start:]` given what precedes it."""
    import torch

    x = torch.tensor([ids], device=lm.device)
    with torch.no_grad():
        logits = lm(x).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")[start - 1:]


def score_pairs(lm, tok, pairs: list[dict], limit: int, chat_template: Path) -> tuple[list[dict], int]:
    """Per pair: the summed log-prob of the chosen and of the rejected answer given the prompt (each rendered with
    the chat template, the answer starting where prompt and prompt + answer stop agreeing, as TRL tokenizes), the
    margin and whether the chosen one is preferred. Returns (samples, pairs skipped: the prompt fills the context)."""
    samples, skipped = [], 0
    for i, p in enumerate(pairs):
        try:
            prompt = tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
            full = {k: tok.apply_chat_template(p["prompt"] + p[k], tokenize=True, return_dict=False)
                    for k in ("chosen", "rejected")}
        except Exception as e:  # jinja2's UndefinedError, raise_exception() in the template, ...
            raise TunebuildError(f"{chat_template}: the chat template fails on held-out preference pair {i + 1}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        start = min(common_prefix(prompt, full["chosen"]), common_prefix(prompt, full["rejected"]))
        if start >= limit or start < 1 or any(len(f) <= start for f in full.values()):
            skipped += 1
            continue
        logp, tokens = {}, {}
        for k, ids in full.items():
            nll = _nll(lm, ids[:limit], start)
            logp[k], tokens[k] = -float(nll.sum()), int(nll.numel())
        margin = logp["chosen"] - logp["rejected"]
        samples.append({"doc_id": i, "doc_hash": _doc_hash(p), "filter": "",
                        "metrics": ["preference_accuracy", "margin"], "preference_accuracy": float(margin > 0),
                        "margin": round(margin, 6), "chosen_logp": round(logp["chosen"], 6),
                        "rejected_logp": round(logp["rejected"], 6), "chosen_tokens": tokens["chosen"],
                        "rejected_tokens": tokens["rejected"]})
    return samples, skipped


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1))
    return mean, sd / math.sqrt(len(xs))


def run(out_dir: Path, *, model: str, data: dict, chat_template: Path, config: dict) -> dict:
    from pipeline.data.dataset import read_records
    from pipeline.models.hf import load_causal_lm, model_identity, package_versions

    records, pairs = [], []
    for _, folder in sorted(data.items()):
        for rec in read_records(Path(folder) / "heldout.jsonl"):
            if "messages" in rec:
                records.append({"prompt": rec["messages"][:-1], "completion": rec["messages"][-1:],
                                "task_id": rec.get("task_id")})
            elif "chosen" in rec and "rejected" in rec:
                pairs.append({k: rec[k] for k in ("prompt", "chosen", "rejected")})
    heldout = ", ".join(f"{Path(f).name}/heldout.jsonl" for f in data.values())
    records, pairs = records[: config["heldout_max_items"]], pairs[: config["heldout_max_items"]]
    if not records and not pairs:
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
        nll = _nll(lm, full_ids[:limit], start)
        item_nll, n_tok = float(nll.sum()), int(nll.numel())
        total_nll += item_nll
        total_tokens += n_tok
        samples.append({"doc_id": i, "doc_hash": _doc_hash(r), "filter": "", "metrics": ["loss", "perplexity"],
                        "task_id": r.get("task_id"), "tokens": n_tok, "loss": round(item_nll / n_tok, 6),
                        "perplexity": round(math.exp(item_nll / n_tok), 6)})
    pair_samples, pairs_too_long = score_pairs(lm, tok, pairs, limit, chat_template)
    if not samples and not pair_samples:
        raise TunebuildError(f"every held-out prompt is longer than the model's context ({limit} tokens)")
    for what, skipped, total in (("prompts", too_long, len(records)), ("preference prompts", pairs_too_long,
                                                                       len(pairs))):
        if skipped:
            print(f"heldout: {skipped} of {total} held-out {what} are longer than the model's context "
                  f"({limit} tokens) and were skipped", flush=True)
    metrics, better, results = [], {}, {}
    if samples:
        loss = total_nll / total_tokens
        stderr = _mean_stderr([s["loss"] for s in samples])[1]
        metrics += [
            {"task": "heldout", "subject": "", "metric": "loss", "filter": "", "value": round(loss, 6),
             "stderr": round(stderr, 6), "n": len(samples)},
            {"task": "heldout", "subject": "", "metric": "perplexity", "filter": "",
             "value": round(math.exp(loss), 6), "stderr": None, "n": len(samples)},
        ]
        better["heldout"] = {"loss": False, "perplexity": False}
        results["loss"] = loss
    if pair_samples:
        for metric in ("preference_accuracy", "margin"):
            mean, stderr = _mean_stderr([s[metric] for s in pair_samples])
            metrics.append({"task": "heldout_preference", "subject": "", "metric": metric, "filter": "",
                            "value": round(mean, 6), "stderr": round(stderr, 6), "n": len(pair_samples)})
            results[metric] = mean
        better["heldout_preference"] = {"preference_accuracy": True, "margin": True}
        print(f"heldout: {len(pair_samples)} held-out preference pairs: preference_accuracy "
              f"{results['preference_accuracy']:.3f}, margin {results['margin']:+.4f} (chosen minus rejected "
              f"log-prob)", flush=True)
    result = {"skipped_too_long": too_long, "pairs_skipped_too_long": pairs_too_long,
              "eval_config": {"heldout_max_items": config["heldout_max_items"], "chat_template": tok.chat_template},
              "metrics": metrics, "model_digest": model_identity(model), "packages": package_versions(),
              "higher_is_better": better}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (out_dir / "samples").mkdir()
    for task, rows in (("heldout", samples), ("heldout_preference", pair_samples)):
        if rows:
            with open(out_dir / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as f:
                for s in rows:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return results
