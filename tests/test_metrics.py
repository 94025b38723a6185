"""Metrics against independent computations (sklearn) and hand-worked examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    mean_absolute_error,
    mean_squared_error,
    ndcg_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from audit import metrics as M


def _pred(seed: int = 0, n_users: int = 30, n_q: int = 10, scenario: str = "warm") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(500, n_q, replace=False)
        yt = rng.integers(1, 6, n_q).astype(float)
        yp = yt + rng.normal(0, 1.0, n_q)  # continuous: no ties
        rows += [(u, int(i), scenario, a, b) for i, a, b in zip(items, yt, yp)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "scenario", "y_true", "y_pred"])


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    return long.pivot_table(index="user_id", columns="metric", values="value", dropna=False)


def test_mae_rmse_match_sklearn_and_pooled_rmse_rebuilds():
    pred = _pred()
    w = _wide(M.per_user_accuracy(pred))
    for u, g in pred.groupby("user_id"):
        assert w.loc[u, "mae"] == pytest.approx(mean_absolute_error(g.y_true, g.y_pred))
        assert w.loc[u, "mse"] == pytest.approx(mean_squared_error(g.y_true, g.y_pred))
        assert w.loc[u, "rmse"] == pytest.approx(math.sqrt(mean_squared_error(g.y_true, g.y_pred)))
    pooled = M.pooled_metrics(pred).set_index("metric")["value"]
    rebuilt = math.sqrt((w["mse"] * w["n_query"]).sum() / w["n_query"].sum())
    assert pooled["rmse"] == pytest.approx(rebuilt)
    assert pooled["rmse"] == pytest.approx(math.sqrt(mean_squared_error(pred.y_true, pred.y_pred)))
    assert pooled["mae"] == pytest.approx(mean_absolute_error(pred.y_true, pred.y_pred))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_query_ndcg_matches_sklearn_with_exponential_gain(k):
    pred = _pred(seed=1)
    w = _wide(M.per_user_query_ndcg(pred, ks=[k]))
    for u, g in pred.groupby("user_id"):
        gains = (2.0 ** g.y_true.to_numpy()) - 1.0  # sklearn uses linear gain: pass 2^r - 1
        ref = ndcg_score([gains], [g.y_pred.to_numpy()], k=k)
        assert w.loc[u, f"ndcg@{k}"] == pytest.approx(ref)


def _dcg_of_order(gains, k):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))


def _random_order_ndcg(y_true, y_pred, k):
    """Independent reference: average nDCG over every order of the items that respects the scores
    (all permutations of the tied items), by brute-force enumeration."""
    gains = [2.0 ** r - 1.0 for r in y_true]
    idcg = _dcg_of_order(sorted(gains, reverse=True), k)
    vals = [_dcg_of_order([gains[i] for i in perm], k) / idcg
            for perm in itertools.permutations(range(len(gains)))
            if all(y_pred[a] >= y_pred[b] for a, b in zip(perm, perm[1:]))]
    return sum(vals) / len(vals)


def test_query_ndcg_ties_are_averaged_over_random_order_and_single_item_nan():
    pred = pd.DataFrame({
        "user_id": [1, 1, 1, 2], "item_id": [30, 10, 20, 5], "scenario": "s",
        "y_true": [5.0, 1.0, 3.0, 4.0], "y_pred": [2.0, 4.0, 4.0, 3.0],
    })
    w = _wide(M.per_user_query_ndcg(pred, ks=[1, 3]))
    # user 1: items 10 and 20 tie at the top (gains 1 and 7), then 30 (gain 31). nDCG@1 is the mean
    # of the two possible first gains; by item id it would have been 1/31.
    idcg3 = 31 / math.log2(2) + 7 / math.log2(3) + 1 / math.log2(4)
    assert w.loc[1, "ndcg@1"] == pytest.approx(4 / 31)
    assert w.loc[1, "ndcg@3"] == pytest.approx((4 / math.log2(2) + 4 / math.log2(3) + 31 / math.log2(4)) / idcg3)
    assert np.isnan(w.loc[2, "ndcg@1"])  # one query item cannot be mis-ranked


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 2)), min_size=2, max_size=6), st.integers(1, 6))
def test_query_ndcg_equals_brute_force_expectation_over_tie_orders(pairs, k):
    y_true = [float(t) for t, _ in pairs]
    y_pred = [float(p) for _, p in pairs]
    if max(y_true) == 0:
        return
    pred = pd.DataFrame({"user_id": 0, "item_id": np.arange(len(pairs))[::-1], "scenario": "s",
                         "y_true": y_true, "y_pred": y_pred})
    assert M.per_user_query_ndcg(pred, ks=[k]).value.iloc[0] == pytest.approx(_random_order_ndcg(y_true, y_pred, k))


def test_constant_predictor_ndcg_is_its_random_order_expectation_not_the_item_id_order():
    # Ratings fall with item id, as on ML-100K (low ids are rated higher): id order would flatter.
    y_true = [5.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    pred = pd.DataFrame({"user_id": 0, "item_id": np.arange(6), "scenario": "s", "y_true": y_true,
                         "y_pred": 3.5})
    for k in (1, 3, 5):
        got = M.per_user_query_ndcg(pred, ks=[k]).value.iloc[0]
        assert got == pytest.approx(_random_order_ndcg(y_true, [3.5] * 6, k))
        assert got < 1.0 - 1e-6  # the id order (best items first) would have scored 1.0
    # Monte-Carlo check of the expectation with explicit random tie-breaking
    rng = np.random.default_rng(0)
    gains = np.power(2.0, y_true) - 1.0
    idcg = _dcg_of_order(sorted(gains, reverse=True), 3)
    sims = [_dcg_of_order(list(gains[rng.permutation(6)]), 3) / idcg for _ in range(20000)]
    assert M.per_user_query_ndcg(pred, ks=[3]).value.iloc[0] == pytest.approx(np.mean(sims), abs=4 * np.std(sims) / 140)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=12), st.integers(1, 6))
def test_query_ndcg_bounds_and_perfect_order(ratings, k):
    n = len(ratings)
    base = pd.DataFrame({"user_id": 0, "item_id": np.arange(n), "scenario": "s",
                         "y_true": np.asarray(ratings, float)})
    perfect = base.assign(y_pred=base.y_true + np.arange(n) * 1e-6)
    worst = base.assign(y_pred=-base.y_true)
    v_perf = M.per_user_query_ndcg(perfect, ks=[k]).value.iloc[0]
    v_worst = M.per_user_query_ndcg(worst, ks=[k]).value.iloc[0]
    assert v_perf == pytest.approx(1.0)
    assert 0.0 <= v_worst <= 1.0 + 1e-12


def _catalogue_case():
    # user 1: relevant (liked) query items 11, 12, 13; user 2: 21 only; user 3: none liked.
    pred = pd.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2, 3],
        "item_id": [11, 12, 13, 14, 21, 22, 31],
        "scenario": "cold",
        "y_true": [5, 4, 4, 2, 4, 1, 3], "y_pred": [4.5] * 7,
    }).astype({"y_true": float})
    rk = []
    list1 = [11, 90, 13, 91, 92, 93, 94, 95, 96, 97]  # hits at ranks 1, 3
    list2 = [80, 81, 82, 83, 84, 85, 86, 87, 88, 21]  # hit at rank 10
    list3 = list(range(60, 70))
    for u, lst in [(1, list1), (2, list2), (3, list3)]:
        rk += [(u, "cold", r + 1, i, 1.0 - r / 10) for r, i in enumerate(lst)]
    rankings = pd.DataFrame(rk, columns=["user_id", "scenario", "rank", "item_id", "score"])
    nc = pd.Series({1: 200, 2: 200, 3: 200})
    return pred, rankings, nc


def test_catalogue_precision_recall_ndcg_hand_worked():
    pred, rankings, nc = _catalogue_case()
    w = _wide(M.per_user_catalogue(pred, rankings, nc, threshold=4.0, k=10))
    assert w.loc[1, "precision@10"] == pytest.approx(0.2)
    assert w.loc[1, "recall@10"] == pytest.approx(2 / 3)
    idcg1 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert w.loc[1, "list_ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / idcg1)
    assert w.loc[2, "precision@10"] == pytest.approx(0.1)
    assert w.loc[2, "recall@10"] == pytest.approx(1.0)
    assert w.loc[2, "list_ndcg@10"] == pytest.approx(1 / math.log2(11))
    assert w.loc[3].isna().all()  # no relevant item: undefined, not 0


def test_catalogue_refuses_k_at_or_above_candidates():
    pred, rankings, _ = _catalogue_case()
    nc = pd.Series({1: 200, 2: 10, 3: 200})
    with pytest.raises(ValueError, match=r"k=10 >= number of candidates.*user 2.*trivially perfect"):
        M.per_user_catalogue(pred, rankings, nc, k=10)
    with pytest.raises(ValueError, match="trivially perfect"):
        M.per_user_metrics(pred, rankings, pd.DataFrame(
            {"user_id": [1, 2, 3], "scenario": "cold", "n_candidates": [5, 5, 5]}), 4.0)
    with pytest.raises(ValueError, match="missing"):
        M.per_user_catalogue(pred, rankings, pd.Series({1: 200}), k=10)
    # k below the candidate count is fine
    M.per_user_catalogue(pred, rankings, pd.Series({1: 11, 2: 11, 3: 11}), k=10)


def test_pooled_auc_precision_recall_match_sklearn():
    pred = _pred(seed=3)
    out = M.pooled_metrics(pred, threshold=4.0).set_index("metric")["value"]
    liked = pred.y_true >= 4
    pl = pred.y_pred >= 4
    assert out["auc"] == pytest.approx(roc_auc_score(liked, pred.y_pred))
    assert out["precision"] == pytest.approx(precision_score(liked, pl))
    assert out["recall"] == pytest.approx(recall_score(liked, pl))


def test_gini_hand_values():
    assert M.gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert M.gini([0, 0, 0, 1]) == pytest.approx(0.75)
    assert M.gini([4, 3, 2, 1]) == pytest.approx(0.25)  # (-3*1 - 2 + 3 + 3*4) / (4 * 10)


def _beyond_case():
    pop = pd.Series({"a": 50, "b": 30, "c": 10, "d": 5, "e": 5, "f": 0})
    genres = pd.Series({"a": "Action", "b": "Action|Comedy", "c": "Drama", "d": "Drama",
                        "e": "", "f": "Horror"})
    rankings = pd.DataFrame({
        "user_id": [1, 1, 1, 2, 2], "scenario": "s", "rank": [1, 2, 3, 1, 2],
        "item_id": ["a", "b", "c", "a", "d"], "score": 0.0,
    })
    return pop, genres, rankings


def test_short_head_coverage_aplt_arp_novelty_diversity_hand_worked():
    pop, genres, rankings = _beyond_case()
    assert M.short_head(pop) == {"a", "b"}  # 50 + 30 = 80% of 100 ratings
    assert M.catalogue_coverage(rankings, pop.index, k=3) == pytest.approx(4 / 6)
    w = _wide(M.per_user_beyond(rankings, pop, genres, k=3))
    assert w.loc[1, "aplt"] == pytest.approx(1 / 3)
    assert w.loc[2, "aplt"] == pytest.approx(1 / 2)
    assert w.loc[1, "arp"] == pytest.approx(30.0)
    share = lambda c: (c + 1) / (100 + 6)  # noqa: E731  add-one smoothed share
    nov1 = np.mean([-math.log2(share(50)), -math.log2(share(30)), -math.log2(share(10))])
    assert w.loc[1, "novelty"] == pytest.approx(nov1)
    # {Action}, {Action, Comedy}, {Drama}: distances 1/2, 1, 1
    assert w.loc[1, "diversity"] == pytest.approx(2.5 / 3)
    assert w.loc[2, "diversity"] == pytest.approx(1.0)
    out = M.beyond_accuracy(rankings, pop, genres=genres, k=3)
    # recommendation counts over the 6 catalogue items: a2 b1 c1 d1 e0 f0
    assert out["gini"] == pytest.approx(M.gini([2, 1, 1, 1, 0, 0]))
    assert out["aplt"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_per_user_metrics_collects_every_family():
    pred, rankings, nc = _catalogue_case()
    items = pd.DataFrame({"item_id": range(100), "genres": "Drama", "popularity": range(100)})
    out = M.per_user_metrics(pred, rankings, nc, 4.0, items=items)
    assert list(out.columns) == ["user_id", "scenario", "metric", "value"]
    want = {"mae", "mse", "rmse", "ndcg@1", "ndcg@3", "ndcg@5", "precision@10", "recall@10",
            "list_ndcg@10", "arp", "aplt", "novelty", "diversity"}
    assert want <= set(out.metric)
    assert not out.duplicated(["user_id", "scenario", "metric"]).any()
