import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from rouge_score.tokenizers import DefaultTokenizer

from pipeline.data.rouge import dedup, filter_with_reasons, novel_mask, tokenize
from pipeline.evaluation.plots import similarity_histogram

WORDS = ("the a give list write explain classify sentence word number of to in and for with story poem email "
         "three two short").split()


def reference_mask(cands, pool, threshold):
    """The Alpaca / self-instruct loop, with rouge-score itself (tokens computed once, as Alpaca does)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept, mask = [scorer._tokenizer.tokenize(k) for k in pool], []
    for c in cands:
        tokens = scorer._tokenizer.tokenize(c)
        ok = all(rouge_scorer._score_lcs(k, tokens).fmeasure <= threshold for k in kept)
        mask.append(ok)
        if ok:
            kept.append(tokens)
    return mask


def reference_best(cands, pool, threshold):
    """The same loop, with each candidate's highest score against the texts kept before it (0.0 if none)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept, out = [scorer._tokenizer.tokenize(k) for k in pool], []
    for c in cands:
        tokens = scorer._tokenizer.tokenize(c)
        best = max((rouge_scorer._score_lcs(k, tokens).fmeasure for k in kept), default=0.0)
        out.append((best <= threshold, best))
        if best <= threshold:
            kept.append(tokens)
    return out


def reference_counts(scored, edges):
    """Kept and dropped counts per bin (lo, hi] (the first [0, hi]), by a plain scan of the edges."""
    kept, dropped = [0] * (len(edges) - 1), [0] * (len(edges) - 1)
    for keep, best in scored:
        k = next(i for i in range(len(edges) - 1) if best <= edges[i + 1] or i == len(edges) - 2)
        (kept if keep else dropped)[k] += 1
    return kept, dropped


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


def test_tokenizer_is_rouge_scores_token_for_token():
    rng = random.Random(0)
    alphabet = "abcXYZ09 \t\n.,!?-_'\"éÉßİK\u212a中文한국어😀\u00a0"
    ref = DefaultTokenizer(use_stemmer=False)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tokenize(text) == ref.tokenize(text), text


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(WORDS[:8]), max_size=9).map(" ".join), min_size=1, max_size=40),
       pool_size=st.integers(0, 5), block=st.integers(1, 7),
       threshold=st.sampled_from([0.0, 0.3, 0.5, 2 / 3, 0.7, 0.75, 0.9, 1.0]))
def test_property_same_decisions_as_rouge_score(texts, pool_size, block, threshold):
    # small vocabularies make many exact ties; tiny blocks exercise the within-block and across-block paths
    pool, cands = texts[:pool_size], texts[pool_size:]
    expected = reference_mask(cands, pool, threshold)
    got = filter_with_reasons(cands, pool, threshold, block=block)
    assert [k for k, _, _ in got] == expected
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for (kept, similar, score), cand in zip(got, cands):
        if not kept:  # the reported match is real and above the threshold
            assert score > threshold and scorer.score(similar, cand)["rougeL"].fmeasure == score
    # dedup: the same decisions and matches, and (every kept candidate scored: fewer than `sample`) a histogram
    # equal bin for bin to rouge-score's scores
    d = dedup(cands, pool, threshold, block=block)
    assert d.keep == expected == novel_mask(cands, pool, threshold)
    assert d.match == [(None, 0.0) if kept else (similar, score) for kept, similar, score in got]
    hist = d.histogram
    assert hist["estimate"] is None and all(b["exact"] for b in hist["bins"])
    kept, dropped = reference_counts(reference_best(cands, pool, threshold), hist["edges"])
    assert [b["kept"] for b in hist["bins"]] == kept and [b["dropped"] for b in hist["bins"]] == dropped
    assert threshold in hist["edges"]


