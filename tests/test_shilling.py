"""Shilling attacks: profile shape and determinism, target choice, and an attack that works on a
model known to be vulnerable (the item-mean predictor, written here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from audit.shilling import (
    STRATEGIES,
    attack_effect,
    attack_records,
    choose_targets,
    empty_ratings,
    hit_ratio,
    make_fake_profiles,
    plan_attack,
    run_attack,
    short_head,
)

N_USERS, N_ITEMS = 400, 150


def synthetic_ratings(seed: int = 0) -> pd.DataFrame:
    """Zipf-popular items with qualities in [2, 3.8]; every user rates 20 items."""
    r = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, N_ITEMS + 1) ** 1.1
    pop /= pop.sum()
    quality = r.uniform(2.0, 3.8, N_ITEMS)
    rows = []
    for u in range(1, N_USERS + 1):
        items = r.choice(N_ITEMS, size=20, replace=False, p=pop)
        ratings = np.clip(np.rint(quality[items] + r.normal(0, 0.8, 20)), 1, 5)
        rows.append(pd.DataFrame({"user_id": u, "item_id": items + 1, "rating": ratings,
                                  "timestamp": r.integers(0, 10**6, 20)}))
    f = pd.concat(rows, ignore_index=True)
    return f.astype({"user_id": np.int64, "item_id": np.int64, "rating": np.float64, "timestamp": np.int64})


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return synthetic_ratings()


class ItemMean:
    """Predicted rating = the item's mean rating in training (fake profiles included): easy to push."""

    def __init__(self, train: pd.DataFrame) -> None:
        self.means = train.groupby("item_id")["rating"].mean()
        self.seen = train.groupby("user_id")["item_id"].agg(set)

    def predict(self, users: np.ndarray, items: np.ndarray) -> pd.DataFrame:
        uu, ii = np.repeat(users, len(items)), np.tile(items, len(users))
        return pd.DataFrame({"user_id": uu, "item_id": ii, "y_pred": self.means.reindex(ii).to_numpy()})

    def top_k(self, users: np.ndarray, k: int = 10) -> pd.DataFrame:
        order = np.lexsort((self.means.index.to_numpy(), -self.means.to_numpy()))
        ranked = self.means.index.to_numpy()[order]
        rows = []
        for u in users:
            rec = [i for i in ranked if i not in self.seen.get(u, set())][:k]
            rows.append(pd.DataFrame({"user_id": u, "rank": np.arange(1, len(rec) + 1), "item_id": rec}))
        return pd.concat(rows, ignore_index=True)


def make_fit_predict(ratings: pd.DataFrame, eval_users: np.ndarray, calls: list[int]):
    items = np.sort(ratings["item_id"].unique())

    def fit_predict(extra: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        calls.append(len(extra))
        model = ItemMean(pd.concat([ratings, extra], ignore_index=True))
        return model.predict(eval_users, items), model.top_k(eval_users)

    return fit_predict


# --------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("strategy", ["random", "average", "bandwagon"])
def test_fake_profiles_shape(ratings: pd.DataFrame, strategy: str) -> None:
    targets = [140, 145]
    fake = make_fake_profiles(ratings, strategy, 7, targets, 12, (1, 5), np.random.default_rng(3))
    assert list(fake.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert fake.dtypes.to_dict() == ratings.dtypes.to_dict()
    assert fake["user_id"].nunique() == 7
    assert fake["user_id"].min() > ratings["user_id"].max()
    assert not set(fake["user_id"]) & set(ratings["user_id"])
    assert (fake["timestamp"] > ratings["timestamp"].max()).all()
    for _, prof in fake.groupby("user_id"):
        assert prof["item_id"].is_unique
        t = prof[prof["item_id"].isin(targets)]
        assert sorted(t["item_id"]) == targets and (t["rating"] == 5).all()
        filler = prof[~prof["item_id"].isin(targets)]
        assert len(filler) == 12
        assert filler["item_id"].isin(ratings["item_id"]).all()
        assert filler["rating"].between(1, 5).all() and (filler["rating"] == np.rint(filler["rating"])).all()
    if strategy == "average":
        means = ratings.groupby("item_id")["rating"].mean()
        f = fake[~fake["item_id"].isin(targets)]
        np.testing.assert_array_equal(f["rating"], np.clip(np.rint(means.loc[f["item_id"]].to_numpy()), 1, 5))
    if strategy == "bandwagon":
        counts = ratings.groupby("item_id").size().drop(targets)
        top = counts.sort_values(ascending=False, kind="stable").index[:12 // 5]
        for _, prof in fake.groupby("user_id"):
            assert set(top) <= set(prof["item_id"])
            assert (prof[prof["item_id"].isin(top)]["rating"] == 5).all()
    again = make_fake_profiles(ratings, strategy, 7, targets, 12, (1, 5), np.random.default_rng(3))
    pd.testing.assert_frame_equal(fake, again)


def test_random_filler_follows_the_global_distribution(ratings: pd.DataFrame) -> None:
    fake = make_fake_profiles(ratings, "random", 200, [150], 50, (1, 5), np.random.default_rng(0))
    filler = fake[fake["item_id"] != 150]["rating"]
    assert abs(filler.mean() - ratings["rating"].mean()) < 0.1
    assert make_fake_profiles(ratings, "random", 0, [150], 5, (1, 5), np.random.default_rng(0)).empty
    with pytest.raises(ValueError):
        make_fake_profiles(ratings, "love", 1, [150], 5, (1, 5), np.random.default_rng(0))
    huge = make_fake_profiles(ratings, "random", 2, [150], 10_000, (1, 5), np.random.default_rng(0))
    assert huge.groupby("user_id").size().max() == ratings["item_id"].nunique()  # capped at the catalogue


# ---------------------------------------------------------------------------------- targets
def test_choose_targets_are_long_tail(ratings: pd.DataFrame) -> None:
    head = set(short_head(ratings).tolist())
    counts = ratings.groupby("item_id").size()
    in_head = counts.loc[sorted(head)].sum()
    assert in_head / counts.sum() >= 0.8
    assert (in_head - counts.loc[sorted(head)].min()) / counts.sum() < 0.8  # the smallest such set
    t = choose_targets(ratings, 5, np.random.default_rng(1))
    assert len(t) == 5 and not set(t.tolist()) & head and (counts.loc[t] >= 5).all()
    np.testing.assert_array_equal(t, choose_targets(ratings, 5, np.random.default_rng(1)))
    with pytest.raises(ValueError):
        choose_targets(ratings, 5, np.random.default_rng(1), min_ratings=10**6)


# ---------------------------------------------------------------------------------- effects
def test_attack_effect_hand_computed() -> None:
    clean = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [7, 8, 7], "y_pred": [3.0, 4.0, 2.0]})
    attacked = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [7, 8, 7], "y_pred": [4.0, 4.0, 4.0]})
    topk_c = pd.DataFrame({"user_id": [1, 2], "rank": [1, 1], "item_id": [8, 8]})
    topk_a = pd.DataFrame({"user_id": [1, 1, 2], "rank": [1, 11, 1], "item_id": [8, 7, 7]})
    eff = attack_effect(clean, attacked, topk_c, topk_a, [7])
    assert eff["prediction_shift"] == pytest.approx(1.5)
    assert eff["hit_ratio_clean"] == 0.0 and eff["hit_ratio"] == 0.5  # user 1's hit is at rank 11
    assert attack_effect(clean, attacked, topk_c, topk_a, [7], users=[1])["prediction_shift"] == 1.0
    assert np.isnan(attack_effect(clean, attacked, topk_c, topk_a, [99])["prediction_shift"])
    assert hit_ratio(topk_a, [7], k=20) == 1.0


