"""Fairness, counterfactual, pooled and list metrics on a stratified sample of users
(audit.sampling): every estimate is design-weighted, checked against fairlearn, scikit-learn and
plain numpy with the same weights, and a flat design (one stratum, unit weights) changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import roc_auc_score

from audit import fairness as F
from audit import metrics as M
from audit.counterfactual import counterfactual_records
from audit.sampling import domain_contrast, sample_note, stratified_mean


def _design(n: int, seed: int = 0) -> pd.DataFrame:
    """user_id-indexed stratum and weight: three strata sampled at 1 in 1, 1 in 3 and 1 in 8."""
    rng = np.random.default_rng(seed)
    stratum = rng.choice([0, 1, 2], n, p=[0.3, 0.4, 0.3])
    return pd.DataFrame({"stratum": stratum, "weight": np.array([1.0, 3.0, 8.0])[stratum]}, index=range(n))


def test_ugf_under_a_design() -> None:
    rng = np.random.default_rng(1)
    n = 400
    counts = pd.Series(rng.integers(1, 500, n), index=range(n))
    values = pd.Series(rng.gamma(2.0, 0.4, n) + counts.to_numpy() / 1000, index=range(n))
    plain = F.ugf(values, counts, top_frac=0.1, n_perm=199, seed=0, min_size=10)
    flat = F.ugf(values, counts, top_frac=0.1, n_perm=199, seed=0, min_size=10,
                 design=pd.DataFrame({"stratum": 0, "weight": 1.0}, index=range(n)))
    for key in ("advantaged", "disadvantaged", "ugf", "n_advantaged", "p_value"):
        assert flat[key] == pytest.approx(plain[key], rel=1e-12), key

    design = _design(n)
    got = F.ugf(values, counts, top_frac=0.1, n_perm=199, seed=0, min_size=10, design=design)
    order = sorted(range(n), key=lambda u: (-counts[u], u))
    w = design["weight"]
    cum = np.cumsum([w[u] for u in order])
    adv = order[: int(np.argmax(cum >= 0.1 * cum[-1])) + 1]          # the top 10% of the represented users
    dis = [u for u in order if u not in set(adv)]
    assert got["n_advantaged"] == len(adv) and got["n_disadvantaged"] == len(dis)
    a, d = np.average(values[adv], weights=w[adv]), np.average(values[dis], weights=w[dis])
    assert got["advantaged"] == pytest.approx(a, rel=1e-12)
    assert got["disadvantaged"] == pytest.approx(d, rel=1e-12)
    assert got["ugf"] == pytest.approx(abs(a - d), rel=1e-12)
    is_adv = np.isin(np.arange(n), adv)
    _, se, df = domain_contrast(values.to_numpy(), design["stratum"], w, [is_adv, ~is_adv], (1.0, -1.0))
    half = float(__import__("scipy").stats.t.ppf(0.975, df)) * se
    lo, hi = a - d - half, a - d + half
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(
        (0.0, max(-lo, hi)) if lo <= 0 <= hi else (min(abs(lo), abs(hi)), max(abs(lo), abs(hi))))
    assert got["interval"].startswith("|t interval") and "linearised" in got["interval"]
    assert got["p_value"] is not None and not got["insufficient"]
    with pytest.raises(ValueError, match="user 0 has a value but is not in the sample"):
        F.ugf(values, counts, n_perm=19, design=design.drop(index=0))


def _pred(n_users: int = 150, seed: int = 2) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    g = pd.Series(rng.choice(["F", "M"], n_users), index=range(n_users))
    yt = rng.integers(1, 6, (n_users, 8)).astype(float)
    yp = yt + rng.normal(0, 1, yt.shape) + np.where(g.to_numpy() == "F", 0.5, 0.0)[:, None]
    pred = pd.DataFrame({"user_id": np.repeat(np.arange(n_users), 8), "item_id": np.tile(np.arange(8), n_users),
                         "scenario": "s", "y_true": yt.ravel(), "y_pred": yp.ravel()})
    return pred, g


def test_parity_with_design_weights_matches_fairlearn_sample_weight() -> None:
    pred, g = _pred()
    w = _design(150)["weight"]
    got = F.parity(pred, g, threshold=4.0, n_perm=199, seed=0, weights=w)
    yt, yp = (pred.y_true >= 4).astype(int), (pred.y_pred >= 4).astype(int)
    sf, sw = pred.user_id.map(g), pred.user_id.map(w).to_numpy()
    assert got["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(yt, yp, sensitive_features=sf, sample_weight=sw), rel=1e-12)
    assert got["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(yt, yp, sensitive_features=sf, sample_weight=sw), rel=1e-12)
    unweighted = F.parity(pred, g, threshold=4.0, n_perm=199, seed=0)
    assert got["demographic_parity_difference"] != pytest.approx(unweighted["demographic_parity_difference"])
    same = F.parity(pred, g, threshold=4.0, n_perm=199, seed=0, weights=pd.Series(1.0, index=range(150)))
    assert same == unweighted
    with pytest.raises(ValueError, match="user 0 has predictions but no design weight"):
        F.parity(pred, g, n_perm=19, weights=w.drop(index=0))


def test_exposure_with_design_weights_hand_worked() -> None:
    pop = pd.Series({"a": 50, "b": 30, "c": 10, "d": 10})  # short head {a, b}
    rk = pd.DataFrame({"user_id": [1, 1, 2, 2], "scenario": "s", "rank": [1, 2, 1, 2],
                       "item_id": ["a", "c", "c", "b"], "score": 0.0})
    out = F.exposure(rk, pop, k=10, weights=pd.Series({1: 3.0, 2: 1.0}))
    e2 = 1 / math.log2(3)
    per_item = {"a": 3.0, "b": e2, "c": 3 * e2 + 1.0, "d": 0.0}
    total = sum(per_item.values())
    assert out["short_head_share"] == pytest.approx((3.0 + e2) / total)
    assert out["exposure_gini"] == pytest.approx(M.gini(list(per_item.values())))
    with pytest.raises(ValueError, match="user 2 has a list but no design weight"):
        F.exposure(rk, pop, weights=pd.Series({1: 3.0}))


def test_records_under_a_design_weight_miscalibration_and_say_so() -> None:
    rng = np.random.default_rng(5)
    n = 150
    design = _design(n, seed=3)
    users = pd.DataFrame({"user_id": range(n), "gender": np.where(design["stratum"].to_numpy() == 2, "F", "M")})
    items = pd.DataFrame({"item_id": range(30), "popularity": rng.integers(0, 100, 30),
                          "genres": rng.choice(["Action", "Drama|Comedy", "Horror"], 30)})
    rk = pd.DataFrame([(u, "s", r + 1, int(i), 0.0) for u in range(n) for r, i in enumerate(rng.choice(30, 10, False))],
                      columns=["user_id", "scenario", "rank", "item_id", "score"])
    support = pd.DataFrame({"user_id": np.repeat(range(n), 4), "item_id": rng.integers(0, 30, 4 * n), "rating": 4.0})
    per_user = pd.DataFrame({"user_id": range(n), "scenario": "s", "metric": "mae", "value": rng.gamma(2, .4, n)})
    recs = F.fairness_records("m", "s", per_user, users, rankings=rk, items=items, support=support, n_perm=99,
                              min_group_size=10, design=design)
    mc = F._miscalibration(support, rk, items.set_index("item_id")["genres"], 0.01, 10)
    h, w = design["stratum"].reindex(mc.index).to_numpy(), design["weight"].reindex(mc.index).to_numpy()
    ref = stratified_mean(mc.to_numpy(), h, pd.Series(w).groupby(h).sum())
    rec = next(r for r in recs if r["kind"] == "miscalibration" and r["attribute"] == "all")
    assert rec["value"] == pytest.approx(ref["estimate"], rel=1e-12)
    assert (rec["ci_low"], rec["ci_high"]) == pytest.approx((ref["ci_low"], ref["ci_high"]), rel=1e-9)
    assert rec["value"] != pytest.approx(mc.mean())
    exp = next(r for r in recs if r["kind"] == "exposure")
    assert exp["exposure_gini"] == pytest.approx(
        F.exposure(rk, items.set_index("item_id")["popularity"], weights=design["weight"])["exposure_gini"])


def test_counterfactual_records_are_design_weighted() -> None:
    changes = pd.DataFrame({"user_id": [1, 2, 3, 1, 2, 3], "scenario": "s", "attribute": ["age"] * 3 + ["gender"] * 3,
                            "own": ["a", "a", "b", "F", "M", "M"], "mean_abs_delta": [0.1, 0.3, 0.5, 0.2, 0.0, 0.1],
                            "top10_jaccard": [1.0, 0.5, np.nan, 0.9, 1.0, 0.8],
                            "delta_ndcg": 0.0, "substitutes": "x"})
    weights = pd.DataFrame({"scenario": "s", "user_id": [1, 2, 3], "weight": [1.0, 2.0, 5.0]})
    recs = counterfactual_records(changes, ["gender", "age"], model_name="m", weights=weights)
    age_all = next(r for r in recs if r["attribute"] == "age" and r["group"] == "all")
    assert age_all["mean_abs_delta"] == pytest.approx((0.1 + 0.6 + 2.5) / 8)
    assert age_all["top10_jaccard"] == pytest.approx((1.0 + 1.0) / 3)        # user 3's NaN left out
    assert age_all["n"] == 3 and age_all["rank"] == 1                          # age 0.4 > gender 0.1125
    gender_m = next(r for r in recs if r["attribute"] == "gender" and r["group"] == "M")
    assert gender_m["mean_abs_delta"] == pytest.approx(0.5 / 7)
    plain = counterfactual_records(changes, ["gender", "age"], model_name="m")
    assert next(r for r in plain if r["attribute"] == "age" and r["group"] == "all")["mean_abs_delta"] == \
        pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"user 3 \(s\) has counterfactual changes but no design weight"):
        counterfactual_records(changes, ["age"], model_name="m", weights=weights[weights.user_id < 3])


def test_pooled_and_list_metrics_are_design_weighted() -> None:
    pred, _ = _pred(60, seed=7)
    w = _design(60, seed=1)["weight"]
    weights = pd.DataFrame({"scenario": "s", "user_id": w.index, "weight": w.to_numpy()})
    got = M.pooled_metrics(pred, 4.0, weights).set_index("metric")["value"]
    sw = pred.user_id.map(w).to_numpy()
    liked, pl = pred.y_true >= 4, pred.y_pred >= 4
    assert got["auc"] == pytest.approx(roc_auc_score(liked, pred.y_pred, sample_weight=sw), rel=1e-12)
    assert got["precision"] == pytest.approx(sw[liked & pl].sum() / sw[pl].sum(), rel=1e-12)
    assert got["recall"] == pytest.approx(sw[liked & pl].sum() / sw[liked].sum(), rel=1e-12)
    assert got["mae"] == pytest.approx(np.average((pred.y_pred - pred.y_true).abs(), weights=sw), rel=1e-12)
    assert got["n"] == len(pred)
    unit = weights.assign(weight=1.0)
    pd.testing.assert_frame_equal(M.pooled_metrics(pred, 4.0, unit), M.pooled_metrics(pred, 4.0))

    pop = pd.Series({"a": 50, "b": 30, "c": 10, "d": 10})
    rk = pd.DataFrame({"user_id": [1, 1, 2, 2], "scenario": "s", "rank": [1, 2, 1, 2],
                       "item_id": ["a", "c", "c", "b"], "score": 0.0})
    b = M.beyond_accuracy(rk, pop, k=2, weights=pd.Series({1: 3.0, 2: 1.0}))
    assert b["gini"] == pytest.approx(M.gini([3.0, 1.0, 4.0, 0.0]))
    assert b["coverage"] == pytest.approx(0.75)                               # a union: not weighted
    arp = {1: (50 + 10) / 2, 2: (10 + 30) / 2}
    assert b["arp"] == pytest.approx((3 * arp[1] + arp[2]) / 4)


def test_sample_notes_say_what_each_sampled_record_estimates() -> None:
    class _D:
        record = {"scenarios": {"s": {"population": 100, "sampled": 40, "n_strata": 3}}, "rule": {}, "seed": 0}

    notes = {kind: sample_note(_D(), "s", metric, kind.split(":")[0]) for kind, metric in
             (("ugf", "mae"), ("parity", "demographic_parity_difference"), ("exposure", ""),
              ("miscalibration", ""), ("counterfactual", ""), ("accuracy:coverage", "coverage"),
              ("accuracy:auc", "auc"))}
    assert "cumulative design weight" in notes["ugf"]["estimator"] and "linearised" in notes["ugf"]["interval"]
    assert "weighted counts" in notes["parity"]["estimator"]
    assert "design weight" in notes["exposure"]["estimator"]
    assert "stratified" in notes["miscalibration"]["estimator"]
    assert "design-weighted" in notes["counterfactual"]["estimator"]
    assert "lower bound" in notes["accuracy:coverage"]["estimator"]
    assert "design weight" in notes["accuracy:auc"]["estimator"]
    assert not any("without design weights" in n["estimator"] for n in notes.values())


def test_robustness_means_and_demographic_shift_are_design_weighted() -> None:
    from audit.robustness import _summaries, shift_weights

    per_user = pd.DataFrame({"user_id": [1, 2, 3, 4], "scenario": "s", "metric": "mae", "value": [1.0, 2.0, 3.0, 5.0]})
    groups = pd.DataFrame({"user_id": [1, 2, 3, 4], "gender": ["F", "F", "M", "M"]})
    w = pd.Series({1: 1.0, 2: 3.0, 3: 2.0, 4: 2.0})
    got = _summaries(per_user, groups, weights=w)
    assert got[("s", "mae", "all", "all")] == (pytest.approx((1 + 6 + 6 + 10) / 8), 4)
    assert got[("s", "mae", "gender", "F")] == (pytest.approx(7 / 4), 2)
    # a shift to 50/50 F/M: sum_g target_g x (design-weighted mean of g)
    labels = groups.set_index("user_id")["gender"]
    shifted = _summaries(per_user, groups, (labels, {"F": 1, "M": 1}), w)
    assert shifted[("s", "mae", "all", "all")][0] == pytest.approx(0.5 * 7 / 4 + 0.5 * 4.0)
    assert _summaries(per_user, groups) == _summaries(per_user, groups, weights=pd.Series(1.0, index=[1, 2, 3, 4]))
    sw = shift_weights(labels, {"F": 1, "M": 1}, w)
    assert sw.groupby(labels).sum().to_dict() == pytest.approx({"F": 4.0, "M": 4.0})
    with pytest.raises(ValueError, match=r"user 4 \(s\) has a value but no design weight"):
        _summaries(per_user, groups, weights=w.drop(index=4))


def test_shilling_effects_are_design_weighted() -> None:
    from audit.shilling import attack_effect, hit_ratio

    topk = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "rank": [1, 2, 1, 2, 1, 2], "item_id": [9, 5, 4, 5, 9, 6]})
    w = pd.Series({1: 1.0, 2: 4.0, 3: 5.0})
    assert hit_ratio(topk, [9], k=2, weights=w) == pytest.approx(6 / 10)
    assert hit_ratio(topk, [9], k=2) == pytest.approx(2 / 3)
    assert hit_ratio(topk, [9], k=2, weights=w.drop(index=3)) == pytest.approx(1 / 5)   # only sampled users
    clean = pd.DataFrame({"user_id": [1, 2, 3], "item_id": 9, "y_pred": [3.0, 3.0, 3.0]})
    attacked = clean.assign(y_pred=[4.0, 3.5, 3.0])
    eff = attack_effect(clean, attacked, topk, topk, [9], k=2, weights=w)
    assert eff["prediction_shift"] == pytest.approx((1.0 + 4 * 0.5 + 0.0) / 10)
    assert eff["target_pred_attacked"] == pytest.approx((4.0 + 14.0 + 15.0) / 10)