def corpus_1200():
    rng = random.Random(7)
    verbs = "write give list explain describe classify summarize generate create suggest rewrite".split()
    nouns = "poem story email sentence list essay recipe plan title summary tweet review letter".split()
    vocab = [f"w{i}" for i in range(400)]
    texts = []
    for _ in range(1200):
        if texts and rng.random() < 0.4:  # a near-duplicate of an earlier instruction
            toks = rng.choice(texts).split()
            toks[rng.randrange(len(toks))] = rng.choice(vocab)
            if rng.random() < 0.5:
                toks.insert(rng.randrange(len(toks) + 1), rng.choice(["a", "the", "of", "short"]))
            texts.append(" ".join(toks))
        else:
            texts.append(" ".join([rng.choice(verbs), "a", rng.choice(nouns), "about"]
                                  + rng.choices(vocab, k=rng.randint(1, 6))) + ".")
    return texts[:100], texts[100:]


def test_corpus_of_1200_instructions_identical_to_rouge_score():
    pool, cands = corpus_1200()
    scored = reference_best(cands, pool, 0.7)
    expected = [keep for keep, _ in scored]
    assert 0 < expected.count(False) < len(cands)
    assert novel_mask(cands, pool, 0.7) == expected
    assert [k for k, _, _ in filter_with_reasons(cands, pool, 0.7, block=64)] == expected

    # every kept candidate scored (sample above the kept count): every bin exact and equal to rouge-score's
    full = dedup(cands, pool, 0.7, block=64).histogram
    kept, dropped = reference_counts(scored, full["edges"])
    assert full["estimate"] is None
    assert [b["kept"] for b in full["bins"]] == kept and [b["dropped"] for b in full["bins"]] == dropped

    # a sample of 150 kept candidates: the bins above the threshold stay exact (the dropped ones), the others are
    # an estimate that sums to the kept total and is close to the truth
    d = dedup(cands, pool, 0.7, sample=150, seed=3)
    assert d.keep == expected
    hist = d.histogram
    est = hist["estimate"]
    assert est["sample"] == 150 and est["seed"] == 3 and est["population"] == expected.count(True)
    for b, k, dr in zip(hist["bins"], kept, dropped):
        assert b["dropped"] == dr
        if b["lo"] >= 0.7:
            assert b["exact"] and b["kept"] == 0 == k
        else:
            assert not b["exact"] and abs(b["kept"] - k) <= 5 * b["kept_stderr"] + 2
    assert sum(b["kept"] for b in hist["bins"]) == expected.count(True) == hist["kept"]
    assert sum(est["sampled_counts"]) == 150


def test_dedup_is_deterministic_and_its_plot_byte_identical(tmp_path):
    pool, cands = corpus_1200()
    a, b = dedup(cands, pool, 0.7, sample=200), dedup(cands, pool, 0.7, sample=200)
    assert a == b and json.dumps(a.histogram, sort_keys=True) == json.dumps(b.histogram, sort_keys=True)
    assert dedup(cands, pool, 0.7, sample=200, seed=1).histogram["estimate"]["sampled_counts"] \
        != a.histogram["estimate"]["sampled_counts"]  # the seed picks the sample
    json.dumps(a.histogram)  # JSON-serialisable as it is
    pngs = []
    for name in ("a.png", "b.png"):
        similarity_histogram(tmp_path / name, a.histogram, threshold=0.7, title="1100 instructions")
        pngs.append((tmp_path / name).read_bytes())
    assert pngs[0] == pngs[1] and pngs[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_dedup_histogram_edges_and_thresholds():
    # the threshold is always an edge: kept scores (at most it) and dropped ones (above it) never share a bin
    pool, cands = near_duplicates(300, seed=5)
    for threshold in (0.0, 0.33, 2 / 3, 0.72, 1.0):
        d = dedup(cands, pool, threshold, sample=50)
        hist = d.histogram
        assert threshold in hist["edges"] and hist["edges"][0] == 0.0 and hist["edges"][-1] == 1.0
        assert sum(b["dropped"] for b in hist["bins"]) == d.keep.count(False) == hist["dropped"]
        assert sum(b["kept"] for b in hist["bins"]) == d.keep.count(True) == hist["kept"]
        for b in hist["bins"]:
            if b["lo"] >= threshold and b["lo"] > 0:
                assert b["kept"] == 0 and b["exact"]
            if b["hi"] <= threshold:
                assert b["dropped"] == 0
    assert dedup([], []).histogram["kept"] == 0 and dedup(["", "a"], []).keep == [True, True]
