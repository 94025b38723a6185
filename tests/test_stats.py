"""Statistics: hand values, scipy cross-checks and Monte-Carlo calibration of the tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from audit import stats as S

N_MC = 300  # Monte-Carlo draws for calibration checks
MC_TOL = 2 * math.sqrt(0.05 * 0.95 / N_MC)


def test_holm_known_example():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted .005 .01 .03 .04 -> 4*.005=.02, 3*.01=.03, 2*.03=.06, max(.06, 1*.04)=.06
    assert np.allclose(S.holm(p), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(S.holm([0.5, 0.4]), [0.8, 0.8])  # 2*.4=.8, max(.8, .5)=.8
    assert np.allclose(S.holm([0.9, 0.6]), [1.0, 1.0])  # capped at 1
    out = S.holm([0.01, np.nan, 0.02])  # NaN ignored: m = 2
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.02, 0.02])


def test_t_interval_matches_scipy_and_n1_is_nan():
    x = np.array([0.71, 0.74, 0.69, 0.77, 0.72])
    out = S.t_interval(x)
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    assert out["mean"] == pytest.approx(x.mean())
    assert out["std"] == pytest.approx(x.std(ddof=1))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((lo, hi))
    one = S.t_interval([0.7])
    assert one["mean"] == 0.7 and np.isnan(one["ci_low"]) and np.isnan(one["std"])
    assert "n=1" in one["note"]


def test_paired_comparison_vs_scipy_and_exact_sign_flip():
    rng = np.random.default_rng(4)
    a = rng.normal(0.8, 0.2, 9)
    b = a - rng.normal(0.1, 0.1, 9)
    out = S.paired_comparison(a, b, n_perm=20000, seed=1)
    ref = st.ttest_rel(a, b)
    d = a - b
    assert out["mean_diff"] == pytest.approx(d.mean())
    assert out["p_ttest"] == pytest.approx(ref.pvalue)
    assert out["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
    lo, hi = st.t.interval(0.95, 8, loc=d.mean(), scale=st.sem(d))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((lo, hi))
    # exact sign-flip distribution over all 2^9 patterns
    t = [abs(np.dot(s, d)) / 9 for s in itertools.product([-1, 1], repeat=9)]
    exact = np.mean(np.asarray(t) >= abs(d.mean()) - 1e-12)
    assert out["p_perm"] == pytest.approx(exact, abs=0.01)
    assert S.paired_comparison(a, b, seed=3) == S.paired_comparison(a, b, seed=3)


def test_seed_variance_share_decomposition():
    users = np.arange(6, dtype=float)[:, None]
    seeds = np.array([0.0, 1.0, -1.0])[None, :]
    assert S.seed_variance_share(users + 0 * seeds)["between_user_share"] == pytest.approx(1)
    assert S.seed_variance_share(0 * users + seeds)["between_seed_share"] == pytest.approx(1)
    rng = np.random.default_rng(0)
    x = users + 0.5 * seeds + rng.normal(0, 0.3, (6, 3))
    out = S.seed_variance_share(x)
    m = x.mean()
    ss_seed = 6 * ((x.mean(0) - m) ** 2).sum() / ((x - m) ** 2).sum()
    assert out["between_seed_share"] == pytest.approx(ss_seed)
    total = out["between_seed_share"] + out["between_user_share"] + out["residual_share"]
    assert total == pytest.approx(1.0)
    assert np.isnan(S.seed_variance_share(x[:, :1])["between_seed_share"])  # one seed


def test_stratified_bootstrap_keeps_groups_and_is_seeded():
    v = np.r_[np.full(5, 1.0), np.full(50, 3.0)]
    g = ["small"] * 5 + ["big"] * 50
    labels, means, counts = S.stratified_bootstrap_group_means(v, g, n_boot=200, seed=7)
    assert labels == ["big", "small"] and list(counts) == [50, 5]
    # constant within groups: every replicate reproduces the group means exactly
    assert np.all(means[:, 0] == 3.0) and np.all(means[:, 1] == 1.0)
    rng = np.random.default_rng(1)
    w = rng.normal(size=55)
    a = S.stratified_bootstrap_group_means(w, g, n_boot=50, seed=3)[1]
    b = S.stratified_bootstrap_group_means(w, g, n_boot=50, seed=3)[1]
    assert np.array_equal(a, b)


def test_permutation_gap_matches_explicit_statistic():
    rng = np.random.default_rng(2)
    v = rng.normal(size=60)
    g = np.repeat(["a", "b", "c"], 20)
    t, p = S.permutation_test_gap(v, g, n_perm=999, seed=0)
    means = [v[g == x].mean() for x in "abc"]
    assert t == pytest.approx(max(means) - min(means))
    assert 1 / 1000 <= p <= 1.0
    # an enormous planted gap gives the smallest attainable p
    v2 = v + np.where(g == "a", 10.0, 0.0)
    assert S.permutation_test_gap(v2, g, n_perm=999, seed=0)[1] == pytest.approx(1 / 1000)


def test_permutation_gap_test_is_calibrated_under_null():
    """No group effect, 3 unequal groups, skewed values: rejection rate <= 5% within MC error."""
    rng = np.random.default_rng(11)
    g = np.repeat(["a", "b", "c"], [15, 40, 65])
    rej = 0
    for i in range(N_MC):
        v = rng.exponential(1.0, g.size)
        rej += S.permutation_test_gap(v, g, n_perm=199, seed=i)[1] <= 0.05
    assert rej / N_MC <= 0.05 + MC_TOL


def test_two_group_permutation_calibrated_under_null():
    rng = np.random.default_rng(12)
    rej = 0
    for i in range(N_MC):
        a, b = rng.normal(size=12), rng.normal(size=150)  # UGF-like unbalanced split
        rej += S.permutation_test_two_groups(a, b, n_perm=199, seed=i)[1] <= 0.05
    assert rej / N_MC <= 0.05 + MC_TOL


def test_planted_difference_covered_and_detected():
    """Planted difference 0.8 sd between groups of 60: the bootstrap interval of the two-group
    difference covers it in ~95% of draws and the permutation test detects it (high power)."""
    rng = np.random.default_rng(13)
    delta, cover, detect = 0.8, 0, 0
    for i in range(N_MC):
        a = rng.normal(delta, 1.0, 60)
        b = rng.normal(0.0, 1.0, 60)
        _, lo, hi = S.bootstrap_group_difference_ci(a, b, n_boot=400, seed=i)
        cover += lo <= delta <= hi
        detect += S.permutation_test_two_groups(a, b, n_perm=199, seed=i)[1] <= 0.05
    # the percentile interval runs slightly narrow for n=60; allow 3 MC standard errors
    assert cover / N_MC >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / N_MC)
    assert detect / N_MC >= 0.9


def test_percentile_bootstrap_of_max_min_leans_away_from_zero_under_null():
    """With equal groups the bootstrap interval of max - min almost never contains 0 (every
    replicate is >= 0 and noisy), so 'interval excludes 0' is no test; the permutation test keeps
    its level on the same data."""
    rng = np.random.default_rng(14)
    g = np.repeat(["a", "b", "c", "d"], 30)
    excl, rej, shift = 0, 0, []
    for i in range(100):
        v = rng.normal(size=g.size)
        labels, bm, _ = S.stratified_bootstrap_group_means(v, g, n_boot=300, seed=i)
        diff = bm.max(1) - bm.min(1)
        lo, _ = S.percentile_interval(diff)
        excl += lo > 0
        obs = S.permutation_test_gap(v, g, n_perm=199, seed=i)
        shift.append(diff.mean() - obs[0])
        rej += obs[1] <= 0.05
    assert excl / 100 >= 0.8
    assert np.mean(shift) > 0  # replicates sit above the observed gap on average
    assert rej / 100 <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 100)


def test_abs_interval():
    assert S.abs_interval(-0.1, 0.3) == (0.0, 0.3)
    assert S.abs_interval(-0.5, -0.2) == (0.2, 0.5)
    assert S.abs_interval(0.1, 0.4) == (0.1, 0.4)
