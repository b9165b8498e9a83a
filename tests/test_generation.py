"""The batched HF engine: greedy answers equal one-at-a-time `generate`, sampling is per request, the batch size
adapts to memory (issue 23.1)."""
import pytest
import torch

from pipeline.llm.generation import HFEngine
from pipeline.models.hf import load_causal_lm

PROMPTS = [f"Question {i}: what is {'the capital of France ' * (i % 5)}?" for i in range(11)] + \
    ["Write a haiku about the sea.", "1 + 1 =", ""]


@pytest.fixture(scope="module", params=["tiny", "wide"])
def engine(request, tiny_model, wide_model):
    """The built-in tiny model (whose greedy answers repeat one byte), and a 2-layer Llama with grouped KV heads
    whose greedy answers vary token by token (so an answer that went astray would show)."""
    folder = str(tiny_model if request.param == "tiny" else wide_model)
    model, tok = load_causal_lm(folder)
    return HFEngine(folder, model=model, tokenizer=tok, batch_size=6)


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


def test_the_local_backend_hands_the_engine_chunks_of_similar_length(tiny_model, tmp_path, monkeypatch):
    """The client cuts a long prompt list into the engine's batches longest first (the engine sorts only within
    what it is handed); answers come back in the prompts' order, equal to one call over the whole list."""
    from pipeline.llm.client import Client, LocalBackend
    from pipeline.llm.ledger import Ledger

    backend = LocalBackend(str(tiny_model), "builtin:tiny")
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}
    expected = [c.text for c in backend.engine.generate(PROMPTS, max_new_tokens=8)]
    chunks = []
    real = backend.complete_batch
    monkeypatch.setattr(backend, "batch_size", 4)
    monkeypatch.setattr(backend, "complete_batch", lambda prompts, *a: (chunks.append(prompts), real(prompts, *a))[1])
    client = Client(backend, Ledger(tmp_path / "ledger.sqlite"), "builtin:tiny")
    assert client.complete_many(PROMPTS, params) == expected
    assert [len(c) for c in chunks] == [4, 4, 4, 2]
    lengths = [[len(p) for p in c] for c in chunks]
    assert all(min(a) >= max(b) for a, b in zip(lengths, lengths[1:])), lengths


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


def test_rows_that_end_leave_the_batch_and_the_others_answer_the_same(wide_model, monkeypatch):
    """A token most answers say early is made the stop token: rows end at different steps, the ended rows leave the
    batch and its cache, and every answer still equals the one-at-a-time `generate` with that stop token."""
    from collections import Counter

    from pipeline.llm import generation

    model, tok = load_causal_lm(str(wide_model))
    engine = HFEngine(str(wide_model), model=model, tokenizer=tok)
    prompts = PROMPTS[:10]
    rows = [engine.encode(p) for p in prompts]
    free = engine._decode(rows, 24, 0.0, 1.0, None)
    early = Counter(t for answer in free for t in set(answer[:12]))
    stop = early.most_common(1)[0][0]
    ends = sorted(a.index(stop) for a in free if stop in a)
    assert len(ends) >= 3 and ends[0] < ends[-1], ends  # rows end at different steps
    selected = []
    real = generation._slots().batch_select_indices
    monkeypatch.setattr(generation._slots(), "batch_select_indices",
                        lambda self, idx: (selected.append(int(idx.shape[0])), real(self, idx)))
    monkeypatch.setattr(engine, "stop_ids", [stop])
    got = engine._decode(rows, 24, 0.0, 1.0, None)
    assert selected and min(selected) < len(rows)
    for row, answer in zip(rows, got):
        ids = torch.tensor([row])
        with torch.no_grad():
            out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=24, eos_token_id=stop, pad_token_id=stop)
        alone = out[0, len(row):].tolist()
        assert answer == (alone[:-1] if alone and alone[-1] == stop else alone)


def test_prefill_groups_keep_padding_small():
    from pipeline.llm.generation import prefill_groups

    lengths = [500, 30, 480, 31, 470, 29, 2000, 5000, 32]
    groups = prefill_groups(lengths, budget=1600)
    assert sorted(k for g in groups for k in g) == list(range(len(lengths)))
    assert groups[0] == [7] and groups[1] == [6]                     # longer than the budget: alone
    assert [0, 2, 4] in groups and [8, 3, 1, 5] in groups            # similar lengths share a forward
    for g in groups:
        longest = max(lengths[k] for k in g)
        assert len(g) == 1 or (len(g) * longest <= 1600 and sum(lengths[k] for k in g) >= 0.875 * len(g) * longest)


def test_the_batch_fits_the_free_memory(engine, monkeypatch):
    from pipeline.llm import generation

    prompts = PROMPTS[:9]
    expected = [c.text for c in engine.generate(prompts, max_new_tokens=16)]
    widths = []
    real = engine._decode

    def spy(rows, *args):
        widths.append((len(rows), max(len(r) for r in rows)))
        return real(rows, *args)

    per_token = engine.kv_bytes_per_token()
    assert per_token and per_token % 4 == 0                  # float32 keys and values of every layer
    longest = max(len(engine.encode(p)) for p in prompts)
    monkeypatch.setattr(generation, "free_memory", lambda device: 2 * 2 * (2 * longest + 16) * per_token)
    monkeypatch.setattr(engine, "_decode", spy)
    assert [c.text for c in engine.generate(prompts, max_new_tokens=16)] == expected
    assert widths[0] == (2, longest) and all(n <= 6 for n, _ in widths) and sum(n for n, _ in widths) == 9


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_models_answer_as_alone(arch):
    """Models whose attention looks back a window only (Mistral; Gemma-2 alternates windowed and full layers): with
    a window of 8 tokens and prompts of 15-100, the batched answers still equal one-at-a-time `generate`."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GenerationConfig, MistralConfig,
                              MistralForCausalLM)

    from pipeline.models import tiny

    tok = tiny.byte_level_tokenizer()
    config_class, model_class, extra = {"mistral": (MistralConfig, MistralForCausalLM, {}),
                                        "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 32, "tie_word_embeddings": False})}[arch]
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, sliding_window=8,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          initializer_range=0.3, **extra)
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    engine = HFEngine("", model=model, tokenizer=tok, batch_size=6)
    prompts = PROMPTS[:8]
    got = engine.generate(prompts, max_new_tokens=20)
    assert len({c.text for c in got}) > 1
    for prompt, completion in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=20, pad_token_id=tok.pad_token_id)
        assert completion.text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), prompt
