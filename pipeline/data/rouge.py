"""Exact ROUGE-L novelty filtering, with the decisions of `rouge-score`'s `RougeScorer(["rougeL"])`, fast.

- Tokens: rouge-score's default tokenizer (lowercase, every run of characters outside [a-z0-9] is a separator),
  written without its regex-per-token pass and without importing nltk; a test checks it token for token.
- Candidates: a pair can only score above the threshold if the texts share enough tokens; an ℓ-prefix filter
  (as in set-similarity joins) over a sparse matrix finds those pairs without looking at the others.
- Scores: rapidfuzz's bit-parallel LCS on the survivors, and rouge-score's F-measure formula in float64, so every
  comparison with the threshold is the one rouge-score makes (ties included).

`dedup` gives the decisions with the evidence the filter stage reports: each dropped candidate's match and a
histogram of the score the rule compares (exact above the threshold, where it comes with the decisions; below
it a fixed-seed sample of the kept candidates scored exactly against everything before them, labelled as an
estimate; `pipeline.data.rouge_histogram`), at a small fraction of the cost of computing every score down to a
floor.

`tokenizer="auto"` splits texts containing CJK characters per character (as rouge-chinese does); rouge-score's
tokenizer keeps only [a-z0-9] and would score every Chinese pair 0.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np

from pipeline.data.rouge_histogram import histogram as similarity_histogram

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_ALNUM_RUN = re.compile(r"[a-z0-9]+")
_EPS = 1e-9


def _rouge_tokens(text: str) -> list[str]:
    """rouge_score.tokenize.tokenize(text, stemmer=None) (lowercase, runs of non-[a-z0-9] to spaces, split,
    keep [a-z0-9]+ tokens): the maximal [a-z0-9] runs of the lowercased text."""
    return _ALNUM_RUN.findall(text.lower())


def tokenize(text: str, tokenizer: str = "default") -> list[str]:
    if tokenizer == "auto" and _CJK.search(text):
        tokens = []
        for piece in re.split(f"({_CJK.pattern})", text):
            if _CJK.fullmatch(piece):
                tokens.append(piece)
            elif piece:
                tokens.extend(_rouge_tokens(piece))
        return tokens
    if tokenizer not in ("default", "auto"):
        raise ValueError(f"tokenizer must be 'default' or 'auto', got {tokenizer!r}")
    return _rouge_tokens(text)


def fmeasure(lcs: int, len_a: int, len_b: int) -> float:
    """rouge-score's ROUGE-L F-measure for an LCS length (its `_score_lcs` + `scoring.fmeasure`)."""
    if not len_a or not len_b:
        return 0.0
    precision = lcs / len_b
    recall = lcs / len_a
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def min_overlap(n: np.ndarray | int, threshold: float):
    """The fewest shared tokens a text of `n` tokens needs with any other text to score above `threshold`.

    F = 2·lcs/(n+m) and lcs ≤ overlap ≤ m, so F > t needs overlap > t·n/(2−t). The bound is loosened by a
    small epsilon so that a pair rouge-score's floating-point formula puts just above the threshold is never
    pruned.
    """
    t = threshold - _EPS
    return np.floor(t * np.asarray(n, dtype=np.float64) / (2.0 - t)).astype(np.int64) + 1


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(4, thread_name_prefix="rouge")
    return _POOL


