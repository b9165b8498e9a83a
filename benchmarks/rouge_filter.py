"""ROUGE-L novelty filter: tunebuild's `novel_mask` and `dedup` vs the Alpaca / self-instruct rouge-score loop.

    python benchmarks/rouge_filter.py            # short: 1k and 2k against the reference, 8k, 52k; long: 2k, 8k, 20k
    python benchmarks/rouge_filter.py --sizes 1000 --reference-max 1000 --long-sizes
    python benchmarks/rouge_filter.py --reference-max 0 --repeat 3   # best of 3, no reference

The reference is the loop of Alpaca's `generate_instruction.py` and self-instruct's `bootstrap_instructions.py`:
every new instruction is scored with rouge-score's `_score_lcs` against every instruction kept so far (tokens
computed once with rouge-score's tokenizer) and kept iff no score is above the threshold. It runs in-process,
which is faster than Alpaca's per-instruction `multiprocessing.Pool` on small inputs, so the speedup printed is a
lower bound.

`mask s` is `novel_mask` (the decisions alone); `dedup s` is `dedup` (the decisions, the matches and the
similarity histogram: exact above the threshold, a 2,000-candidate sampled estimate below it), the whole filter
stage's ROUGE work; `ratio` is dedup / mask. Corpora come from `benchmarks/instructions.py`: `short` are
self-instruct-like instructions (~17 tokens, ~35% near-duplicates), `long` are longer prompts (median ~50 tokens,
up to ~400, English function words, ~20% near-duplicates).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.instructions import corpus, long_corpus  # noqa: E402
from pipeline.data.rouge import dedup, novel_mask  # noqa: E402


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


def best_of(repeat, fn):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 2000, 8000, 52000], help="short instructions")
    ap.add_argument("--long-sizes", type=int, nargs="*", default=[2000, 8000, 20000], help="long prompts")
    ap.add_argument("--reference-max", type=int, default=2000, help="run the slow reference up to this size")
    ap.add_argument("--long-reference-max", type=int, default=0,
                    help="the same for long prompts (very slow: the reference's LCS is pure Python)")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--seeds", type=int, default=175, help="pool size (Alpaca/self-instruct: 175 seed tasks)")
    ap.add_argument("--sample", type=int, default=2000, help="dedup's histogram sample")
    ap.add_argument("--repeat", type=int, default=1, help="time each of novel_mask and dedup this many times, "
                                                          "print the best")
    args = ap.parse_args()

    novel_mask(["warm up the imports"], ["once"])
    dedup(["warm up the imports"], ["once"])
    print(f"{'corpus':>6} {'n':>7} {'kept':>7} {'mask s':>8} {'dedup s':>8} {'ratio':>6} {'reference s':>12} "
          f"{'speedup':>8}  identical")
    runs = [("short", corpus, n, args.reference_max) for n in args.sizes] \
        + [("long", long_corpus, n, args.long_reference_max) for n in args.long_sizes]
    for name, make, n, reference_max in runs:
        texts = make(n + args.seeds, seed=n)
        pool, cands = texts[: args.seeds], texts[args.seeds:]
        mask_s, fast = best_of(args.repeat, lambda: novel_mask(cands, pool, args.threshold))
        dedup_s, d = best_of(args.repeat, lambda: dedup(cands, pool, args.threshold, sample=args.sample))
        same = "dedup" if d.keep == fast else "DEDUP DIFFERS"
        ref_s, speed = float("nan"), "-"
        if n <= reference_max:
            t0 = time.perf_counter()
            ref = reference_mask(cands, pool, args.threshold)
            ref_s = time.perf_counter() - t0
            same += ", reference" if ref == fast else ", REFERENCE DIFFERS"
            speed = f"{ref_s / mask_s:.0f}x"
        print(f"{name:>6} {n:>7} {sum(fast):>7} {mask_s:>8.2f} {dedup_s:>8.2f} {dedup_s / mask_s:>6.2f} "
              f"{ref_s:>12.1f} {speed:>8}  {same}", flush=True)


if __name__ == "__main__":
    main()
