"""ROUGE-L novelty filter: tunebuild's `novel_mask` vs the Alpaca / self-instruct rouge-score loop.

    python benchmarks/rouge_filter.py            # 1k and 2k against the reference, fast path alone at 8k, 52k
    python benchmarks/rouge_filter.py --sizes 1000 --reference-max 1000

The reference is the loop of Alpaca's `generate_instruction.py` and self-instruct's `bootstrap_instructions.py`:
every new instruction is scored with rouge-score's `_score_lcs` against every instruction kept so far (tokens
computed once with rouge-score's tokenizer) and kept iff no score is above the threshold. It runs in-process,
which is faster than Alpaca's per-instruction `multiprocessing.Pool` on small inputs, so the speedup printed is a
lower bound. Instructions come from `benchmarks/instructions.py` (Zipf vocabulary, ~35% near-duplicates).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.instructions import corpus  # noqa: E402
from pipeline.rouge import novel_mask  # noqa: E402


def reference_mask(candidates, pool, threshold):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept = [scorer._tokenizer.tokenize(t) for t in pool]
    mask = []
    for text in candidates:
        tokens = scorer._tokenizer.tokenize(text)
        ok = all(rouge_scorer._score_lcs(tokens, k).fmeasure <= threshold for k in kept)
        mask.append(ok)
        if ok:
            kept.append(tokens)
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 8000, 52000])
    ap.add_argument("--reference-max", type=int, default=2000, help="run the slow reference up to this size")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--seeds", type=int, default=175, help="pool size (Alpaca/self-instruct: 175 seed tasks)")
    args = ap.parse_args()

    novel_mask(["warm up the imports"], ["once"])
    print(f"{'n':>7} {'kept':>7} {'fast s':>8} {'reference s':>12} {'speedup':>9}  identical")
    for n in args.sizes:
        texts = corpus(n + args.seeds, seed=n)
        pool, cands = texts[: args.seeds], texts[args.seeds:]
        t0 = time.perf_counter()
        fast = novel_mask(cands, pool, args.threshold)
        fast_s = time.perf_counter() - t0
        ref_s, same, speed = float("nan"), "-", "-"
        if n <= args.reference_max:
            t0 = time.perf_counter()
            ref = reference_mask(cands, pool, args.threshold)
            ref_s = time.perf_counter() - t0
            same, speed = str(ref == fast), f"{ref_s / fast_s:.0f}x"
        print(f"{n:>7} {sum(fast):>7} {fast_s:>8.2f} {ref_s:>12.1f} {speed:>9}  {same}", flush=True)


if __name__ == "__main__":
    main()