class _Texts:
    """Every text once: token ids, lengths, LCS strings, and a binary matrix of each text's ℓ-prefix.

    Every token occurrence is an element (token, k-th occurrence), so multisets become sets and the count of
    shared elements bounds the LCS. Elements are ranked rarest first over all texts. If two texts share at
    least α elements, the first ℓ shared ones (in that order) lie in both texts' prefixes of length
    `len − α + ℓ` (the ℓ-prefix filter of set-similarity joins). With each text's own α (`min_overlap`) and
    ℓ' = min(ℓ, α), a pair that can score above the threshold shares at least min(ℓ, α_a, α_b) prefix
    elements; everything else is pruned without computing an LCS.
    """

    def __init__(self, texts: list[str], tokenizer: str, threshold: float, ell: int = 2):
        seqs = [tokenize(x, tokenizer) for x in texts]
        self.lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        flat = list(chain.from_iterable(seqs))
        vocab = {t: i for i, t in enumerate(dict.fromkeys(flat))}
        tokens = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
        # ids by decreasing frequency: rapidfuzz looks code points below 256 up in an array (faster than its
        # hash map), and most tokens are frequent ones
        by_freq = np.empty(len(vocab), dtype=np.int64)
        by_freq[np.argsort(-np.bincount(tokens, minlength=len(vocab)), kind="stable")] = np.arange(len(vocab))
        tokens = by_freq[tokens]
        # token ids as one code point each (skipping surrogates), so rapidfuzz runs its bit-parallel LCS
        codes = np.where(tokens < 0xD800, tokens, tokens + 0x800).astype("<u4").tobytes()
        ends = np.cumsum(self.lens) * 4
        self.strs = np.array([codes[e - 4 * n:e].decode("utf-32-le") for e, n in zip(ends.tolist(),
                              self.lens.tolist())], dtype=object)
        # α when the other text is at least as long (overlap > t·n) and when it may be shorter (> t·n/(2−t))
        t = threshold - _EPS
        self.alpha_short = np.floor(t * self.lens).astype(np.int64) + 1
        self.alpha_long = min_overlap(self.lens, threshold)
        self.ell = ell

        # elements (token, k-th occurrence in its text), ranked rarest first, each text's ranks sorted
        n_vocab = max(len(vocab), 1)
        rows = np.repeat(np.arange(len(seqs)), self.lens)
        key = np.sort(rows * n_vocab + tokens)  # each text's tokens sorted (the rows already are)
        tokens = key % n_vocab
        start = np.r_[0, np.flatnonzero(key[1:] != key[:-1]) + 1]
        run = np.repeat(start, np.diff(np.r_[start, len(tokens)]))
        occurrence = np.arange(len(tokens)) - run
        n_occ = int(occurrence.max(initial=0)) + 1
        element = tokens * n_occ + occurrence
        if n_vocab * n_occ <= max(2 * len(element), 1 << 20):  # a table over every element id (no sort)
            freq_of = np.bincount(element, minlength=n_vocab * n_occ)
            uniq = np.flatnonzero(freq_of)
            freq = freq_of[uniq]
            index_of = np.empty(n_vocab * n_occ, dtype=np.int64)
            index_of[uniq] = np.arange(len(uniq))
            inverse = index_of[element]
        else:
            uniq, inverse, freq = np.unique(element, return_inverse=True, return_counts=True)
        rank_of = np.empty(len(uniq), dtype=np.int64)
        rank_of[np.lexsort((uniq, freq))] = np.arange(len(uniq))
        self._width = max(len(uniq), 1)
        key = np.sort(rows * self._width + rank_of[inverse])  # each text's ranks sorted
        self._rows, self._ranks = rows, key % self._width
        self._pos = np.arange(len(self._rows)) - np.repeat(np.cumsum(self.lens) - self.lens, self.lens)
        self.prefix_short = self._prefixes(self.alpha_short)
        self.prefix_long = self._prefixes(self.alpha_long)

    def _prefixes(self, alpha: np.ndarray):
        """Each text's ℓ'-prefix as a sparse row. A pair needs min(ℓ, α_a, α_b) shared prefix elements; a text
        whose α is below ℓ weighs its elements ℓ, so that one shared element already reaches ℓ in the product
        and every pair is tested against the single count ℓ."""
        from scipy.sparse import csr_matrix

        size = np.where(self.lens > 0, self.lens - alpha + np.minimum(self.ell, alpha), 0).clip(min=0)
        take = self._pos < size[self._rows]
        rows = self._rows[take]
        weight = np.where(alpha >= self.ell, 1, self.ell).astype(np.int32)[rows]
        indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=len(self.lens)))]
        return csr_matrix((weight, self._ranks[take], indptr), shape=(len(self.lens), self._width))

    def _direction(self, queries, others, threshold, query_shorter, lower):
        """Pairs that share enough prefix elements, for one direction of the length order."""
        q_prefix, o_prefix = ((self.prefix_short, self.prefix_long) if query_shorter
                              else (self.prefix_long, self.prefix_short))
        shared = q_prefix[queries] @ o_prefix[others].T
        hit = np.flatnonzero(shared.data >= self.ell)
        q = queries[np.searchsorted(shared.indptr, hit, side="right") - 1]
        o = others[shared.indices[hit]]
        n, m = self.lens[q], self.lens[o]
        ok = ((m >= n) if query_shorter else (m < n)) & (n > 0) & (m > 0)
        ok &= 2.0 * np.minimum(n, m) / (n + m) > threshold - _EPS
        if lower:
            ok &= o < q
        return q[ok], o[ok]

    def pairs(self, requests, threshold: float):
        """For each request (queries, others, lower): the candidate pairs (query id, other id) that may score
        above `threshold`, with their exact F-measure. With `lower`, only pairs whose other id is smaller.

        The shorter text of a pair needs overlap > t·n (its short prefix), the longer > t·m/(2−t) (its long
        prefix). scipy's sparse products release the GIL, so all of them run at once on the thread pool;
        the LCS of every surviving pair is one multi-threaded rapidfuzz call."""
        from rapidfuzz.distance import LCSseq
        from rapidfuzz.process import cpdist

        jobs = [(i, queries, others, lower, shorter) for i, (queries, others, lower) in enumerate(requests)
                if len(queries) and len(others) for shorter in (True, False)]
        found = list(_pool().map(lambda j: (j[0], self._direction(j[1], j[2], threshold, j[4], j[3])), jobs))
        q = np.concatenate([f[1][0] for f in found] + [np.zeros(0, dtype=np.int64)])
        o = np.concatenate([f[1][1] for f in found] + [np.zeros(0, dtype=np.int64)])
        which = np.concatenate([np.full(len(f[1][0]), f[0]) for f in found] + [np.zeros(0, dtype=np.int64)])
        f = np.zeros(0)
        if len(q):
            lcs = cpdist(self.strs[q].tolist(), self.strs[o].tolist(), scorer=LCSseq.similarity,
                         dtype=np.int64, workers=-1).astype(np.float64)
            # rouge-score's formula, elementwise in float64 (IEEE, so the same numbers as its Python code)
            precision, recall = lcs / self.lens[o], lcs / self.lens[q]
            total = precision + recall
            with np.errstate(invalid="ignore", divide="ignore"):
                f = np.where(total > 0, 2 * precision * recall / total, 0.0)
        return [(q[which == i], o[which == i], f[which == i]) for i in range(len(requests))]


