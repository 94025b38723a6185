"""Neutral ties in catalogue lists: a constant predictor's lists are not ordered by item id, tied
items are drawn uniformly, and the lists are reproducible and independent of chunking."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from metarec.predict import task_rng, top_k, top_k_lists
from metarec.tasks import Task


def _tasks(n_users: int, n_items: int = 200) -> list[Task]:
    empty = np.zeros(0, dtype=np.int64)
    return [Task(user_id=u, user_attrs={}, support_items=empty, support_ratings=np.zeros(0),
                 candidates=np.arange(n_items, dtype=np.int64), scenario="user_cold") for u in range(n_users)]


def test_top_k_orders_by_score_and_only_ties_are_random() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    firsts = {tuple(top_k(scores, 3, np.random.default_rng(s))) for s in range(50)}
    assert firsts == {(1, 3, 2), (3, 1, 2)}  # the two 0.9s in either order, then 0.5


def test_constant_predictor_lists_are_not_item_id_order_and_ties_are_uniform() -> None:
    tasks = _tasks(400)
    lists = top_k_lists(tasks, [np.full(200, 3.5)] * len(tasks), k=10, seed=0)
    firsts = lists[lists["rank"] == 1]["item_id"].to_numpy()
    assert not np.all(firsts == 0)  # id order would put item 0 first for everyone
    assert (lists.groupby("user_id")["item_id"].apply(lambda s: list(s) == sorted(s))).mean() < 0.01
    # first item uniform over the 200 tied items: chi-square on 10 bins of 20 ids
    counts = np.bincount(firsts // 20, minlength=10)
    assert stats.chisquare(counts).pvalue > 0.001
    # listed items: mean id near the middle of the catalogue, not near the low ids
    assert lists["item_id"].mean() == pytest.approx(99.5, abs=4 * 57.7 / np.sqrt(len(lists)))


def test_lists_are_seeded_and_do_not_depend_on_chunking_or_order() -> None:
    tasks = _tasks(30)
    preds = [np.round(np.random.default_rng(t.user_id).random(200), 1) for t in tasks]  # many ties
    a = top_k_lists(tasks, preds, k=10, seed=7)
    b = top_k_lists(tasks[::-1], preds[::-1], k=10, seed=7)
    key = ["user_id", "rank"]
    assert a.sort_values(key).reset_index(drop=True).equals(b.sort_values(key).reset_index(drop=True))
    c = top_k_lists(tasks, preds, k=10, seed=8)
    assert not a["item_id"].equals(c["item_id"])
    scores = a.groupby("user_id")["score"].apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 0)))
    assert scores.all()  # still ordered by score
    assert task_rng(7, 3).random() == task_rng(7, 3).random()


def test_k_not_below_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match=r"user 0 \(user_cold\): k=10 is not below the 10 candidates"):
        top_k_lists(_tasks(1, n_items=10), [np.zeros(10)], k=10)
