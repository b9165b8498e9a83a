import random

from rouge_score import rouge_scorer

from pipeline.rouge import filter_with_reasons, novel_mask

WORDS = ("the a give list write explain classify sentence word number of to in and for with story poem email "
         "three two short").split()


def reference_mask(cands, pool, threshold):
    """The Alpaca / self-instruct loop, with rouge-score itself."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept, mask = list(pool), []
    for c in cands:
        ok = all(scorer.score(k, c)["rougeL"].fmeasure <= threshold for k in kept)
        mask.append(ok)
        if ok:
            kept.append(c)
    return mask


def near_duplicates(n, seed):
    rng = random.Random(seed)
    base = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(60)]
    out = []
    for _ in range(n):
        toks = rng.choice(base).split()
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            if op < 0.4 and toks:
                toks.pop(rng.randrange(len(toks)))
            elif op < 0.8:
                toks.insert(rng.randrange(len(toks) + 1), rng.choice(WORDS))
            elif toks:
                toks[rng.randrange(len(toks))] = rng.choice(WORDS)
        out.append(" ".join(toks) + rng.choice(["", ".", "!", " ?", " -- "]))
    return base[:10], out


def test_identical_decisions_to_rouge_score_on_near_duplicates():
    pool, cands = near_duplicates(600, seed=3)
    for threshold in (0.5, 2 / 3, 0.7, 0.75):  # 2/3 and 0.75 hit exact ties at the threshold
        assert novel_mask(cands, pool, threshold) == reference_mask(cands, pool, threshold)


def test_tie_at_threshold_is_kept_and_above_is_dropped():
    # "a b" vs "a b c d": lcs 2, p=1, r=0.5 -> F = 2/3 exactly as rouge-score computes it
    assert novel_mask(["a b"], ["a b c d"], threshold=2 / 3) == [True]
    assert novel_mask(["a b"], ["a b c d"], threshold=0.66) == [False]
    assert novel_mask(["", "!!"], ["anything"]) == [True, True]  # no tokens: score 0 as in rouge-score


def test_reasons_name_most_similar_kept_text():
    res = filter_with_reasons(["Write a poem about the sea.", "Write a poem about the sea!"], ["Sort numbers."])
    assert res[0][0] is True
    kept, similar, score = res[1]
    assert not kept and similar == "Write a poem about the sea." and score == 1.0


def test_chinese_near_duplicates_caught_only_by_auto_tokenizer():
    pool = ["请写一首关于秋天的诗"]
    cands = ["请写一首关于秋天的短诗", "解释光合作用的过程"]
    assert novel_mask(cands, pool, 0.7, tokenizer="default") == [True, True]  # rouge-score sees no tokens
    assert novel_mask(cands, pool, 0.7, tokenizer="auto") == [False, True]