def _check(threshold: float, tokenizer: str) -> None:
    if tokenizer not in ("default", "auto"):
        raise ValueError(f"tokenizer must be 'default' or 'auto', got {tokenizer!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold!r}")


def _decide(texts: list[str], n_pool: int, threshold: float, tokenizer: str, floor: float, block: int):
    """The greedy rule over `texts` (the first `n_pool` kept as given). Returns the corpus, the kept mask, and per
    text the best kept text before it (-1 if none above `floor`) and that score (-1.0 if none above `floor`).

    Candidates go in blocks: each block is compared with everything kept before it in one sparse product, then
    with itself, and the greedy rule is applied in order."""
    corpus = _Texts(texts, tokenizer, floor)
    kept = np.zeros(len(texts), dtype=bool)
    kept[:n_pool] = True
    best_o = np.full(len(texts), -1, dtype=np.int64)
    best_f = np.full(len(texts), -1.0)
    for start in range(n_pool, len(texts), block):
        ids = np.arange(start, min(start + block, len(texts)))
        # against everything kept before the block (best per query, ties to the earliest kept text), and
        # within the block
        (q, o, f), (a, b, g) = corpus.pairs([(ids, np.flatnonzero(kept[:start]), False), (ids, ids, True)],
                                            floor)
        q, o, f = q[f > floor], o[f > floor], f[f > floor]
        a, b, g = a[g > floor], b[g > floor], g[g > floor]
        if len(q):
            order = np.lexsort((o, -f, q))
            first = order[np.unique(q[order], return_index=True)[1]]
            best_o[q[first]], best_f[q[first]] = o[first], f[first]
        kept[ids] = best_f[ids] <= threshold
        # within the block, in order: a pair counts only if its earlier text was kept
        inner: dict[int, list[tuple[int, float]]] = {}
        for i, j, s in zip(a.tolist(), b.tolist(), g.tolist()):
            inner.setdefault(i, []).append((j, s))
        for i in sorted(inner):
            bo, bf = int(best_o[i]), float(best_f[i])
            for j, s in inner[i]:
                if kept[j] and (s > bf or (s == bf and j < bo)):
                    bo, bf = j, s
            best_o[i], best_f[i] = bo, bf
            kept[i] = bf <= threshold
    return corpus, kept, best_o, best_f


