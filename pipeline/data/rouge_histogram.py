"""The similarity histogram `pipeline.data.rouge.dedup` reports: per bin of the score the greedy ROUGE-L rule compares
with the threshold, the kept and the dropped candidates; exact above the threshold, and below it, unless every
kept candidate was scored, a fixed-seed sample scaled to all kept candidates (largest remainder rounding), each
such bin with its standard error.
"""
from __future__ import annotations

import numpy as np

EDGES = tuple(round(k * 0.05, 10) for k in range(21))


def _bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bins (lo, hi], the first one [0, hi]."""
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, len(edges) - 2)


def _apportion(counts: np.ndarray, total: int) -> list[int]:
    """Integers proportional to `counts` summing to `total` (largest remainder, ties to the lower bin)."""
    if total == 0 or counts.sum() == 0:
        return [0] * len(counts)
    share = counts * total / counts.sum()
    out = np.floor(share).astype(np.int64)
    order = np.lexsort((np.arange(len(share)), -(share - out)))
    out[order[: total - int(out.sum())]] += 1
    return out.tolist()


def histogram(threshold: float, dropped_best: np.ndarray, sampled_best: np.ndarray,
               n_kept: int, seed: int, sample: int) -> dict:
    edges = np.array(sorted(set(EDGES) | {float(threshold)}))  # the threshold itself: kept ≤ it < dropped
    n_bins = len(edges) - 1
    dropped = np.bincount(_bin(dropped_best, edges), minlength=n_bins)
    sampled = np.bincount(_bin(sampled_best, edges), minlength=n_bins)
    full = len(sampled_best) == n_kept
    # kept scores are at most the threshold: the bins above it hold none, exactly
    holds_kept = (np.arange(n_bins) == 0) | (edges[:-1] < threshold)
    exact = full or int(holds_kept.sum()) == 1
    kept = sampled.tolist() if full else _apportion(sampled, n_kept)
    bins = []
    for k in range(n_bins):
        b = {"lo": float(edges[k]), "hi": float(edges[k + 1]), "kept": int(kept[k]), "dropped": int(dropped[k]),
             "exact": bool(exact or not holds_kept[k])}
        if not b["exact"]:
            # standard error of the scaled count (binomial, with the finite-population correction)
            p = sampled[k] / len(sampled_best)
            fpc = (n_kept - len(sampled_best)) / max(n_kept - 1, 1)
            b["kept_stderr"] = round(float(n_kept * np.sqrt(p * (1 - p) / len(sampled_best) * fpc)), 2)
        bins.append(b)
    return {
        "measure": "highest ROUGE-L F-measure of each candidate against the pool and the candidates kept before "
                   "it (the score the greedy rule compares with the threshold)",
        "threshold": float(threshold),
        "bins": bins,
        "edges": [float(e) for e in edges],
        "candidates": int(n_kept + len(dropped_best)),
        "kept": int(n_kept),
        "dropped": int(len(dropped_best)),
        "estimate": None if full else {
            "what": "kept counts of the bins marked exact=false: a uniform random sample of the kept candidates, "
                    "each scored exactly against every text before it, scaled to all kept candidates (largest "
                    "remainder rounding, so they sum to the exact kept total); dropped counts are always exact",
            "sample": int(len(sampled_best)), "population": int(n_kept), "seed": int(seed),
            "requested_sample": int(sample), "sampled_counts": sampled.tolist(),
        },
    }
