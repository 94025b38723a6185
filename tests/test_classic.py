"""Classic baselines against independent computations, fold-in protocol, determinism, persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metarec.errors import ConfigError
from metarec.models import classic, registry
from metarec.models.classic import (BiasBaseline, GlobalMean, ItemKNN, Popularity, SVDRecommender, fold_in,
                                    task_user_key, tune)
from metarec.models.registry import build
from metarec.tasks import TaskSet


def _tiny(seed: int = 0, n_users: int = 40, n_items: int = 30, n_train_users: int = 30) -> tuple[TaskSet, TaskSet]:
    """Random ratings; users < n_train_users are training tasks, the rest cold tasks."""
    g = np.random.default_rng(seed)
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "gender": g.choice(["F", "M"], n_users),
                          "age": g.integers(15, 70, n_users)})
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "genres": g.choice(["A", "B", "A|B"], n_items),
                          "release_year": g.integers(1960, 2000, n_items).astype(float)})
    item_bias = g.normal(0, 1, n_items)
    rows = []
    for u in range(1, n_users + 1):
        rated = g.choice(n_items, size=int(g.integers(8, 20)), replace=False)
        for k, i in enumerate(rated):
            r = float(np.clip(np.round(3.5 + item_bias[i] + g.normal(0, 0.7)), 1, 5))
            role = "query" if k < 3 else "support"
            rows.append((u, u, "train" if u <= n_train_users else "user_cold", u, int(i) + 1, r, k, role))
    frame = pd.DataFrame(rows, columns=["split", "task_id", "scenario", "user_id", "item_id", "rating",
                                        "timestamp", "role"])
    train = frame[frame["split"] <= n_train_users].drop(columns="split").reset_index(drop=True)
    cold = frame[frame["split"] > n_train_users].drop(columns="split").reset_index(drop=True)
    return TaskSet(train, users, items), TaskSet(cold, users, items)


@pytest.fixture(scope="module")
def data() -> tuple[TaskSet, TaskSet]:
    return _tiny()


def test_mean_is_numpy_mean_of_training_ratings(data):
    train, cold = data
    preds = GlobalMean().fit(train).predict(cold.tasks())
    expected = np.mean(train.frame["rating"].to_numpy())
    for p in preds:
        np.testing.assert_allclose(p, expected, rtol=0, atol=1e-12)


def test_pop_by_hand():
    users = pd.DataFrame({"user_id": [1, 2, 3, 9], "gender": ["F", "M", "F", "M"], "age": [20, 30, 40, 50]})
    items = pd.DataFrame({"item_id": [10, 20, 30, 40], "genres": ["A"] * 4, "release_year": [1990.0] * 4})
    train = TaskSet(pd.DataFrame({
        "task_id": [1, 1, 2, 2, 3], "scenario": "train", "user_id": [1, 1, 2, 2, 3], "item_id": [10, 20, 10, 30, 10],
        "rating": [5.0, 1.0, 4.0, 2.0, 5.0], "timestamp": 0, "role": ["support", "query", "support", "query", "query"]}),
        users, items)
    cold = TaskSet(pd.DataFrame({
        "task_id": [7, 7, 7, 7, 7], "scenario": "user_cold", "user_id": 9, "item_id": [20, 10, 20, 30, 40],
        "rating": [3.0, 0.0, 0.0, 0.0, 0.0], "timestamp": [0, 1, 2, 3, 4],
        "role": ["support", "query", "query", "query", "query"]}), users, items)
    # fitted rows: training (5, 1, 4, 2, 5) + the cold support (item 20: 3) -> mu = 20/6
    mu, k = 20 / 6, 2.0
    expected = {10: (14 + k * mu) / (3 + k), 20: (4 + k * mu) / (2 + k), 30: (2 + k * mu) / (1 + k), 40: mu}
    model = Popularity(shrinkage=k).fit(train)
    (task,) = cold.tasks()
    (pred,) = model.predict([task])
    np.testing.assert_allclose(pred, [expected[int(i)] for i in task.candidates], atol=1e-12)
    # popular, well-rated item 10 ranks above the once-rated item 30 and the unrated item 40
    assert expected[10] > expected[40] > expected[30]


def _hand_trainset(train: TaskSet, tasks):
    """Trainset built independently: training rows, then each cold user's support under its key."""
    from surprise import Dataset, Reader

    tr = train.all_ratings()[["user_id", "item_id", "rating"]].sort_values(["user_id", "item_id"])
    extra = [(task_user_key(t), int(i), float(r)) for t in tasks for i, r in
             sorted(zip(t.support_items.tolist(), t.support_ratings.tolist()))]
    df = pd.DataFrame(list(tr.itertuples(index=False, name=None)) + extra, columns=["u", "i", "r"])
    return Dataset.load_from_df(df, Reader(rating_scale=(1.0, 5.0))).build_full_trainset()