def novel_mask(candidates, pool=(), threshold: float = 0.7, tokenizer: str = "default") -> list[bool]:
    """True where a candidate is kept by the greedy rule: its ROUGE-L F-measure against every text in `pool`
    and every earlier kept candidate is not above `threshold`."""
    _check(threshold, tokenizer)
    pool = list(pool)
    _, kept, _, _ = _decide(pool + list(candidates), len(pool), threshold, tokenizer, threshold, 2048)
    return kept[len(pool):].tolist()


def filter_with_reasons(candidates, pool=(), threshold: float = 0.7, tokenizer: str = "default",
                        floor: float | None = None, block: int = 2048):
    """Like `novel_mask`, with the evidence: a list of (kept, most_similar_kept_text, score) per candidate.

    `score` is the highest ROUGE-L F-measure against the pool and the candidates kept before it, exact when
    it is above `floor` (default: the threshold), else None ("at most `floor`"); a dropped candidate's score
    is always above the threshold and comes with the kept text it matched (the first such on ties).
    A `floor` below the threshold costs many times the decisions; `dedup` gives the same decisions with a
    histogram of these scores at a fraction of that cost.
    """
    _check(threshold, tokenizer)
    floor = threshold if floor is None else min(floor, threshold)
    pool = list(pool)
    texts = pool + list(candidates)
    _, kept, best_o, best_f = _decide(texts, len(pool), threshold, tokenizer, floor, block)
    return [(True, None, bf if bf > floor else None) if k else (False, texts[bo], bf)
            for k, bo, bf in zip(kept[len(pool):].tolist(), best_o[len(pool):].tolist(),
                                 best_f[len(pool):].tolist())]


def _best_before(corpus: _Texts, kept: np.ndarray, queries: np.ndarray, pairs_per_call: int = 1 << 22):
    """Exact: each query's highest ROUGE-L F against the kept texts with a smaller id (0.0 if there are none),
    the float64 number rouge-score computes. `queries`: kept ids, sorted ascending.

    Every (query, earlier kept text) pair is scored, a few queries against all earlier kept texts per
    multi-threaded rapidfuzz call, so the cost is len(queries) x the kept texts: meant for a sample. rapidfuzz's
    normalized Indel similarity is 2·lcs/(n+m), the F-measure, in float32; the pairs within float32 rounding of
    each query's best get their exact LCS (recovered from it) and rouge-score's float64 formula, so ties and bin
    edges come out as rouge-score has them."""
    from rapidfuzz.distance import LCSseq, Indel
    from rapidfuzz.process import cdist, cpdist

    others = np.flatnonzero(kept)
    lens, strs = corpus.lens, corpus.strs
    qpos = np.searchsorted(others, queries)  # the texts before query r are others[:qpos[r]]
    best = np.zeros(len(queries))
    todo = np.flatnonzero((lens[queries] > 0) & (qpos > 0))  # no tokens or nothing before: 0, as rouge-score
    start = 0
    while start < len(todo):
        # as many queries as fit in the pair budget against the kept texts before the last of them, with at most
        # about an eighth more texts before the last than before the first (the pairs scored for nothing)
        stop, first = start + 1, int(qpos[todo[start]])
        while stop < len(todo) and (stop + 1 - start) * int(qpos[todo[stop]]) <= pairs_per_call \
                and qpos[todo[stop]] <= first + first // 8 + 256:
            stop += 1
        rows = todo[start:stop]
        start = stop
        qp, q = qpos[rows], queries[rows]
        sim = cdist(strs[q].tolist(), strs[others[: qp[-1]]].tolist(), scorer=Indel.normalized_similarity,
                    dtype=np.float32, workers=-1)
        # only the texts before each query: the columns from the first query's bound on are masked row by row
        tail = sim[:, qp[0]:]
        tail[np.arange(qp[0], qp[-1])[None, :] >= qp[:, None]] = 0
        top = sim.max(axis=1)
        r, c = np.nonzero(sim >= np.where(top > 0, top * (1 - 1e-5), np.inf)[:, None])
        if not len(r):
            continue
        o = others[c]
        total = lens[q[r]] + lens[o]
        if total.max() < 1 << 22:
            # the Indel distance n+m−2·lcs is an integer and float32 is within 2^-25 of 1 − it/(n+m)
            x = (total - np.rint((1.0 - sim[r, c].astype(np.float64)) * total)) / 2
        else:
            x = cpdist(strs[q[r]].tolist(), strs[o].tolist(), scorer=LCSseq.similarity, dtype=np.int64,
                       workers=-1).astype(np.float64)
        precision, recall = x / lens[o], x / lens[q[r]]
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(x > 0, 2 * precision * recall / (precision + recall), 0.0)
        np.maximum.at(best, rows[r], f)
    return best


