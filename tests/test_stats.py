"""Statistics: hand values, scipy cross-checks, exact enumeration and Monte-Carlo calibration."""

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


def _welch_f_by_hand(groups: list[np.ndarray]) -> float:
    """Welch (1951) heteroscedastic F written out group by group."""
    k = len(groups)
    n = np.array([x.size for x in groups], float)
    m = np.array([x.mean() for x in groups])
    w = n / np.array([x.var(ddof=1) for x in groups])
    mw = (w * m).sum() / w.sum()
    num = (w * (m - mw) ** 2).sum() / (k - 1)
    lam = sum((1 - wi / w.sum()) ** 2 / (ni - 1) for wi, ni in zip(w, n))
    return num / (1 + 2 * (k - 2) / (k * k - 1) * lam)


def test_studentized_statistics_match_scipy_and_welch_by_hand():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.8, 0.256, 46), rng.normal(0.75, 0.198, 114)
    codes = np.r_[np.zeros(46, int), np.ones(114, int)]
    r = S.studentized_permutation_tests(np.r_[a, b], codes, n_perm=9999, seed=0)
    ref = st.ttest_ind(a, b, equal_var=False)
    assert r.stat_max[0] == pytest.approx(ref.statistic ** 2)  # Welch F = t^2 for two groups
    assert r.stat_rest[0] == pytest.approx([abs(ref.statistic)] * 2)
    assert r.p_max[0] == r.p_rest[0, 0] == r.p_rest[0, 1]  # one test, three views
    lo, hi = S.mc_interval(r.exceed_max, 9999)
    assert lo[0] <= ref.pvalue <= hi[0]  # the permutation p agrees with Welch's t-test
    groups = [rng.gamma(2.0, s, n) for s, n in ((0.2, 5), (0.3, 9), (0.1, 14), (0.25, 30))]
    codes = np.repeat(np.arange(4), [5, 9, 14, 30])
    r = S.studentized_permutation_tests(np.concatenate(groups), codes, n_perm=99, seed=0)
    assert r.stat_max[0] == pytest.approx(_welch_f_by_hand(groups))
    rest = st.ttest_ind(groups[1], np.concatenate([groups[0], *groups[2:]]), equal_var=False)
    assert r.stat_rest[0, 1] == pytest.approx(abs(rest.statistic))
    with pytest.raises(ValueError, match="two groups of two users"):
        S.studentized_permutation_tests(np.arange(5.0), np.array([0, 0, 0, 0, 1]))


def test_permutation_p_is_exact_in_a_tiny_enumerable_case():
    """3 + 3 users: 20 distinct splits; the Monte-Carlo p converges to the exact share."""
    v = np.array([0.1, 0.5, 0.2, 0.9, 1.4, 1.1])
    codes = np.array([0, 0, 0, 1, 1, 1])
    r = S.studentized_permutation_tests(v, codes, n_perm=20000, seed=4)
    t_obs = r.stat_max[0]
    count = 0
    for idx in itertools.combinations(range(6), 3):
        mask = np.zeros(6, bool)
        mask[list(idx)] = True
        t = st.ttest_ind(v[mask], v[~mask], equal_var=False).statistic ** 2
        count += t >= t_obs - 1e-9
    lo, hi = S.mc_interval(r.exceed_max, 20000, level=0.999)
    assert lo[0] <= count / 20 <= hi[0]
    assert S.permutations(6, 50, 1) is S.permutations(6, 50, 1)  # cached, shared
    p = S.permutations(6, 50, 1)
    assert (np.sort(p, axis=1) == np.arange(6)).all() and not p.flags.writeable


def test_mc_interval_is_clopper_pearson():
    for b, n in ((0, 999), (37, 999), (999, 999), (480, 9999)):
        lo, hi = S.mc_interval(b, n)
        ci = st.binomtest(b, n).proportion_ci(0.95, method="exact")
        assert (float(lo), float(hi)) == pytest.approx((ci.low, ci.high), abs=1e-9)
    # near alpha with the default count the half-width is about 2 x 0.0022
    lo, hi = S.mc_interval(int(0.05 * 9999), 9999)
    assert 0.008 < float(hi - lo) < 0.0095


def test_benjamini_hochberg_known_example():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted .005 .01 .03 .04 (m = 4): 4*.005/1=.02, 4*.01/2=.02, 4*.03/3=.04, 4*.04/4=.04
    assert np.allclose(S.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    out = S.benjamini_hochberg([0.01, np.nan, 0.04])  # NaN ignored: m = 2
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.02, 0.04])
    assert np.all(np.isnan(S.benjamini_hochberg([np.nan])))


def test_bonferroni_t_quantile_and_welch_df():
    assert S.t_quantile(0.95, 10) == pytest.approx(st.t.ppf(0.975, 10))
    assert S.t_quantile(0.95, 10, m=21) == pytest.approx(st.t.ppf(1 - 0.05 / 42, 10))
    a, b = 0.256 ** 2 / 46, 0.198 ** 2 / 114
    want = (a + b) ** 2 / (a ** 2 / 45 + b ** 2 / 113)
    assert S.welch_df(a, 46, b, 114) == pytest.approx(want)


def test_studentized_permutation_calibrated_under_null_with_unequal_spreads():
    """Equal means, small group with the larger spread (the raw-difference test's worst case):
    3 groups, skewed values, batched draws; rejection rate <= 5% within MC error."""
    rng = np.random.default_rng(11)
    sizes, scales = [8, 40, 72], [0.5, 0.25, 0.15]
    V = np.concatenate([rng.gamma(4.0, s, (N_MC, n)) - 4.0 * s for s, n in zip(scales, sizes)],
                       axis=1)
    codes = np.repeat(np.arange(3), sizes)
    r = S.studentized_permutation_tests(V, codes, n_perm=199, seed=5)
    assert (r.p_max <= 0.05).mean() <= 0.05 + MC_TOL
    assert (r.p_rest <= 0.05).mean(axis=0).max() <= 0.05 + MC_TOL


def test_abs_interval():
    assert S.abs_interval(-0.1, 0.3) == (0.0, 0.3)
    assert S.abs_interval(-0.5, -0.2) == (0.2, 0.5)
    assert S.abs_interval(0.1, 0.4) == (0.1, 0.4)
