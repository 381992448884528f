"""Paired statistics against scipy and under a synthetic null; Holm; the length-controlled mean."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from selftrain.stats import holm, length_controlled_means, paired_bootstrap, permutation_p


def test_paired_bootstrap_matches_scipy_on_a_known_effect() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(3.0, 1.0, 200)
    method = base + 0.3 + rng.normal(0, 0.5, 200)  # a true effect of +0.3 on shared items
    mean, lo, hi = paired_bootstrap(method - base, n_boot=4000, seed=1)
    ref = sps.bootstrap((method - base,), np.mean, n_resamples=4000, method="percentile", random_state=1)
    assert mean == pytest.approx(np.mean(method - base))
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.02)
    assert lo > 0.15 and hi < 0.45  # the interval holds the effect and excludes zero
    assert permutation_p(method - base, n_perm=2000) < 0.001


def test_permutation_p_is_about_uniform_under_the_null() -> None:
    """Under a synthetic null (method = baseline + symmetric noise), p < 0.05 in about 5% of 400 datasets:
    tolerance 2-9% (binomial sd about 1.1%); a KS test against uniform does not reject at 1%."""
    rng = np.random.default_rng(11)
    ps = np.array([permutation_p(rng.normal(0, 1, 30), n_perm=999, seed=i) for i in range(400)])
    assert 0.02 <= (ps < 0.05).mean() <= 0.09
    assert sps.kstest(ps, "uniform").pvalue > 0.01


def test_holm_matches_its_definition() -> None:
    got = holm([0.01, 0.04, 0.03, float("nan")])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(got[3])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_length_controlled_means_remove_a_pure_length_effect() -> None:
    rng = np.random.default_rng(5)
    lengths = np.r_[rng.uniform(100, 200, 50), rng.uniform(300, 400, 50)]
    groups = np.array(["short"] * 50 + ["long"] * 50)
    scores = 1.0 + 0.005 * lengths  # the score is length alone
    raw = {g: scores[groups == g].mean() for g in ("short", "long")}
    adj = length_controlled_means(scores, lengths, groups)
    assert raw["long"] - raw["short"] > 0.9
    assert adj["long"] == pytest.approx(adj["short"], abs=1e-9)