@dataclass
class Dedup:
    """`dedup`'s result. `keep`: per candidate, as `novel_mask`. `match`: per candidate, for a dropped one the
    kept text it matched and its score (the first such kept text on ties), for a kept one (None, 0.0).
    `histogram`: JSON-serialisable histogram of each candidate's highest ROUGE-L against the texts before it
    (see `dedup`)."""

    keep: list[bool]
    match: list[tuple[str | None, float]]
    histogram: dict


def dedup(candidates: list[str], pool: list[str] = (), threshold: float = 0.7, tokenizer: str = "default", *,
          sample: int = 2000, seed: int = 0, block: int = 2048) -> Dedup:
    """The greedy ROUGE-L filter (`novel_mask`'s decisions) with its evidence and a similarity histogram.

    The histogram counts, per bin of the score the rule compares with the threshold (a candidate's highest
    ROUGE-L F against the pool and the candidates kept before it; bins (lo, hi] of width 0.05, the threshold
    always an edge), the kept and the dropped candidates.
    - Above the threshold the counts are exact and free: those are the dropped candidates and their best match.
    - At or below it (kept candidates only) scores are not computed by the filter. Up to `sample` kept
      candidates, drawn at random with `seed` (numpy PCG64), are scored exactly against every text before them
      and the counts scaled to all kept candidates; those bins say `"exact": false` and carry a standard error,
      and `histogram["estimate"]` describes the sample. With at most `sample` kept candidates every one is
      scored and every bin is exact (`"estimate": None`).
    The sample costs `sample` x (kept texts) LCS computations, a small fraction of the decisions at Alpaca
    scale; the same inputs give the same result, bit for bit.
    """
    _check(threshold, tokenizer)
    if sample < 1:
        raise ValueError(f"sample must be at least 1, got {sample!r}")
    pool = list(pool)
    texts = pool + list(candidates)
    n_pool = len(pool)
    corpus, kept, best_o, best_f = _decide(texts, n_pool, threshold, tokenizer, threshold, block)
    keep = kept[n_pool:]
    kept_ids = np.flatnonzero(keep) + n_pool
    if len(kept_ids) > sample:
        keys = np.random.Generator(np.random.PCG64(seed)).random(len(kept_ids))
        kept_ids = np.sort(kept_ids[np.argsort(keys, kind="stable")[:sample]])
    sampled_best = _best_before(corpus, kept, kept_ids)
    dropped_best = best_f[n_pool:][~keep]
    histogram = similarity_histogram(threshold, dropped_best, sampled_best, int(keep.sum()), seed, sample)
    match = [(None, 0.0) if k else (texts[o], f)
             for k, o, f in zip(keep.tolist(), best_o[n_pool:].tolist(), best_f[n_pool:].tolist())]
    return Dedup(keep.tolist(), match, histogram)
