"""Paired statistics for model comparisons on the same documents.

- `paired_summary`: for each subject, and for each category and overall both micro (items pooled, so weighted by
  items) and macro (mean of subject means): the mean of each model, the delta, a paired bootstrap CI of the
  delta (resampling documents within each subject, the same resample for both models), and a p-value: McNemar's
  exact test (a two-sided binomial test on the discordant pairs) when the metric is 0/1 per item, else the
  Wilcoxon signed-rank test; for macro averages the bootstrap's two-sided p-value.
- `holm`: Holm's step-down adjustment of a family of p-values (the subjects of one suite and metric).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Row:
    level: str            # "subject", "category" or "overall"
    name: str             # subject or category name ("all" for overall)
    average: str | None   # "micro" / "macro" for categories and overall, None for a subject
    n: int                # paired documents
    subjects: int
    a: float              # mean of model A (base)
    b: float              # mean of model B (tuned)
    delta: float          # b - a
    ci_low: float
    ci_high: float
    p_value: float | None
    test: str
    p_holm: float | None = None


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes."""
    from scipy.stats import binomtest

    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_b, only_a + only_b, 0.5).pvalue)


def paired_p(a: np.ndarray, b: np.ndarray) -> tuple[float | None, str]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0:
        return None, "none"
    if np.all(np.isin(a, (0.0, 1.0))) and np.all(np.isin(b, (0.0, 1.0))):
        return mcnemar_exact(a, b), "mcnemar_exact"
    if np.allclose(a, b):
        return 1.0, "wilcoxon"
    from scipy.stats import wilcoxon

    return float(wilcoxon(b, a).pvalue), "wilcoxon"


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None stays None), as statsmodels' multipletests(method="holm")."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def _ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _boot_p(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value for 'delta = 0'."""
    below, above = np.mean(samples <= 0), np.mean(samples >= 0)
    return float(min(1.0, 2 * min(below, above)))


def paired_summary(subjects: dict[str, tuple[np.ndarray, np.ndarray]], categories: dict[str, list[str]],
                   *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> list[Row]:
    """`subjects`: name -> (values of A, values of B), aligned per document. `categories`: subject -> list of
    category names (empty when the suite declares none)."""
    rng = np.random.default_rng(seed)
    names = sorted(s for s, (a, _) in subjects.items() if len(a))
    boot: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # subject -> bootstrap means of A and of B
    rows: list[Row] = []
    for s in names:
        a, b = (np.asarray(x, dtype=float) for x in subjects[s])
        pick = rng.integers(0, len(a), size=(resamples, len(a)))
        boot[s] = (a[pick].mean(axis=1), b[pick].mean(axis=1))
        p, test = paired_p(a, b)
        lo, hi = _ci(boot[s][1] - boot[s][0], level)
        rows.append(Row("subject", s, None, len(a), 1, float(a.mean()), float(b.mean()),
                        float(b.mean() - a.mean()), lo, hi, p, test))
    for adj, row in zip(holm([r.p_value for r in rows]), rows):
        row.p_holm = adj

    groups: dict[str, list[str]] = {}
    for s in names:
        for c in categories.get(s, []):
            groups.setdefault(c, []).append(s)
    for level_name, group_items in [("category", sorted(groups.items())), ("overall", [("all", names)])]:
        for name, members in group_items:
            if not members:
                continue
            n = np.array([len(subjects[s][0]) for s in members], dtype=float)
            a_all = np.concatenate([np.asarray(subjects[s][0], dtype=float) for s in members])
            b_all = np.concatenate([np.asarray(subjects[s][1], dtype=float) for s in members])
            ba = np.stack([boot[s][0] for s in members])  # (subjects, resamples)
            bb = np.stack([boot[s][1] for s in members])
            # micro: every document weighs the same (subject means weighted by their sizes)
            micro = (bb - ba).T @ n / n.sum()
            p, test = paired_p(a_all, b_all)
            lo, hi = _ci(micro, level)
            rows.append(Row(level_name, name, "micro", int(n.sum()), len(members), float(a_all.mean()),
                            float(b_all.mean()), float(b_all.mean() - a_all.mean()), lo, hi, p, test))
            # macro: every subject weighs the same
            ma = float(np.mean([np.mean(subjects[s][0]) for s in members]))
            mb = float(np.mean([np.mean(subjects[s][1]) for s in members]))
            macro = (bb - ba).mean(axis=0)
            lo, hi = _ci(macro, level)
            rows.append(Row(level_name, name, "macro", int(n.sum()), len(members), ma, mb, mb - ma, lo, hi,
                            _boot_p(macro), "paired_bootstrap"))
    return rows