def test_bias_equals_surprise_baselineonly(data):
    from surprise import BaselineOnly

    train, cold = data
    tasks = cold.tasks()
    model = BiasBaseline(n_epochs=7, reg_u=5.0, reg_i=3.0).fit(train)
    preds = model.predict(tasks)
    algo = BaselineOnly(bsl_options={"method": "als", "n_epochs": 7, "reg_u": 5.0, "reg_i": 3.0}, verbose=False)
    algo.fit(_hand_trainset(train, tasks))
    for t, p in zip(tasks, preds):
        ref = [algo.predict(task_user_key(t), int(i)).est for i in t.candidates]
        np.testing.assert_allclose(p, ref, atol=1e-9)


def test_svd_vectorised_scoring_equals_surprise_predict(data):
    from surprise import SVD

    train, cold = data
    tasks = cold.tasks()
    model = SVDRecommender(n_factors=5, n_epochs=5, reg_all=0.02, seed=3).fit(train)
    preds = model.predict(tasks)
    algo = SVD(n_factors=5, n_epochs=5, random_state=3, verbose=False).fit(_hand_trainset(train, tasks))
    for t, p in zip(tasks, preds):
        np.testing.assert_allclose(p, [algo.predict(task_user_key(t), int(i)).est for i in t.candidates], atol=1e-9)
    # an unknown user and an unknown item fall back to the known biases / global mean
    state, _ = model._fitted(tasks)
    est = classic._bias_score(state, "nobody", np.array([999, int(tasks[0].candidates[0])]), factors=True)
    assert est[0] == pytest.approx(state.algo.trainset.global_mean)
    assert est[1] == pytest.approx(algo.predict("nobody", int(tasks[0].candidates[0])).est)


@pytest.mark.parametrize("name", ["bias", "pop", "itemknn", "svd"])
def test_fold_in_uses_support_never_query(data, name):
    train, cold = data
    model = build(name, {"n_epochs": 5} if name in ("svd", "bias", "itemknn") else {}, seed=0).fit(train)
    tasks = cold.tasks()
    base = model.predict(tasks)
    # an extreme rating in a query row must change nothing
    frame = cold.frame.copy()
    qrow = frame.index[(frame["role"] == "query")][0]
    frame.loc[qrow, "rating"] = 1000.0
    np.testing.assert_array_equal(np.concatenate(model.predict(TaskSet(frame, cold.users, cold.items).tasks())),
                                  np.concatenate(base))
    # the support is folded in: flipping the first cold user's support ratings moves predictions
    t0 = tasks[0]
    flipped = t0.replace(support_ratings=(6.0 - t0.support_ratings).astype(np.float32))
    moved = model.predict([flipped] + tasks[1:])
    if name == "pop":  # pop is user-independent; only items rated in the support move
        assert not np.allclose(np.concatenate(moved), np.concatenate(base))
    else:
        assert not np.allclose(moved[0], base[0])
    for p in moved:
        assert np.all((p >= 1.0) & (p <= 5.0))


def test_tasks_of_one_user_do_not_merge(data):
    train, cold = data
    model = BiasBaseline().fit(train)
    t = cold.tasks()[0]
    other = t.replace(support_items=t.support_items[:2], support_ratings=np.array([5.0, 5.0], np.float32),
                      scenario="user_item_cold")
    alone = model.predict([t])[0]
    together = model.predict([t, other])[0]
    # only the item biases move a little (the extra two ratings); the user's bias is its own
    np.testing.assert_allclose(alone, together, atol=0.15)
    rows, keys, _ = fold_in(model.train_ratings_, [t, other])
    assert keys[0] != keys[1]
    assert (rows["user"] == keys[1]).sum() == 2


def test_warm_user_history_is_kept_once(data):
    train, _ = data
    model = BiasBaseline().fit(train)
    warm = train.tasks()[0]
    history = train.frame[train.frame["user_id"] == warm.user_id]
    rows, keys, _ = fold_in(model.train_ratings_, [warm])
    assert not (rows["user"] == warm.user_id).any()
    assert (rows["user"] == keys[0]).sum() == len(history)
    assert len(rows) == len(train.frame)


