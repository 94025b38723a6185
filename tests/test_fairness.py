"""Fairness and strata: fairlearn cross-checks, hand-worked exposure/UGF/miscalibration, records."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
)
from scipy import stats as st

from audit import fairness as F
from audit import strata as S
from audit.metrics import gini

# ------------------------------------------------------------------------- group comparison


def _users(n=240, seed=0):
    rng = np.random.default_rng(seed)
    g = pd.Series(rng.choice(["a", "b", "c"], n, p=[0.2, 0.3, 0.5]), index=range(n))
    v = pd.Series(rng.gamma(2.0, 0.4, n) + np.where(g == "a", 0.3, 0.0), index=range(n))
    return v, g


def test_group_comparison_matches_fairlearn_and_hand_gaps():
    v, g = _users()
    gc = F.group_comparison(v, g, n_perm=999, seed=1)
    mf = MetricFrame(metrics=lambda yt, yp: float(np.mean(yt)), y_true=v, y_pred=v,
                     sensitive_features=g)
    tab = gc.table.set_index("group")
    assert np.allclose(tab["value"], mf.by_group.loc[tab.index].astype(float))
    assert np.allclose(tab["value"], v.groupby(g).mean().loc[tab.index])
    assert gc.difference == pytest.approx(mf.difference(method="between_groups"))
    assert gc.ratio == pytest.approx(mf.ratio(method="between_groups"))
    for grp in tab.index:
        x, rest = v[g == grp], v[g != grp]
        assert tab.loc[grp, "gap"] == pytest.approx(x.mean() - rest.mean())
        assert tab.loc[grp, "n"] == (g == grp).sum()
        lo, hi = st.t.interval(0.95, x.size - 1, loc=x.mean(), scale=st.sem(x))
        assert (tab.loc[grp, "ci_low"], tab.loc[grp, "ci_high"]) == pytest.approx((lo, hi))
        # gap to rest: Welch interval, Bonferroni over the 3 groups
        a, b = x.var(ddof=1) / x.size, rest.var(ddof=1) / rest.size
        df = (a + b) ** 2 / (a * a / (x.size - 1) + b * b / (rest.size - 1))
        half = st.t.ppf(1 - 0.05 / 6, df) * math.sqrt(a + b)
        assert tab.loc[grp, "gap_ci_high"] - tab.loc[grp, "gap"] == pytest.approx(half)
    assert gc.max_group == "a" and gc.p_value < 0.05 and gc.test["n_permutations"] == 999
    assert gc.test["test"] == F.PERMUTED_WELCH_F
    # the max - min pair's interval is simultaneous over the 3 pairs (Bonferroni 0.05 / 3)
    x, y = v[g == gc.max_group], v[g == gc.min_group]
    a, b = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    df = (a + b) ** 2 / (a * a / (x.size - 1) + b * b / (y.size - 1))
    half = st.t.ppf(1 - 0.05 / 6, df) * math.sqrt(a + b)
    assert (gc.diff_ci_low, gc.diff_ci_high) == pytest.approx((gc.difference - half,
                                                               gc.difference + half))


def test_groups_are_sized_within_the_scored_population():
    """A group of 30 users overall with 3 in the scored population folds into "other"; "other"
    still under the minimum stays in the table, marked insufficient, and is left out of the gap,
    the pairwise test and the gap-to-rest tests."""
    rng = np.random.default_rng(3)
    g = pd.Series(["x"] * 40 + ["y"] * 40 + ["z"] * 3 + ["w"] * 2, index=range(85))
    v = pd.Series(rng.normal(0.8, 0.2, 85) + np.where(g == "z", 5.0, 0.0), index=range(85))
    gc = F.group_comparison(v, g, n_perm=199, seed=0, min_size=10)
    tab = gc.table.set_index("group")
    assert list(tab.index) == ["other", "x", "y"] and gc.merged == ["w", "z"]
    assert tab.loc["other", "n"] == 5 and bool(tab.loc["other", "insufficient"])
    assert bool(tab.loc["other", "merged"])
    assert gc.n_groups == 2 and gc.n == 80 and not gc.insufficient
    assert {gc.max_group, gc.min_group} == {"x", "y"}  # the +5 outliers drive nothing
    assert gc.difference == pytest.approx(abs(v[g == "x"].mean() - v[g == "y"].mean()))
    assert np.isnan(tab.loc["other", "gap"]) and gc.rest_tests[0]["p_value"] is None
    # two groups: the omnibus statistic is |Welch t| and equals scipy's
    ref = st.ttest_ind(v[g == "x"], v[g == "y"], equal_var=False)
    assert gc.test["statistic"] == pytest.approx(abs(ref.statistic))
    # a population with one sufficient group has no gap and no test
    one = F.group_comparison(v[g != "y"], g[g != "y"], n_perm=99, seed=0, min_size=10)
    assert one.insufficient and one.p_value != one.p_value and one.test["p_value"] is None


def test_rmse_is_the_root_of_the_group_mean_squared_error():
    rng = np.random.default_rng(4)
    mse = pd.Series(rng.gamma(3.0, 0.3, 60), index=range(60))
    g = pd.Series(np.repeat(["a", "b"], 30), index=range(60))
    gc = F.group_comparison(mse, g, n_perm=99, seed=0, root=True)
    tab = gc.table.set_index("group")
    for grp in "ab":
        x = mse[g == grp]
        assert tab.loc[grp, "value"] == pytest.approx(math.sqrt(x.mean()))
        lo, hi = st.t.interval(0.95, 29, loc=x.mean(), scale=st.sem(x))
        assert (tab.loc[grp, "ci_low"], tab.loc[grp, "ci_high"]) == pytest.approx(
            (math.sqrt(lo), math.sqrt(hi)))
    assert gc.overall == pytest.approx(math.sqrt(mse.mean()))
    # the test is on the mean squared error: same p as testing mse without the root
    plain = F.group_comparison(mse, g, n_perm=99, seed=0)
    assert gc.p_value == plain.p_value


# ----------------------------------------------------------------------------------- UGF


def test_ugf_top_five_percent_by_interactions():
    n = 40
    v = pd.Series(np.arange(n, dtype=float) / 10, index=range(n))
    counts = pd.Series(np.arange(n) * 3, index=range(n))  # users 38, 39 are the top 5%
    out = F.ugf(v, counts, n_perm=199, seed=0)
    assert out["n_advantaged"] == 2 and out["n_disadvantaged"] == 38
    adv, dis = v.iloc[38:].mean(), v.iloc[:38].mean()
    assert out["advantaged"] == pytest.approx(adv)
    assert out["ugf"] == pytest.approx(abs(adv - dis))
    assert out["ci_low"] <= out["ugf"] <= out["ci_high"]
    assert 0 < out["p_value"] <= 1 and not out["insufficient"]
    assert out["p_mc_low"] <= out["p_value"] <= out["p_mc_high"]
    small = F.ugf(v, counts, n_perm=199, seed=0, min_size=5)  # 2 advantaged users < 5
    assert small["insufficient"] and small["p_value"] is None and small["ugf"] is None


# -------------------------------------------------------------------------------- parity


def _parity_pred(seed=0, n_users=120, bias=0.0):
    rng = np.random.default_rng(seed)
    g = pd.Series(rng.choice(["F", "M"], n_users), index=range(n_users))
    rows = []
    for u in range(n_users):
        yt = rng.integers(1, 6, 10).astype(float)
        yp = yt + rng.normal(0, 1, 10) + (bias if g[u] == "F" else 0.0)
        rows += [(u, i, "s", a, b) for i, (a, b) in enumerate(zip(yt, yp))]
    pred = pd.DataFrame(rows, columns=["user_id", "item_id", "scenario", "y_true", "y_pred"])
    return pred, g


def test_parity_values_match_fairlearn_and_vectorised_statistic():
    pred, g = _parity_pred(bias=0.8)
    out = F.parity(pred, g, threshold=4.0, n_perm=299, seed=0)
    yt = (pred.y_true >= 4).astype(int)
    yp = (pred.y_pred >= 4).astype(int)
    sf = pred.user_id.map(g)
    assert out["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(yt, yp, sensitive_features=sf))
    assert out["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(yt, yp, sensitive_features=sf))
    assert out["p_dp"] < 0.05  # a 0.8-star upward shift for F is detected
    # the statistic the permutation test uses equals fairlearn's on the observed labels
    per = pd.DataFrame({"g": sf, "n": 1, "pp": yp, "pos": yt, "tp": yt * yp, "neg": 1 - yt,
                        "fp": (1 - yt) * yp}).groupby("g").sum()
    dp_v, eo_v = F._parity_stats(per[["n", "pp", "pos", "tp", "neg", "fp"]].to_numpy(float))
    assert dp_v == pytest.approx(out["demographic_parity_difference"])
    assert eo_v == pytest.approx(out["equalized_odds_difference"])
    _, g0 = _parity_pred(seed=1)
    pred0, _ = _parity_pred(seed=1)
    out0 = F.parity(pred0, g0, n_perm=299, seed=0)
    assert out0["p_dp"] > 0.0 and out0["p_eo"] <= 1.0


# ------------------------------------------------------------------------------- exposure


def test_exposure_hand_worked():
    pop = pd.Series({"a": 50, "b": 30, "c": 10, "d": 10})  # short head {a, b}
    rk = pd.DataFrame({"user_id": [1, 1, 2, 2], "scenario": "s", "rank": [1, 2, 1, 2],
                       "item_id": ["a", "c", "c", "b"], "score": 0.0})
    out = F.exposure(rk, pop, k=10)
    e2 = 1 / math.log2(3)
    total = 2 + 2 * e2
    assert out["short_head_share"] == pytest.approx((1 + e2) / total)
    assert out["long_tail_share"] == pytest.approx((1 + e2) / total)
    assert out["exposure_gini"] == pytest.approx(gini([1.0, e2, 1 + e2, 0.0]))


# -------------------------------------------------------------------------- miscalibration


def test_miscalibration_kl_hand_worked():
    genres = pd.Series({1: "Action", 2: "Action|Comedy", 3: "Drama", 4: "Comedy"})
    support = pd.DataFrame({"user_id": [7, 7], "item_id": [1, 2], "rating": [5.0, 4.0]})
    rk = pd.DataFrame({"user_id": [7, 7], "scenario": "s", "rank": [1, 2],
                       "item_id": [3, 4], "score": 0.0})
    mc = F.miscalibration_per_user(support, rk, genres, alpha=0.01)
    p = {"Action": 0.75, "Comedy": 0.25}  # (1 + 1/2)/2, (1/2)/2
    q = {"Action": 0.0, "Comedy": 0.5, "Drama": 0.5}
    want = sum(pg * math.log(pg / (0.99 * q[g] + 0.01 * pg)) for g, pg in p.items())
    assert mc.loc[7] == pytest.approx(want)
    # a list with the user's own mix is perfectly calibrated
    rk2 = rk.assign(item_id=[1, 2])
    assert F.miscalibration_per_user(support, rk2, genres).loc[7] == pytest.approx(0.0)


# -------------------------------------------------------------------------------- records


def _record_inputs():
    rng = np.random.default_rng(5)
    n = 150
    users = pd.DataFrame({"user_id": range(n), "gender": rng.choice(["F", "M"], n),
                          "age": rng.integers(15, 70, n),
                          "occupation": rng.choice(["a", "b", "rare"], n, p=[.5, .45, .05]),
                          "zip": "55"})
    counts = pd.Series(rng.integers(20, 400, n), index=range(n))
    st = S.derive_strata(users, ["gender", "occupation", "activity"], counts=counts, min_size=15)
    pred, _ = _parity_pred(seed=2, n_users=n)
    per_user = pd.concat([
        pd.DataFrame({"user_id": range(n), "scenario": "s", "metric": "mae",
                      "value": rng.gamma(2, .4, n)}),
        pd.DataFrame({"user_id": range(n), "scenario": "s", "metric": "ndcg@3",
                      "value": rng.uniform(.5, 1, n)}),
    ])
    items = pd.DataFrame({"item_id": range(30), "popularity": rng.integers(0, 100, 30),
                          "genres": rng.choice(["Action", "Drama|Comedy", "Horror"], 30)})
    rk = pd.DataFrame([(u, "s", r + 1, int(i), 0.0) for u in range(n)
                       for r, i in enumerate(rng.choice(30, 10, replace=False))],
                      columns=["user_id", "scenario", "rank", "item_id", "score"])
    support = pd.DataFrame({"user_id": np.repeat(range(n), 4),
                            "item_id": rng.integers(0, 30, 4 * n), "rating": 4.0})
    return dict(per_user=per_user, users_strata=st, pred=pred, rankings=rk, items=items,
                support=support, interaction_counts=counts)


TESTS = {"p_value", "p_mc_low", "p_mc_high", "p_adjusted", "p_adjusted_mc_low",
         "p_adjusted_mc_high", "adjustment", "family", "significant", "statistic",
         "n_permutations", "insufficient", "seeds"}
REQUIRED = {
    "group_metric": {"model", "scenario", "attribute", "group", "metric", "value", "ci_low",
                     "ci_high", "interval", "n", "merged", "insufficient", "seeds"},
    "gap": TESTS | {"model", "scenario", "attribute", "metric", "difference", "diff_ci_low",
                    "diff_ci_high", "interval", "ratio", "max_group", "min_group", "n_groups",
                    "n"},
    "gap_to_rest": TESTS | {"model", "scenario", "attribute", "metric", "group", "gap",
                            "ci_low", "ci_high", "n"},
    "ugf": TESTS | {"model", "scenario", "metric", "advantaged", "disadvantaged", "ugf",
                    "ci_low", "ci_high"},
    "parity": TESTS | {"model", "scenario", "attribute", "metric", "value"},
    "exposure": {"model", "scenario", "short_head_share", "long_tail_share", "exposure_gini", "seeds"},
    "miscalibration": {"model", "scenario", "attribute", "group", "value", "n", "insufficient",
                       "seeds"},
}


def test_fairness_records_follow_design_and_are_deterministic():
    inp = _record_inputs()
    inp["per_user"] = pd.concat([inp["per_user"].assign(seed=s) for s in (0, 1)])
    recs = F.fairness_records("melu", "s", n_perm=199, seed=3, min_group_size=15, **inp)
    kinds = {r["kind"] for r in recs}
    assert kinds == set(REQUIRED)
    for r in recs:
        assert REQUIRED[r["kind"]] <= set(r), (r["kind"], REQUIRED[r["kind"]] - set(r))
        assert r["model"] == "melu" and r["scenario"] == "s"
    assert {tuple(r["seeds"]) for r in recs if r["kind"] in ("group_metric", "gap")} == {(0, 1)}
    json.dumps(recs, allow_nan=False)  # valid JSON: non-finite numbers are None
    occ = [r for r in recs if r["kind"] == "group_metric" and r["attribute"] == "occupation"
           and r["metric"] == "mae"]
    assert {r["group"]: r["merged"] for r in occ} == {"a": False, "b": False, "other": True}
    assert {r["group"]: r["insufficient"] for r in occ}["other"] is True
    assert sum(r["n"] for r in occ) == 150
    gap = next(r for r in recs if r["kind"] == "gap" and r["attribute"] == "gender"
               and r["metric"] == "mae")
    assert gap["difference"] == pytest.approx(
        max(r["value"] for r in recs if r["kind"] == "group_metric" and
            r["attribute"] == "gender" and r["metric"] == "mae")
        - min(r["value"] for r in recs if r["kind"] == "group_metric" and
              r["attribute"] == "gender" and r["metric"] == "mae"))
    # one BH family over every sufficient test of this model and scenario
    tests = [r for r in recs if r.get("p_value") is not None]
    assert tests and all(r["family"] == "melu/s" and r["adjustment"] == "BH" for r in tests)
    want = st.false_discovery_control([r["p_value"] for r in tests], method="bh")
    assert [r["p_adjusted"] for r in tests] == pytest.approx(list(want))
    for r in tests:
        assert r["p_mc_low"] <= r["p_value"] <= r["p_mc_high"]
        assert r["p_adjusted_mc_low"] <= r["p_adjusted"] <= r["p_adjusted_mc_high"]
        assert r["significant"] == (r["p_adjusted"] < 0.05)
    # insufficient groups carry no test and stay out of the family
    bad = [r for r in recs if r["kind"] == "gap_to_rest" and r["insufficient"]]
    assert bad and all(r["p_value"] is None and r["p_adjusted"] is None for r in bad)
    again = F.fairness_records("melu", "s", n_perm=199, seed=3, min_group_size=15, **inp)
    assert json.dumps(recs) == json.dumps(again)
    assert F.fairness_records("melu", "other", **{**inp, "pred": None}) == []  # no users: no records
    with pytest.raises(ValueError, match="attribute"):
        F.fairness_records("melu", "s", inp["per_user"], inp["users_strata"], ["race"])


def test_parity_permutation_calibrated_under_null():
    """No group effect (labels independent of ratings and errors): the user-level permutation
    p-values of DP and EO reject at <= 5% within Monte-Carlo error."""
    rng = np.random.default_rng(21)
    n_mc, n_users, n_q = 200, 60, 10
    tol = 2 * math.sqrt(0.05 * 0.95 / n_mc)
    uid = np.repeat(np.arange(n_users), n_q)
    rej_dp = rej_eo = 0
    for i in range(n_mc):
        user_bias = np.repeat(rng.normal(0, 0.7, n_users), n_q)  # within-user correlation
        yt = rng.integers(1, 6, uid.size).astype(float)
        yp = yt + user_bias + rng.normal(0, 1, uid.size)
        pred = pd.DataFrame({"user_id": uid, "item_id": 0, "scenario": "s", "y_true": yt,
                             "y_pred": yp})
        g = pd.Series(rng.choice(["F", "M"], n_users, p=[0.3, 0.7]), index=range(n_users))
        out = F.parity(pred, g, n_perm=99, seed=i)
        rej_dp += out["p_dp"] <= 0.05
        rej_eo += out["p_eo"] <= 0.05
    assert rej_dp / n_mc <= 0.05 + tol
    assert rej_eo / n_mc <= 0.05 + tol


# ------------------------------------------------------------------------- key findings


def _finding_doc(significant: bool) -> dict:
    base = {"model": "melu", "scenario": "user_cold", "metric": "mae", "family": "melu/user_cold",
            "adjustment": "BH"}
    tiny = {**base, "kind": "gap", "attribute": "occupation", "difference": 0.92, "insufficient": True,
            "p_value": None, "p_adjusted": None, "significant": None, "max_group": "lawyer",
            "min_group": "scientist"}
    real = {**base, "kind": "gap", "attribute": "gender", "difference": 0.11, "diff_ci_low": 0.03,
            "diff_ci_high": 0.19, "interval": F.PAIR_INTERVAL, "p_value": 0.0004,
            "p_adjusted": 0.004 if significant else 0.2, "significant": significant,
            "insufficient": False, "max_group": "F", "min_group": "M"}
    rest = {**base, "kind": "gap_to_rest", "attribute": "age", "group": "25-34", "gap": 0.01,
            "p_value": 0.5, "p_adjusted": 0.8, "significant": False, "insufficient": False}
    return {"fairness": {"min_group_size": 10, "alpha": 0.05, "records": [tiny, real, rest]}}


def test_key_finding_quotes_only_adjusted_results_on_sufficient_groups():
    from audit.report import _fairness, _fairness_finding

    focus = {"model": "melu", "scenario": "user_cold", "metric": "mae", "scenarios": ["user_cold"], "models": ["melu"]}
    fa = _fairness(_finding_doc(True), focus)
    assert [g["attribute"] for g in fa["gaps"] if g["survives"]] == ["gender"]  # the 2-vs-1-user gap is not quoted
    assert [g["attribute"] for g in fa["gaps_insufficient"]] == ["occupation"]
    text = _fairness_finding(fa, "melu", "mae")
    assert text.startswith("1 of 2 fairness tests for melu survive Benjamini-Hochberg adjustment")
    assert "F vs M differ by 0.11" in text and F.PAIR_INTERVAL in text and "0.03 to 0.19" in text
    assert "BH-adjusted 0.004" in text and "lawyer" not in text
    none = _fairness_finding(_fairness(_finding_doc(False), focus), "melu", "mae")
    assert none == ("No fairness difference for melu survives Benjamini-Hochberg adjustment: 0 of 2 "
                    "tests in 1 family (one per scenario) at alpha 0.05; groups under 10 users "
                    "are shown but not tested.")