def test_attack_pushes_targets_on_an_item_mean_model(ratings: pd.DataFrame) -> None:
    eval_users = np.arange(1, 41)
    calls: list[int] = []
    targets = choose_targets(ratings, 3, np.random.default_rng(2))
    recs = run_attack(make_fit_predict(ratings, eval_users, calls), ratings, model_name="item_mean",
                      targets=targets, filler_size=20, seed=4, users=eval_users)
    assert calls[0] == 0 and len(calls) == 1 + 9  # one clean fit, then one per strategy and fraction
    assert len(recs) == 9 and all(r["kind"] == "shilling" and r["model"] == "item_mean" for r in recs)
    assert {r["n_fake"] for r in recs} == {4, 12, 20}  # 1 %, 3 %, 5 % of 400 real users
    for r in recs:
        assert r["prediction_shift"] > 0
        assert r["hit_ratio"] >= r["hit_ratio_clean"]
    for strategy in ("random", "average", "bandwagon"):
        shifts = [r["prediction_shift"] for r in recs if r["strategy"] == strategy]
        assert shifts == sorted(shifts)  # more fakes, more push
        five = next(r for r in recs if r["strategy"] == strategy and r["fraction"] == 0.05)
        assert five["hit_ratio"] > five["hit_ratio_clean"]
    again = run_attack(make_fit_predict(ratings, eval_users, []), ratings, model_name="item_mean",
                       targets=targets, filler_size=20, seed=4, users=eval_users)
    assert again == recs

    # the planned cells travel to other processes (pickled) and may run in any order: same records
    import pickle

    cells = plan_attack(ratings, strategies=STRATEGIES, fractions=(0.01, 0.03, 0.05), targets=targets,
                        filler_size=20, seed=4)
    assert pickle.loads(pickle.dumps(cells)) == cells
    fit_predict = make_fit_predict(ratings, eval_users, [])
    backwards = {i: fit_predict(cells[i].fake_profiles(ratings)) for i in reversed(range(len(cells)))}
    shuffled = attack_records(cells, [backwards[i] for i in range(len(cells))], model_name="item_mean",
                              users=eval_users)
    assert shuffled == recs


def test_attack_on_an_attack_proof_model_changes_nothing(ratings: pd.DataFrame) -> None:
    items = np.sort(ratings["item_id"].unique())
    users = np.arange(1, 11)

    def constant(extra: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        pred = pd.DataFrame({"user_id": np.repeat(users, len(items)), "item_id": np.tile(items, len(users)),
                             "y_pred": 3.0})
        topk = pd.DataFrame({"user_id": np.repeat(users, 10), "rank": np.tile(np.arange(1, 11), len(users)),
                             "item_id": np.tile(items[:10], len(users))})
        return pred, topk

    recs = run_attack(constant, ratings, model_name="const", strategies=["average"], fractions=[0.05], seed=1)
    assert recs[0]["prediction_shift"] == 0.0 and recs[0]["hit_ratio"] == recs[0]["hit_ratio_clean"]
    assert empty_ratings().empty