def test_cache_avoids_refit(data, monkeypatch):
    train, cold = data
    model = SVDRecommender(n_epochs=3).fit(train)
    calls = []
    original = model._fit_rows
    monkeypatch.setattr(model, "_fit_rows", lambda rows: calls.append(1) or original(rows))
    tasks = cold.tasks()
    a = model.predict(tasks)
    b = model.predict([t.replace(user_attrs={"gender": "X"}) for t in tasks])
    assert len(calls) == 1
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    model.predict(tasks[:3])
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["mean", "bias", "pop", "itemknn", "svd"])
def test_determinism_and_save_load(data, tmp_path, name):
    train, cold = data
    tasks = cold.tasks()
    params = {"n_epochs": 4} if name in ("svd", "bias", "itemknn") else {}
    a = build(name, params, seed=11).fit(train).predict(tasks)
    model = build(name, params, seed=11).fit(train)
    b = model.predict(tasks)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    model.save(tmp_path)
    assert (tmp_path / "train_ratings.parquet").exists() and (tmp_path / "config.json").exists()
    assert not list(tmp_path.glob("*.pkl"))
    loaded = registry.load(name, tmp_path)
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(np.concatenate(loaded.predict(tasks)), np.concatenate(b))
    other = GlobalMean if name != "mean" else Popularity
    with pytest.raises(ConfigError, match=f"holds a '{name}' model, not '{other.name}'"):
        other.load(tmp_path)


def test_svd_seed_matters(data):
    train, cold = data
    tasks = cold.tasks()
    a = SVDRecommender(n_epochs=5, seed=1).fit(train).predict(tasks)
    b = SVDRecommender(n_epochs=5, seed=2).fit(train).predict(tasks)
    assert not np.allclose(np.concatenate(a), np.concatenate(b))


def test_itemknn_unknown_items_fall_back(data):
    train, cold = data
    t = cold.tasks()[0].replace(candidates=np.array([12345, 1], dtype=np.int64))
    model = ItemKNN(n_epochs=3).fit(train)
    pred = model.predict([t])[0]
    assert np.all(np.isfinite(pred)) and np.all((pred >= 1) & (pred <= 5))


def test_tune_uses_validation_and_returns_best(data):
    train, cold = data
    best, scores = tune("pop", train, cold, {"shrinkage": [0.0, 5.0, 1e6]}, return_scores=True)
    assert len(scores) == 3
    assert best == min(scores, key=lambda s: s[1])[0]
    with pytest.raises(Exception):
        build("pop", {"nonsense": 1})


def _per_pair_bias_score(algo, user_key: str, items: np.ndarray, factors: bool) -> np.ndarray:
    """The scoring this module replaced: one dictionary lookup per (user, item) pair."""
    ts = algo.trainset
    est = np.full(len(items), ts.global_mean, dtype=np.float64)
    try:
        u = ts.to_inner_uid(user_key)
    except ValueError:
        u = None
    inner = np.array([ts._raw2inner_id_items.get(int(i), -1) for i in items], dtype=np.int64)
    known = inner >= 0
    if u is not None:
        est += algo.bu[u]
    est[known] += np.asarray(algo.bi)[inner[known]]
    if factors and u is not None and known.any():
        est[known] += np.asarray(algo.qi)[inner[known]] @ np.asarray(algo.pu)[u]
    return est


@pytest.mark.parametrize("name", ["bias", "svd", "itemknn", "pop"])
def test_index_array_scoring_is_bitwise_the_per_pair_scoring(data, name):
    """Catalogue-sized candidates (every item, plus ids nobody rated) scored through the index
    arrays give exactly the numbers of the per-pair lookups, for known and unknown users."""
    train, cold = data
    tasks = cold.tasks()
    model = build(name, {"n_epochs": 4} if name != "pop" else {}, seed=5).fit(train)
    state, keys = model._fitted(tasks)
    catalogue = np.r_[np.arange(1, 31), [0, 77, 1_000_000]].astype(np.int64)
    for key in [*keys, "nobody"]:
        got = model._score(state, key, catalogue)
        if name == "pop":
            mu, _, _ = state
            rows, _, _ = fold_in(model.train_ratings_, tasks)
            g = rows.groupby("item_id")["rating"].agg(["sum", "count"])
            want = ((g["sum"] + 5.0 * mu) / (g["count"] + 5.0)).reindex(catalogue).fillna(mu).to_numpy()
        elif name == "itemknn":
            want = np.array([state.algo.predict(key, int(i), clip=False).est for i in catalogue])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
            continue
        else:
            want = _per_pair_bias_score(state.algo, key, catalogue, factors=name == "svd")
        np.testing.assert_array_equal(got, want)


def test_scorer_scores_chunks_of_the_fitted_tasks_and_refuses_strangers(data):
    train, cold = data
    tasks = cold.tasks()
    model = SVDRecommender(n_epochs=4).fit(train)
    whole = model.predict(tasks)
    score = model.scorer(tasks)
    parts = score(tasks[:4]) + score(tasks[4:])
    np.testing.assert_array_equal(np.concatenate(parts), np.concatenate(whole))
    stranger = tasks[0].replace(support_ratings=np.full(len(tasks[0].support_ratings), 5.0, np.float32))
    with pytest.raises(ValueError, match=rf"svd: user {stranger.user_id} \(user_cold\) was not among the tasks"):
        score([stranger])
