"""Cold-start splits: partition invariants, leakage guard, determinism, features and batches."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from metarec.data.schema import MOVIELENS_SPEC, RatingData
from metarec.errors import LeakageError
from metarec.features import ML_UNKNOWN, UNKNOWN, FeatureEncoder
from metarec.splits import SplitConfig, build_splits, check_leakage, partition
from metarec.tasks import SCENARIOS, TaskSet, make_batch


def random_data(seed: int, n_users: int = 40, n_items: int = 60, per_user: tuple[int, int] = (12, 40)) -> RatingData:
    g = np.random.default_rng(seed)
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "age": g.integers(10, 70, n_users),
                          "gender": g.choice(["F", "M"], n_users), "occupation": g.choice(["a", "b", "c"], n_users),
                          "zip": [f"{z:05d}" for z in g.integers(0, 99999, n_users)]})
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "title": [f"t{i}" for i in range(n_items)],
                          "release_year": g.choice([1990.0, 1995.0, 1997.0, 1998.0, np.nan], n_items),
                          "genres": g.choice(["Drama", "Comedy|Drama", "Action"], n_items)})
    rows = []
    for u in users.user_id:
        k = int(g.integers(*per_user))
        for i in g.choice(items.item_id, size=min(k, n_items), replace=False):
            rows.append((u, int(i), float(g.integers(1, 6)), int(g.integers(0, 10**6))))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return RatingData(ratings, users, items, MOVIELENS_SPEC, "test")


def assert_invariants(data: RatingData, cfg: SplitConfig, splits: dict[str, pd.DataFrame]) -> None:
    part = partition(data, cfg)
    train = splits["train"]
    assert not train.item_id.isin(part.new_items).any()
    assert not train.user_id.isin(part.new_users | part.val_users).any()
    train_pairs = set(zip(train.user_id, train.item_id))
    for name in ("val", *SCENARIOS):
        f = splits[name]
        q = f[f.role == "query"]
        assert not set(zip(q.user_id, q.item_id)) & train_pairs, name
        # exactly query_size query rows and at least one support row per task
        assert (q.groupby("task_id").size() == cfg.query_size).all(), name
        assert (f[f.role == "support"].groupby("task_id").size() >= 1).all(), name
        assert (f.groupby("task_id").user_id.nunique() <= 1).all()
    for name, f in splits.items():
        assert not f.duplicated(["task_id", "item_id"]).any(), name
    assert set(splits["user_cold"].user_id) <= part.new_users
    assert set(splits["item_cold"].item_id) <= part.new_items
    assert not set(splits["warm"].item_id) & part.new_items
    # warm support is exactly the user's training rows
    w = splits["warm"]
    for uid, g in w[w.role == "support"].groupby("user_id"):
        assert set(g.item_id) == set(train[train.user_id == uid].item_id)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), selection=st.sampled_from(["random", "latest"]),
       new_frac=st.sampled_from([0.0, 0.2, 0.5]))
def test_split_invariants_hold_on_random_data(seed: int, selection: str, new_frac: float) -> None:
    data = random_data(seed)
    cfg = SplitConfig(new_item_year=1997, new_user_fraction=new_frac, val_fraction=0.2, min_ratings=11,
                      query_size=5, query_selection=selection, seed=seed)
    assert_invariants(data, cfg, build_splits(data, cfg))


def test_latest_selection_holds_out_the_newest_ratings() -> None:
    data = random_data(3)
    cfg = SplitConfig(new_user_fraction=0.3, val_fraction=0.0, min_ratings=11, query_size=5, query_selection="latest")
    s = build_splits(data, cfg)["user_cold"]
    for _, g in s.groupby("task_id"):
        assert g[g.role == "query"].timestamp.min() >= g[g.role == "support"].timestamp.max()


def test_same_seed_same_split_and_different_seed_differs() -> None:
    data = random_data(7)
    a = build_splits(data, SplitConfig(min_ratings=11, query_size=5, seed=1))
    b = build_splits(data, SplitConfig(min_ratings=11, query_size=5, seed=1))
    c = build_splits(data, SplitConfig(min_ratings=11, query_size=5, seed=2))
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k])
    assert not all(a[k].equals(c[k]) for k in a)


def test_leakage_guard_names_the_violation() -> None:
    data = random_data(5)
    cfg = SplitConfig(min_ratings=11, query_size=5, new_user_fraction=0.3)
    splits = build_splits(data, cfg)
    part = partition(data, cfg)
    leaked = {k: v.copy() for k, v in splits.items()}
    row = splits["user_cold"].iloc[[0]].assign(scenario="train", task_id=10**6)
    leaked["train"] = pd.concat([leaked["train"], row], ignore_index=True)
    with pytest.raises(LeakageError, match=r"split train: new user \d+ appears in training"):
        check_leakage(leaked, part)
    overlap = {k: v.copy() for k, v in splits.items()}
    f = overlap["warm"]
    q = f[f.role == "query"].iloc[[0]].assign(role="support")
    overlap["warm"] = pd.concat([f, q], ignore_index=True)
    with pytest.raises(LeakageError, match=r"split warm: task \d+ has user \d+, item \d+ in both support and query"):
        check_leakage(overlap, part)


def test_real_movielens_split(ml100k_data: RatingData, ml100k_dir) -> None:
    cfg = SplitConfig()
    splits = build_splits(ml100k_data, cfg)
    assert_invariants(ml100k_data, cfg, splits)
    part = partition(ml100k_data, cfg)
    # independent count: the film's year in its title (the date where the title has none) >= 1997
    years = []
    for line in (ml100k_dir / "u.item").read_text(encoding="latin-1").splitlines():
        f = line.split("|")
        m = re.findall(r"\((\d{4})\)", f[1])
        years.append(int(m[-1]) if m else (int(f[2][-4:]) if f[2] else 0))
    assert len(part.new_items) == sum(y >= 1997 for y in years) == 288
    assert len(part.new_users) == round(0.2 * 943)
    assert all(len(splits[s]) > 0 for s in ("train", "val", *SCENARIOS))


def test_encoder_unknown_buckets_and_round_trip() -> None:
    data = random_data(11)
    enc = FeatureEncoder.fit(data.spec, data.users, data.items, train_users=[1, 2, 3], train_items=[1, 2, 3, 4])
    x = enc.encode_users([{"gender": "X", "age": 30, "occupation": "never-seen", "zip": "00000"}])
    names = enc.user_names
    assert x[0, names.index("gender")] == UNKNOWN
    assert x[0, names.index("occupation")] == UNKNOWN
    assert x[0, names.index("age")] == enc.vocab["age"].index("25-34") + 1
    rows = enc.item_rows(np.array([10, 1]))
    assert enc.item_x[rows[0], enc.item_names.index("item_id")] == UNKNOWN  # item 10 unseen in training
    assert enc.item_x[rows[1], enc.item_names.index("item_id")] != UNKNOWN
    again = FeatureEncoder.from_json(enc.to_json())
    np.testing.assert_array_equal(again.item_x, enc.item_x)
    np.testing.assert_array_equal(again.encode_users(data.users), enc.encode_users(data.users))
    blind = FeatureEncoder.fit(data.spec, data.users, data.items, [1], [1], drop_sensitive=True)
    assert blind.user_names == ["zip"]
    unseen_genre = enc.item_ml["genres"]
    assert unseen_genre.min() >= 0 and (unseen_genre[:, 0] >= ML_UNKNOWN).all()


def test_batches_pad_and_mask() -> None:
    data = random_data(13)
    cfg = SplitConfig(min_ratings=11, query_size=5)
    splits = build_splits(data, cfg)
    ts = TaskSet(splits["warm"], data.users, data.items)
    enc = FeatureEncoder.fit(data.spec, data.users, data.items, splits["train"].user_id.unique(), splits["train"].item_id.unique())
    pairs = ts.tasks_with_truth()[:4]
    b = make_batch([t for t, _ in pairs], enc, [y for _, y in pairs])
    sizes = [len(t.support_items) for t, _ in pairs]
    assert b.support_mask.sum(1).tolist() == sizes
    assert b.support_items.shape[1] == max(sizes)
    assert (b.support_y[~b.support_mask] == 0).all()
    np.testing.assert_array_equal(b.query_y[0].numpy(), pairs[0][1])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), min_ratings=st.integers(11, 30), new_frac=st.sampled_from([0.0, 0.3]),
       year=st.sampled_from([1997, 3000]))
def test_coverage_counts_the_users_build_splits_keeps(seed: int, min_ratings: int, new_frac: float, year: int) -> None:
    from metarec.splits import coverage

    data = random_data(seed)
    cfg = SplitConfig(min_ratings=min_ratings, new_user_fraction=new_frac, new_item_year=year, seed=seed)
    cov = coverage(data, cfg)
    splits = build_splits(data, cfg)
    for name, c in cov.items():
        assert splits[name].user_id.nunique() == (0 if c.empty else c.eligible), name
        if c.empty:
            assert len(splits[name]) == 0
    if year == 3000:
        assert cov["item_cold"].empty == cov["user_item_cold"].empty == "no item has release_year >= 3000"
    if new_frac == 0.0:
        assert cov["user_cold"].empty == "no user is a new user (tasks.new_user_fraction is 0)"


def test_data_without_release_year_has_no_item_cold_scenarios_said_once() -> None:
    from metarec.splits import coverage, coverage_lines

    data = random_data(3)
    data.items["release_year"] = np.nan
    cfg = SplitConfig()
    cov = coverage(data, cfg)
    reason = "the items have no release_year, so no item is new and there are no item-cold scenarios"
    assert {s: c.empty for s, c in cov.items() if c.empty} == {"item_cold": reason, "user_item_cold": reason}
    lines = coverage_lines(cov, cfg)
    assert [x for x in lines if reason in x] == [f"item_cold, user_item_cold: empty, {reason}"]


def test_scenarios_present_skips_the_empty_ones(tmp_path) -> None:
    import json

    from pipelines.common import empty_scenarios, scenarios_present

    (tmp_path / "summary.json").write_text(json.dumps({"empty": {"item_cold": "no item has release_year >= 1997"}}))
    assert scenarios_present(tmp_path) == ("warm", "user_cold", "user_item_cold")
    assert empty_scenarios(tmp_path) == {"item_cold": "no item has release_year >= 1997"}
