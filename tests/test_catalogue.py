"""Streamed catalogue scoring against the all-at-once code it replaced, and the counted exclusion
of users with k or fewer candidates.

`_reference_rankings` is the previous path (every task's candidates built at once, predictions in
chunks of 64 tasks, a full lexsort per user, minus the crash on a user with k or fewer candidates);
the streamed lists must equal it exactly, whatever the chunk size, for the classic models (fitted
once, scored per chunk) and for MeLU. The synthetic fixture has such users (warm and item-cold
users who rated all but 10 items of their partition).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metarec.features import FeatureEncoder
from metarec.models.registry import build
from metarec.predict import (candidate_counts, catalogue_exclusions, catalogue_rankings, catalogue_tasks,
                             join_shards, task_rng, top_k)
from metarec.splits import SplitConfig, build_splits, partition
from metarec.tasks import Task, TaskSet


def _reference_rankings(model, split: TaskSet, new_items: set[int], k: int, seed: int) -> pd.DataFrame:
    tasks = catalogue_tasks(split, new_items)
    chunk = 64
    if hasattr(model, "predict_chunk"):
        chunk = model.predict_chunk or max(len(tasks), 1)
    preds = []
    for start in range(0, len(tasks), chunk):
        preds += [np.asarray(p, dtype=np.float64) for p in model.predict(tasks[start: start + chunk])]
    rows = []
    for t, p in zip(tasks, preds):
        if len(p) <= k:  # where the old code stopped with "k=10 is not below the 10 candidates"
            continue
        order = np.lexsort((task_rng(seed, t.user_id).random(p.size), -p))[:k]
        rows.append(pd.DataFrame({"user_id": np.full(k, t.user_id, dtype=np.int64),
                                  "scenario": np.full(k, t.scenario, dtype=object),
                                  "rank": np.arange(1, k + 1, dtype=np.int64), "item_id": t.candidates[order],
                                  "score": p[order], "n_candidates": np.full(k, len(p), dtype=np.int64)}))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture(scope="module")
def world():
    from metarec.data.synthetic import generate

    data, _ = generate({"seed": 1, "n_users": 260, "n_items": 300, "n_ratings": 18_000})
    cfg = SplitConfig(seed=2)
    splits = build_splits(data, cfg)
    sets = {name: TaskSet(f, data.users, data.items) for name, f in splits.items()}
    train = splits["train"]
    encoder = FeatureEncoder.fit(data.spec, data.users, data.items, train["user_id"].unique(),
                                 train["item_id"].unique())
    return data, sets, partition(data, cfg).new_items, encoder


MODELS = {"svd": {"n_epochs": 5}, "bias": {"n_epochs": 3}, "pop": {}, "mean": {}, "itemknn": {"n_epochs": 3},
          "melu": {"epochs": 1, "embedding_dim": 8, "hidden": [16, 8], "local_steps": 2}}


@pytest.mark.parametrize("name", list(MODELS))
def test_streamed_lists_equal_the_all_at_once_lists(world, name: str) -> None:
    data, sets, new, encoder = world
    model = build(name, MODELS[name], seed=0).fit(sets["train"], sets["val"], encoder)
    assert sum(r["n_users"] for s in ("warm", "item_cold") for r in catalogue_exclusions(sets[s], new, 10)) >= 2
    for scenario in ("warm", "user_cold", "item_cold"):
        split = sets[scenario]
        want = _reference_rankings(model, split, new, k=10, seed=4)
        pd.testing.assert_frame_equal(catalogue_rankings(model, split, new, k=10, seed=4), want, check_exact=True)
        if name != "melu":  # any chunking gives the same lists for a model fitted once on the whole split
            small = catalogue_rankings(model, split, new, k=10, seed=4, chunk_pairs=1)
            pd.testing.assert_frame_equal(small, want, check_exact=True)


@pytest.mark.parametrize("name", ["melu", "svd"])
def test_shards_of_a_saved_model_join_into_the_lists_of_the_fitted_one(world, name: str, tmp_path) -> None:
    """What the train stage does on a cluster: shards scored by the model reloaded from disk, in any
    number (more than chunks too), join into the fitted model's lists byte for byte."""
    from metarec.models.registry import load

    data, sets, new, encoder = world
    model = build(name, MODELS[name], seed=0).fit(sets["train"], sets["val"], encoder)
    model.save(tmp_path / name)
    again = load(name, tmp_path / name, train=sets["train"])
    for scenario in ("warm", "user_cold"):
        want = catalogue_rankings(model, sets[scenario], new, k=10, seed=4, chunk_pairs=3000)   # several chunks
        for n in (1, 2, 5, 400):
            parts = [catalogue_rankings(again, sets[scenario], new, k=10, seed=4, chunk_pairs=3000, shard=(j, n))
                     for j in range(n)]
            if n == 2 and name == "melu":
                assert all(len(p) for p in parts)                     # both shards hold lists
            pd.testing.assert_frame_equal(join_shards(parts), want, check_exact=True)
    with pytest.raises(ValueError, match="shard 2 of 2 does not exist"):
        catalogue_rankings(model, sets["warm"], new, shard=(2, 2))


