"""Exact ROUGE-L novelty filtering, with the decisions of `rouge-score`'s `RougeScorer(["rougeL"])`.

Tokenization is rouge-score's own (`tokenizers.DefaultTokenizer`), the LCS length comes from rapidfuzz's
compiled `LCSseq` on token-id sequences, and the F-measure is computed with rouge-score's formula, so every
comparison with the threshold is the one rouge-score would make. Pairs whose length bound already rules out a
score above the threshold are skipped.

`tokenizer="auto"` splits texts containing CJK characters per character (as rouge-chinese does); rouge-score's
tokenizer keeps only [a-z0-9] and would score every Chinese pair 0.
"""
from __future__ import annotations

import re

import numpy as np

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_EPS = 1e-9


def _default_tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=False)


def tokenize(text: str, tokenizer: str = "default", _tok=None) -> list[str]:
    tok = _tok or _default_tokenizer()
    if tokenizer == "auto" and _CJK.search(text):
        tokens = []
        for piece in re.split(f"({_CJK.pattern})", text):
            if _CJK.fullmatch(piece):
                tokens.append(piece)
            elif piece:
                tokens.extend(tok.tokenize(piece))
        return tokens
    if tokenizer not in ("default", "auto"):
        raise ValueError(f"tokenizer must be 'default' or 'auto', got {tokenizer!r}")
    return tok.tokenize(text)


def fmeasure(lcs: int, len_a: int, len_b: int) -> float:
    """rouge-score's ROUGE-L F-measure for an LCS length (its `_score_lcs` + `scoring.fmeasure`)."""
    if not len_a or not len_b:
        return 0.0
    precision = lcs / len_b
    recall = lcs / len_a
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


class _Index:
    """Texts kept so far, as token-id sequences, with their lengths for pruning."""

    def __init__(self, tokenizer: str):
        from rapidfuzz.distance import LCSseq

        self._lcs = LCSseq.similarity
        self._tok = _default_tokenizer()
        self.tokenizer = tokenizer
        self.vocab: dict[str, int] = {}
        self.seqs: list[list[int]] = []
        self.lens = np.zeros(1024, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(t, len(self.vocab)) for t in tokenize(text, self.tokenizer, self._tok)]

    def add(self, seq: list[int]) -> None:
        if len(self.seqs) == len(self.lens):
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
        self.lens[len(self.seqs)] = len(seq)
        self.seqs.append(seq)

    def candidates(self, n: int, threshold: float) -> np.ndarray:
        """Indices of kept texts whose length bound allows a score above the threshold."""
        lens = self.lens[: len(self.seqs)]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        best = 2.0 * np.minimum(lens, n) / (lens + n)
        return np.nonzero((lens > 0) & (best > threshold - _EPS))[0]

    def best_match(self, seq: list[int], threshold: float | None = None) -> tuple[int, float]:
        """(index, score) of the most similar kept text; stops early at the first score above `threshold`."""
        best_i, best_s = -1, 0.0
        n = len(seq)
        for i in self.candidates(n, threshold if threshold is not None else 0.0):
            other = self.seqs[i]
            s = fmeasure(self._lcs(seq, other), n, len(other))
            if s > best_s:
                best_i, best_s = int(i), s
                if threshold is not None and s > threshold:
                    break
        return best_i, best_s


def novel_mask(candidates, pool=(), threshold: float = 0.7, tokenizer: str = "default") -> list[bool]:
    """True where a candidate is kept by the greedy rule: its ROUGE-L F-measure against every text in `pool`
    and every earlier kept candidate is not above `threshold`."""
    return [kept for kept, _, _ in filter_with_reasons(candidates, pool, threshold, tokenizer)]


def filter_with_reasons(candidates, pool=(), threshold: float = 0.7, tokenizer: str = "default"):
    """Like `novel_mask`, but for each dropped candidate also the most similar kept text and its score.

    Returns a list of (kept, most_similar_text_or_None, score).
    """
    texts = list(pool)
    index = _Index(tokenizer)
    for text in texts:
        index.add(index.encode(text))
    out = []
    for text in candidates:
        seq = index.encode(text)
        i, score = index.best_match(seq, threshold)
        if score > threshold:
            i, score = index.best_match(seq)  # the most similar, for the report
            out.append((False, texts[i], score))
        else:
            out.append((True, None, score))
            index.add(seq)
            texts.append(text)
    return out
