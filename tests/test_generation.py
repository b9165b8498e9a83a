"""The batched HF engine: greedy answers equal one-at-a-time `generate`, sampling is per request, the batch size
adapts to memory (issue 23.1)."""
import pytest
import torch

from pipeline.llm.generation import HFEngine
from pipeline.models.hf import load_causal_lm

PROMPTS = [f"Question {i}: what is {'the capital of France ' * (i % 5)}?" for i in range(11)] + \
    ["Write a haiku about the sea.", "1 + 1 =", ""]


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, tok = load_causal_lm(str(tiny_model))
    return HFEngine(str(tiny_model), model=model, tokenizer=tok, batch_size=6)


def _one_at_a_time(engine, prompt, max_new_tokens):
    model, tok = engine.model, engine.tokenizer
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_batched_greedy_answers_equal_one_at_a_time_generate(engine):
    got = engine.generate(PROMPTS[:-1], max_new_tokens=48)
    for prompt, completion in zip(PROMPTS, got):
        assert completion.text == _one_at_a_time(engine, prompt, 48), prompt
        assert completion.prompt_tokens == len(engine.encode(prompt)) and completion.completion_tokens > 0


def test_an_empty_prompt_is_answered(engine):
    assert engine.generate(["", "hi"], max_new_tokens=8)[0].prompt_tokens == 1


def test_the_batch_does_not_change_an_answer(engine):
    alone = [engine.generate([p], max_new_tokens=32)[0].text for p in PROMPTS[:5]]
    assert [c.text for c in engine.generate(PROMPTS[:5][::-1], max_new_tokens=32)][::-1] == alone


def test_sampling_is_seeded_per_request(engine):
    seeds = list(range(100, 106))
    a = engine.generate(PROMPTS[:6], max_new_tokens=24, temperature=0.8, top_p=0.9, seeds=seeds)
    b = engine.generate(PROMPTS[:6][::-1], max_new_tokens=24, temperature=0.8, top_p=0.9, seeds=seeds[::-1])
    assert [c.text for c in a] == [c.text for c in b][::-1]
    c = engine.generate(PROMPTS[:6], max_new_tokens=24, temperature=0.8, top_p=0.9, seeds=[s + 1 for s in seeds])
    assert [x.text for x in a] != [x.text for x in c]


def test_the_batch_size_halves_on_out_of_memory(engine, monkeypatch):
    real = engine._decode
    sizes = []

    def tight(rows, *args):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(rows, *args)

    monkeypatch.setattr(engine, "_decode", tight)
    got = engine.generate(PROMPTS[:7], max_new_tokens=16)
    monkeypatch.undo()
    assert [c.text for c in got] == [c.text for c in engine.generate(PROMPTS[:7], max_new_tokens=16)]
    assert sizes[:3] == [6, 3, 1] and max(sizes[3:]) <= 2


def test_the_local_backend_answers_through_the_engine(tiny_model, tmp_path):
    from pipeline.llm.client import Client, LocalBackend
    from pipeline.llm.ledger import Ledger

    backend = LocalBackend(str(tiny_model), "builtin:tiny")
    client = Client(backend, Ledger(tmp_path / "ledger.sqlite"), "builtin:tiny")
    params = {"max_tokens": 24, "temperature": 0.0, "top_p": 1.0}
    answers = client.complete_many(PROMPTS[:8], params)
    assert answers == [c.text for c in backend.engine.generate(PROMPTS[:8], max_new_tokens=24)]
    assert client.usage.sent == 8
    again = Client(backend, Ledger(tmp_path / "ledger.sqlite"), "builtin:tiny")
    assert again.complete_many(PROMPTS[:8], params) == answers and again.usage.sent == 0


def test_a_local_model_folder_is_asked_by_its_content(tiny_model, tmp_path):
    import shutil

    from pipeline.llm.client import make_client

    folder = tmp_path / "models" / "mine"
    shutil.copytree(tiny_model, folder)
    config = {"backend": "local", "model": "models/mine", "concurrency": 1, "price_per_1k_tokens": 0.0}
    before = make_client(config, generator=str(folder), ledger=tmp_path / "l.sqlite").model_id
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                # retrained in place
    weights.write_bytes(bytes(data))
    after = make_client(config, generator=str(folder), ledger=tmp_path / "l.sqlite").model_id
    assert before != after and before.startswith("models/mine@")