def test_top_k_equals_the_full_sort_with_ties_and_nans() -> None:
    gen = np.random.default_rng(0)
    for trial in range(300):
        n = int(gen.integers(1, 60))
        scores = np.round(gen.normal(size=n), int(gen.integers(0, 2)))
        if trial % 3 == 0:
            scores[gen.random(n) < 0.3] = np.nan
        k = int(gen.integers(0, n + 2))
        full = np.lexsort((np.random.default_rng([trial, 1]).random(n), -scores))[:k]
        np.testing.assert_array_equal(top_k(scores, k, np.random.default_rng([trial, 1])), full)


def test_top_k_equals_the_full_sort_when_most_of_a_large_catalogue_ties() -> None:
    """The partition over tied scores (a constant predictor's case) picks the full sort's items."""
    gen = np.random.default_rng(1)
    for trial in range(100):
        n = int(gen.integers(50, 3000))
        scores = np.full(n, 3.5) if trial % 2 else np.where(gen.random(n) < 0.9, 3.5, gen.normal(3.5, 1.0, n))
        if trial % 5 == 0:
            scores[gen.random(n) < 0.01] = np.nan
        k = int(gen.integers(1, 40))
        full = np.lexsort((np.random.default_rng([trial, 2]).random(n), -scores))[:k]
        np.testing.assert_array_equal(top_k(scores, k, np.random.default_rng([trial, 2])), full)


def _task(user: int, support: list[int], scenario: str = "user_cold") -> Task:
    return Task(user, {}, np.array(support, dtype=np.int64), np.full(len(support), 4.0, np.float32),
                np.zeros(0, np.int64), scenario)


def test_candidate_counts_and_exclusions_are_counted_by_hand() -> None:
    items = pd.DataFrame({"item_id": np.arange(1, 31)})          # items 26..30 are new
    new = {26, 27, 28, 29, 30}
    rows = []
    plan = [(0, 7, "user_cold", list(range(1, 6))),           # 25 existing - 5 rated = 20 candidates
            (1, 8, "user_cold", list(range(1, 16)) + [26]),   # 25 - 15 (item 26 is not in its pool) = 10
            (2, 9, "user_item_cold", [26, 27]),               # 5 new - 2 = 3
            (3, 10, "user_cold", list(range(1, 25)))]         # 25 - 24 = 1
    for task_id, user, scenario, support in plan:
        rows += [(task_id, scenario, user, i, 4.0, 0, "support") for i in support]
        rows.append((task_id, scenario, user, 999, 3.0, 1, "query"))
    frame = pd.DataFrame(rows, columns=["task_id", "scenario", "user_id", "item_id", "rating", "timestamp", "role"])
    split = TaskSet(frame, pd.DataFrame({"user_id": [7, 8, 9, 10]}), items)
    counts = candidate_counts(split, new)
    assert counts["n_candidates"].tolist() == [20, 10, 3, 1]
    assert counts["n_candidates"].tolist() == [len(t.candidates) for t in catalogue_tasks(split, new)]
    ex = {r["scenario"]: (r["n_users"], r["of_users"]) for r in catalogue_exclusions(split, new, k=10)}
    assert ex == {"user_cold": (2, 3), "user_item_cold": (1, 1)}
    lists = catalogue_rankings(build("mean", {}, 0).fit(TaskSet(frame.assign(scenario="train"), split.users, items)),
                               split, new, k=10)
    assert sorted(lists["user_id"].unique()) == [7]
    assert lists["n_candidates"].unique().tolist() == [20]
