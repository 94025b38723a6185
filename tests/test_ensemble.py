"""Support-set ensemble: combination rules by hand, vectorised = solo training, persistence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from metarec.data.schema import AttrSpec, DataSpec
from metarec.errors import ConfigError
from metarec.features import FeatureEncoder
from metarec.models.ensemble import (LearnerData, SupportSetEnsemble, combine_weights, forward, init_params,
                                     train_learners)
from metarec.tasks import TaskSet

SPEC = DataSpec(
    user_attributes=(AttrSpec("gender", "categorical"), AttrSpec("age", "numeric", edges=(30, 50))),
    item_features=(AttrSpec("genres", "multilabel", separator="|"),
                   AttrSpec("release_year", "numeric", edges=(1980, 1990))),
    sensitive=("gender",),
)


def _synthetic(seed: int = 0, n_train: int = 60, n_cold: int = 20, n_items: int = 40, per_user: int = 16,
               support: int = 8) -> tuple[TaskSet, TaskSet, FeatureEncoder]:
    """Two taste groups: 'F' users love genre A and hate B, 'M' users the reverse (+ noise)."""
    g = np.random.default_rng(seed)
    n_users = n_train + n_cold
    gender = np.where(np.arange(n_users) % 2 == 0, "F", "M")
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "gender": gender,
                          "age": g.integers(18, 70, n_users)})
    genre = np.where(np.arange(n_items) < n_items // 2, "A", "B")
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "genres": genre,
                          "release_year": g.integers(1970, 2000, n_items).astype(float)})
    rows = []
    for u in range(n_users):
        rated = g.choice(n_items, size=per_user, replace=False)
        for k, i in enumerate(rated):
            likes = (gender[u] == "F") == (genre[i] == "A")
            r = float(np.clip(np.round((4.6 if likes else 1.4) + g.normal(0, 0.3)), 1, 5))
            cold = u >= n_train
            role = ("support" if k < support else "query") if cold else ("query" if k < 3 else "support")
            rows.append((u + 1, "user_cold" if cold else "train", u + 1, int(i) + 1, r, k, role))
    frame = pd.DataFrame(rows, columns=["task_id", "scenario", "user_id", "item_id", "rating", "timestamp", "role"])
    train = TaskSet(frame[frame["scenario"] == "train"].reset_index(drop=True), users, items)
    cold = TaskSet(frame[frame["scenario"] == "user_cold"].reset_index(drop=True), users, items)
    enc = FeatureEncoder.fit(SPEC, users, items, train.user_ids, train.frame["item_id"].unique())
    return train, cold, enc


@pytest.fixture(scope="module")
def data():
    return _synthetic()


@pytest.fixture(scope="module")
def fitted(data):
    train, _, enc = data
    return SupportSetEnsemble(group_by="user", combine="weighted", max_epochs=60, seed=1).fit(train, None, enc)


def _mae(preds, truth) -> float:
    return float(np.mean(np.abs(np.concatenate(preds) - np.concatenate([q for _, q in truth]))))


def test_weighted_temperature_limits_by_hand(data, fitted):
    _, cold, _ = data
    task = cold.tasks()[0]
    ps, pc = fitted.base_predictions(task)
    losses = ((ps - task.support_ratings.astype(np.float64)) ** 2).mean(1)
    np.testing.assert_allclose(fitted.support_losses(task), losses, atol=1e-12)
    best = int(np.argmin(losses))
    for t in (0.0, 1e-9):
        fitted.combine, fitted.temperature = "weighted", t
        np.testing.assert_allclose(fitted.predict([task])[0], np.clip(pc[best], 1, 5), atol=1e-9)
    for t in (float("inf"), 1e12):
        fitted.temperature = t
        np.testing.assert_allclose(fitted.predict([task])[0], np.clip(pc.mean(0), 1, 5), atol=1e-9)
    fitted.temperature = 0.5
    w = np.exp(-losses / 0.5)
    np.testing.assert_allclose(fitted.predict([task])[0], np.clip((w / w.sum()) @ pc, 1, 5), atol=1e-9)
    # empty support: equal losses, plain average
    empty = task.replace(support_items=np.zeros(0, np.int64), support_ratings=np.zeros(0, np.float32))
    np.testing.assert_allclose(fitted.predict([empty])[0], np.clip(pc.mean(0), 1, 5), atol=1e-9)


def test_combine_weights_ties_share():
    np.testing.assert_allclose(combine_weights(np.array([1.0, 0.5, 0.5]), 0.0), [0, 0.5, 0.5])
    np.testing.assert_allclose(combine_weights(np.array([1.0, 2.0]), float("inf")), [0.5, 0.5])
    assert combine_weights(np.array([1e6, 0.0]), 1e-3).sum() == pytest.approx(1.0)


def test_stacking_equals_hand_ridge_and_falls_back(data, fitted):
    from sklearn.linear_model import Ridge

    _, cold, _ = data
    task = cold.tasks()[1]
    fitted.combine, fitted.alpha, fitted.temperature = "stacking", 3.0, 0.2
    ps, pc = fitted.base_predictions(task)
    ref = Ridge(alpha=3.0).fit(ps.T, task.support_ratings.astype(np.float64)).predict(pc.T)
    np.testing.assert_allclose(fitted.predict([task])[0], np.clip(ref, 1, 5), atol=1e-9)
    one = task.replace(support_items=task.support_items[:1], support_ratings=task.support_ratings[:1])
    ps1, pc1 = fitted.base_predictions(one)
    w = combine_weights(((ps1 - one.support_ratings[0]) ** 2).mean(1), 0.2)
    np.testing.assert_allclose(fitted.predict([one])[0], np.clip(w @ pc1, 1, 5), atol=1e-9)
    fitted.combine, fitted.temperature = "weighted", 0.1


@pytest.mark.parametrize("hidden", [0, 8])
def test_vectorised_training_equals_solo(data, hidden):
    train, _, enc = data
    g = np.random.default_rng(0)
    rows, ys, held = [], [], []
    for n in (5, 12, 30, 9):
        rows.append(g.integers(0, len(enc.item_ids), n))
        ys.append(g.integers(1, 6, n).astype(np.float32))
        held.append(g.random(n) < 0.3)
    item_x, item_ml = torch.from_numpy(enc.item_x), {k: torch.from_numpy(v) for k, v in enc.item_ml.items()}
    names, ml = enc.item_names, enc.item_multilabel
    full = LearnerData.build(rows, ys, held, max_buckets=2)
    init = init_params(4, names, enc.item_cardinalities(), ml, enc.multilabel_cardinalities(), hidden, 4,
                       full.train_means(), torch.Generator().manual_seed(5))
    kw = dict(lr=0.05, weight_decay=1e-3, max_epochs=40, patience=5)
    together, _, epochs = train_learners(init, item_x, item_ml, names, ml, full, **kw)
    probe = torch.arange(len(enc.item_ids)).expand(1, -1)
    for b in range(4):
        solo_init = {k: v[b: b + 1] for k, v in init.items()}
        alone, _, ep = train_learners(solo_init, item_x, item_ml, names, ml,
                                      LearnerData.build([rows[b]], [ys[b]], [held[b]]), **kw)
        assert int(ep[0]) == int(epochs[b])
        for k in init:
            np.testing.assert_allclose(together[k][b: b + 1].numpy(), alone[k].numpy(), atol=1e-5, err_msg=k)
        with torch.no_grad():
            a = forward({k: v[b: b + 1] for k, v in together.items()}, item_x, item_ml, names, ml, probe)
            s = forward(alone, item_x, item_ml, names, ml, probe)
        np.testing.assert_allclose(a.numpy(), s.numpy(), atol=1e-5)


@pytest.mark.parametrize("params", [{"combine": "weighted", "temperature": 0.05},
                                    {"combine": "stacking", "alpha": 1.0},
                                    {"group_by": "cluster", "n_clusters": 4, "combine": "weighted", "temperature": 0.05}])
def test_beats_global_mean_on_group_structure(data, params):
    train, cold, enc = data
    truth = cold.tasks_with_truth()
    model = SupportSetEnsemble(max_epochs=150, patience=20, seed=0, **params).fit(train, cold, enc)
    ens = _mae(model.predict([t for t, _ in truth]), truth)
    mean = float(train.frame["rating"].mean())
    base = _mae([np.full(len(t.candidates), mean) for t, _ in truth], truth)
    assert ens < 0.6 * base, (ens, base)
    assert model.val_mae_ == pytest.approx(ens)


def test_groups_and_clusters(data):
    train, _, enc = data
    per_user = SupportSetEnsemble(group_by="user", max_epochs=2, min_ratings=14).fit(train, None, enc)
    assert [int(g[0]) for g in per_user.groups_] == sorted(train.user_ids.tolist())
    a = SupportSetEnsemble(group_by="cluster", n_clusters=5, max_epochs=2, seed=3).fit(train, None, enc)
    b = SupportSetEnsemble(group_by="cluster", n_clusters=5, max_epochs=2, seed=3).fit(train, None, enc)
    assert len(a.groups_) <= 5
    assert sorted(np.concatenate(a.groups_).tolist()) == sorted(train.user_ids.tolist())
    assert all(np.array_equal(x, y) for x, y in zip(a.groups_, b.groups_))
    # the taste groups are recoverable from the rating profile: clusters are nearly pure in gender
    gender = train.users.set_index("user_id")["gender"]
    purity = np.mean([max((gender[g] == "F").mean(), (gender[g] == "M").mean()) for g in a.groups_])
    assert purity > 0.9


def test_determinism_and_save_load(data, tmp_path):
    train, cold, enc = data
    tasks = cold.tasks()
    kw = dict(max_epochs=30, hidden=4, emb_dim=3, combine="stacking", alpha=2.0, seed=7)
    m1 = SupportSetEnsemble(**kw).fit(train, None, enc)
    m2 = SupportSetEnsemble(**kw).fit(train, None, enc)
    p1 = np.concatenate(m1.predict(tasks))
    np.testing.assert_array_equal(p1, np.concatenate(m2.predict(tasks)))
    m1.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"weights.safetensors", "config.json", "history.json"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["params"]["seed"] == 7 and "vocab" in config["encoder"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert history and set(history[0]) == {"epoch", "train_loss", "val_loss"}
    loaded = SupportSetEnsemble.load(tmp_path)
    assert loaded.get_params() == m1.get_params()
    np.testing.assert_array_equal(np.concatenate(loaded.predict(tasks)), p1)
    other = SupportSetEnsemble(**{**kw, "seed": 8}).fit(train, None, enc)
    assert not np.array_equal(np.concatenate(other.predict(tasks)), p1)


def test_unknown_items_and_errors(data, fitted):
    train, cold, enc = data
    # item-id row 0 (unknown/new items) is never trained: new items are scored from their features
    assert torch.count_nonzero(fitted.params_["emb.item_id"][:, 0]) == 0
    enc_new = FeatureEncoder.fit(SPEC, train.users, train.items, train.user_ids, [2, 3, 4, 5])
    model = SupportSetEnsemble(group_by="user", max_epochs=5).fit(train, None, enc_new)
    task = cold.tasks()[0].replace(candidates=np.array([1, 40], dtype=np.int64))
    assert np.all(np.isfinite(model.predict([task])[0]))
    with pytest.raises(ConfigError):
        SupportSetEnsemble().fit(train, None, None)
    with pytest.raises(ConfigError, match="ensemble: group_by must be one of"):
        SupportSetEnsemble(group_by="items").fit(train, None, enc)
    with pytest.raises(ConfigError, match="ensemble: combine must be one of"):
        SupportSetEnsemble(combine="median").fit(train, None, enc)
    with pytest.raises(ConfigError, match=r"ensemble: lr must be a number >= 0.0, got '1e-3'"):
        SupportSetEnsemble(lr="1e-3").fit(train, None, enc)
