"""Packing SFT conversations (TRL's best-fit, padding-free): the per-token loss of a packed batch is the unpacked
loss of the same conversations, no token attends across a conversation's boundary, the loss stays on assistant
tokens, and the summary counts the tokens trained, the padding share and the packing efficiency."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT
from pipeline.finetuning import packing
from pipeline.errors import TunebuildError
from pipeline.stages import sft

TEMPLATE = ROOT / "recipes/templates/chatml.jinja"


def conversations(n=7):
    """Conversations of different lengths (several fit in one 96-token row), one of them with two turns."""
    out = [[{"role": "user", "content": "Q" * (3 + 5 * i)}, {"role": "assistant", "content": "a" * (2 + 3 * i)}]
           for i in range(n)]
    out[2] = out[2] + [{"role": "user", "content": "more?"}, {"role": "assistant", "content": "yes"}]
    return out


def prepared(tiny_model, tmp_path, attn: str, layout: str = "flat"):
    """(model, tokenizer rows, the packed batch the SFT stage's trainer feeds its model, the conversations'
    spans in it as (row, start, end)): `flat` is TRL's padding-free row (flash attention), `rows` the stage's
    dense rows (`packing.DenseRows`, sdpa / eager)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.models.hf import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = TEMPLATE.read_text()
    rows, counts = sft.tokenize_conversations(conversations(), tok, 96, TEMPLATE)
    assert counts["truncated"] == 0 and all(len(r["input_ids"]) < 96 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    args = SFTConfig(output_dir=str(tmp_path), max_length=96, completion_only_loss=True, report_to="none",
                     use_cpu=True, per_device_train_batch_size=8, **packing.sft_args({"packing": True}))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert not packing.varlen_attention(trainer.model)
    if layout == "rows":
        packing.dense_rows(trainer)
        assert isinstance(trainer.data_collator, packing.DenseRows)
    packed = trainer.train_dataset
    assert len(packed) < len(rows)                                       # several conversations share a row
    examples = [packed[i] for i in range(len(packed))]
    batch = trainer.data_collator(examples)
    assert "attention_mask" not in batch                                 # the boundaries are in the position ids
    spans, offset = [], 0
    for row, e in enumerate(examples):
        start = 0 if layout == "rows" else offset
        for length in e["seq_lengths"]:
            spans.append((0 if layout == "flat" else row, start, start + length))
            start += length
        offset = start
    if layout == "flat":
        assert batch["input_ids"].shape[0] == 1                          # padding-free: one flat row
    else:
        assert batch["input_ids"].shape == (len(examples), max(len(e["input_ids"]) for e in examples))
        assert int(batch.pop(packing.TOKENS)) == sum(len(e["input_ids"]) for e in examples) < batch["input_ids"].numel()
        assert batch["input_ids"].shape[0] > 1
    return model, rows, batch, spans


@pytest.mark.parametrize("layout", ["flat", "rows"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_is_the_unpacked_loss_and_stays_on_assistant_tokens(tiny_model, tmp_path, attn, layout):
    model, rows, batch, spans = prepared(tiny_model, tmp_path, attn, layout)
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:  # each conversation alone, unpadded
            ids = torch.tensor([r["input_ids"]])
            labels = torch.where(torch.tensor([r["completion_mask"]]) == 1, ids, -100)
            count = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * count
            n += count
        packed = model(**batch).loss.item()
    assert n == int((batch["labels"][:, 1:] != -100).sum())             # the same tokens carry the loss
    assert abs(packed - total / n) < 1e-4, (packed, total / n)
    # the labels are the completion mask's: every loss token of the packed row is an assistant token of its row
    by_tokens = sorted(tuple(t for t, m in zip(r["input_ids"], r["completion_mask"]) if m) for r in rows)
    packed_labels = sorted(tuple(t for t in batch["labels"][row, a:b].tolist() if t != -100) for row, a, b in spans)
    assert packed_labels == by_tokens
    if layout == "rows":                                                 # the padded tails carry no label
        ends = {}
        for row, a, b in spans:
            ends[row] = max(ends.get(row, 0), b)
        assert all((batch["labels"][row, end:] == -100).all() for row, end in ends.items())


@pytest.mark.parametrize("layout", ["flat", "rows"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_a_conversation_boundary(tiny_model, tmp_path, attn, layout):
    model, rows, batch, spans = prepared(tiny_model, tmp_path, attn, layout)
    assert len(spans) == len(rows) >= 3
    with torch.no_grad():
        logits = model(**batch).logits
        # A: the first conversation of a row it shares with others (so later tokens of its row could see it)
        shared = [s for s in spans if sum(row == s[0] for row, _, _ in spans) > 1 and s[1] == 0]
        assert shared
        r0, a0, a1 = shared[0]
        rest = [s for s in spans if s != shared[0]]
        changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        changed["input_ids"][r0, a0:a1] = (changed["input_ids"][r0, a0:a1] + 7) % 200 + 5    # another A
        after = model(**changed).logits
        assert (after[r0, a0:a1] - logits[r0, a0:a1]).abs().max() > 1e-3       # A's own logits do change
        for row, a, b in rest:                                          # no other conversation sees it
            assert (after[row, a:b] - logits[row, a:b]).abs().max() < 1e-6
            alone = model(input_ids=batch["input_ids"][row:row + 1, a:b]).logits[0]   # each is what it is alone
            assert (alone - logits[row, a:b]).abs().max() < 1e-4


@pytest.mark.parametrize("layout", ["flat", "rows", "padded"])
def test_the_label_position_loss_is_trls_and_projects_only_label_positions(tiny_model, tmp_path, layout):
    """`pipeline.finetuning.sft_loss` (the stage's loss on a CPU): the same loss, gradients and metrics as TRL's
    fused LM head, packed and padded, through PEFT; the LM head sees the label positions only."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.finetuning import sft_loss
    from pipeline.models.hf import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = TEMPLATE.read_text()
    rows, _ = sft.tokenize_conversations(conversations(), tok, 96, TEMPLATE)
    results = []
    for cls in (SFTTrainer, sft_loss.on_label_positions(SFTTrainer)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        args = SFTConfig(output_dir=str(tmp_path / cls.__module__), max_length=96, completion_only_loss=True,
                         report_to="none", use_cpu=True, per_device_train_batch_size=8,
                         **packing.sft_args({"packing": layout != "padded"}))
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      peft_config=lora)
        if layout == "rows":
            packing.dense_rows(trainer)
        data = trainer.train_dataset
        batch = trainer.data_collator([data[i] for i in range(len(data))])
        batch.pop(packing.TOKENS, None)
        assert ("attention_mask" not in batch) == (layout != "padded")
        assert (batch["input_ids"].shape[0] == 1) == (layout == "flat")
        projected = []
        head = trainer.model.get_base_model().lm_head
        hook = head.register_forward_hook(lambda m, i, o: projected.append(i[0].shape[:-1].numel()))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.item(), grads, metrics, projected))
    (trl_loss, trl_grads, trl_metrics, _), (loss, grads, metrics, projected) = results
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    if layout == "flat" or sft_loss._masks_logits(trainer.model.get_base_model()):
        assert projected == [labelled]                  # the LM head ran on the label positions only
    else:                                               # several rows: the positions labelled in some row
        assert projected == [batch["input_ids"].shape[0] * int((batch["labels"][:, 1:] != -100).any(0).sum())]
        assert projected[0] < batch["input_ids"].numel()
    assert abs(loss - trl_loss) < 1e-5, (loss, trl_loss)
    assert grads.keys() == trl_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], trl_grads[name], atol=1e-6, rtol=1e-4), name
    assert metrics.keys() == trl_metrics.keys()
    if layout == "rows":   # TRL counts a position-ids batch's width (one flat row's slots): all rows' slots here
        assert metrics.pop("num_tokens") == batch["input_ids"].numel() > trl_metrics["num_tokens"]
    for key in metrics:
        assert abs(metrics[key] - trl_metrics[key]) < 1e-4, (key, metrics[key], trl_metrics[key])


def test_the_stage_packs_and_counts_the_tokens_it_trained(tiny_model, tmp_path):
    from pipeline.data.dataset import write_dataset
    from test_precision import train_config

    data = tmp_path / "d"
    data.mkdir()
    write_dataset(data, [{"messages": c} for c in conversations(12)], 0.0)
    summaries = {}
    for packed in (False, True):
        out = tmp_path / f"packed-{packed}"
        out.mkdir()
        cfg = train_config(packing=packed, max_steps=-1, num_epochs=1.0, batch_size=2, max_length=96)
        summaries[packed] = sft.run(out, base_model=str(tiny_model), base_ref="builtin:tiny", stage_name="sft",
                                    data={"d": data}, chat_template=TEMPLATE, config=cfg)
        assert json.loads((out / "train_summary.json").read_text()) == summaries[packed]
    plain, packed = summaries[False], summaries[True]
    # one epoch either way: every conversation's tokens once, the same tokens with a loss
    assert plain["tokens_trained"] == packed["tokens_trained"] > 0
    assert plain["loss_tokens"] == packed["loss_tokens"] > 0
    assert packed["steps"] < plain["steps"] == 6 and packed["packed_rows"] < plain["kept"] == 12
    # on this CPU (sdpa) packed rows stay rows, padded to the batch's longest: less padding than one conversation
    # per row, not none (a flat padding-free row has none: tests above)
    assert plain["padding_share"] > 0.1 and 0.0 < packed["padding_share"] < plain["padding_share"]
    assert plain["packing_efficiency"] is None and 0.5 < packed["packing_efficiency"] <= 1.0
    assert packed["packing_efficiency"] == round(packed["tokens_trained"] / (packed["packed_rows"] * 96), 6)
    assert (plain["packing"], packed["packing"]) == (False, True)


def test_dpo_packing_is_refused_in_one_line(tmp_path):
    import shutil

    from pipeline.core.recipe.load import load_recipes

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes", ignore=shutil.ignore_patterns("*.toml"))
    for name in ("zh_dpo.toml", "zh_dpo_demo.toml"):
        shutil.copy(ROOT / "recipes" / name, tmp_path / "recipes")
    (tmp_path / "recipes/p.toml").write_text('extends = "zh_dpo_demo.toml"\n[train.dpo]\npacking = true\n')
    errors = []
    load_recipes(tmp_path / "recipes", errors)
    assert any("p.toml: train.dpo.packing: not a setting of method = 'dpo' (packing is TRL's SFT packing" in e
               for e in errors), errors
