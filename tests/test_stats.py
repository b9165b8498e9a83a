import numpy as np
import pytest
from scipy.stats import wilcoxon
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from pipeline.errors import TunebuildError
from pipeline.evaluation.stats import holm, mcnemar_exact, paired_p, paired_summary
from pipeline.stages.scores import check_comparable, read_categories


def test_mcnemar_exact_hand_computed_and_as_statsmodels():
    # 1 document only base got right, 5 only tuned got right: p = 2 * P(X <= 1 | n=6, 1/2) = 2 * 7/64
    base = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0])
    tuned = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0])
    assert mcnemar_exact(base, tuned) == pytest.approx(14 / 64)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
        table = [[np.sum((a == 1) & (b == 1)), np.sum((a == 1) & (b == 0))],
                 [np.sum((a == 0) & (b == 1)), np.sum((a == 0) & (b == 0))]]
        assert mcnemar_exact(a, b) == pytest.approx(min(1.0, mcnemar(table, exact=True).pvalue))
    assert mcnemar_exact(np.ones(5), np.ones(5)) == 1.0


def test_holm_as_statsmodels():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, 7))
        assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert holm([0.01, None, 0.04]) == [0.02, None, 0.04]


def test_non_binary_metric_uses_wilcoxon():
    a = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    b = a + np.array([0.05, 0.1, -0.02, 0.2, 0.15, 0.01])
    p, test = paired_p(a, b)
    assert test == "wilcoxon" and p == pytest.approx(wilcoxon(b, a).pvalue)


def test_micro_and_macro_are_different_numbers_and_labelled():
    subjects = {"algebra": ([0, 0, 0, 0], [1, 1, 1, 1]), "law": ([1, 1], [1, 1])}
    rows = paired_summary(subjects, {"algebra": ["STEM"], "law": ["Humanities"]}, resamples=500)
    by = {(r.level, r.name, r.average): r for r in rows}
    assert by[("subject", "algebra", None)].delta == 1.0
    law = by[("subject", "law", None)]
    assert (law.delta, law.ci_low, law.ci_high, law.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert by[("overall", "all", "micro")].delta == pytest.approx(4 / 6)  # documents weigh the same
    assert by[("overall", "all", "macro")].delta == pytest.approx(0.5)    # subjects weigh the same
    assert by[("category", "STEM", "micro")].n == 4 and by[("category", "Humanities", "macro")].subjects == 1
    micro = by[("overall", "all", "micro")]
    assert micro.ci_low - 1e-12 <= micro.delta <= micro.ci_high + 1e-12 and micro.ci_low > 0  # all improve
    # Holm over the two subjects
    assert by[("subject", "algebra", None)].p_holm == pytest.approx(min(1, 2 * mcnemar_exact([0] * 4, [1] * 4)))


def test_bootstrap_ci_contains_zero_for_noise_and_is_reproducible():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 200)
    b = a.copy()
    flip = rng.choice(200, 20, replace=False)
    b[flip] = 1 - b[flip]  # as many flips up as down, on average
    r1 = paired_summary({"s": (a, b)}, {})
    r2 = paired_summary({"s": (a, b)}, {})
    assert [(r.ci_low, r.ci_high) for r in r1] == [(r.ci_low, r.ci_high) for r in r2]
    subject = r1[0]
    assert subject.ci_low < 0 < subject.ci_high or abs(subject.delta) > 0.05


def test_comparison_between_different_eval_configs_is_refused():
    a = {"eval": {"suite": {"num_fewshot": 0, "limit": 0}}, "lm_eval": "0.4.13"}
    check_comparable("mmlu", a, a)
    b = {"eval": {"suite": {"num_fewshot": 5, "limit": 0}}, "lm_eval": "0.4.13"}
    with pytest.raises(TunebuildError, match=r"suite mmlu: .* different eval configs.*eval\.suite\.num_fewshot: 0 → 5"):
        check_comparable("mmlu", a, b)


def test_categories_must_cover_every_subject(tmp_path):
    f = tmp_path / "cats.json"
    f.write_text('{"a": "STEM", "b": ["Humanities", "Hard"]}')
    assert read_categories(str(f), ["a", "b"]) == {"a": ["STEM"], "b": ["Humanities", "Hard"]}
    with pytest.raises(TunebuildError, match=r"cats.json: no category for subject\(s\) c"):
        read_categories(str(f), ["a", "c"])
