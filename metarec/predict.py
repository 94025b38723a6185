"""Running a model over a split: query predictions and top-k lists over the catalogue.

Catalogue candidates for a task are the items of its scenario's item partition (existing items for
warm and user_cold, new items for item_cold and user_item_cold) that are not in its support set;
liked query items are then the relevant ones. Scoring the whole catalogue rather than the 10 query
items is what keeps @10 ranking metrics from being trivially perfect.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from metarec.models.base import Recommender
from metarec.tasks import Task, TaskSet

NEW_ITEM_SCENARIOS = ("item_cold", "user_item_cold")


def predict_in_chunks(model: Recommender, tasks: Sequence[Task], chunk: int = 256) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(tasks), chunk):
        preds = model.predict(list(tasks[start: start + chunk]))
        out.extend(np.asarray(p, dtype=np.float64) for p in preds)
    for t, p in zip(tasks, out):
        if p.shape != (len(t.candidates),):
            raise ValueError(f"model returned {p.shape} predictions for user {t.user_id}; expected {len(t.candidates)}")
    return out


def query_predictions(model: Recommender, split: TaskSet) -> pd.DataFrame:
    """One row per query (user, item): user_id, item_id, scenario, y_true, y_pred (CONTRACTS.md)."""
    pairs = split.tasks_with_truth()
    preds = predict_in_chunks(model, [t for t, _ in pairs])
    frames = [pd.DataFrame({"user_id": t.user_id, "item_id": t.candidates, "scenario": t.scenario,
                            "y_true": y.astype(np.float64), "y_pred": p}) for (t, y), p in zip(pairs, preds)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["user_id", "item_id", "scenario", "y_true", "y_pred"])


def catalogue_tasks(split: TaskSet, new_items: set[int]) -> list[Task]:
    """The split's tasks with every unrated item of the scenario's item partition as candidates."""
    all_items = np.sort(split.items["item_id"].to_numpy(np.int64))
    is_new = np.isin(all_items, np.fromiter(new_items, dtype=np.int64, count=len(new_items)))
    out = []
    for t in split.tasks():
        pool = all_items[is_new] if t.scenario in NEW_ITEM_SCENARIOS else all_items[~is_new]
        out.append(t.replace(candidates=np.setdiff1d(pool, t.support_items, assume_unique=True)))
    return out


def top_k(tasks: Sequence[Task], preds: Sequence[np.ndarray], k: int) -> pd.DataFrame:
    """Top-k per task by score, ties broken by item id; records how many candidates there were."""
    rows = []
    for t, p in zip(tasks, preds):
        if k >= len(t.candidates):
            raise ValueError(f"user {t.user_id} ({t.scenario}): k={k} is not below the {len(t.candidates)} candidates; "
                             "every ranking metric would be trivially perfect")
        order = np.lexsort((t.candidates, -p))[:k]
        rows.append(pd.DataFrame({"user_id": t.user_id, "scenario": t.scenario, "rank": np.arange(1, k + 1),
                                  "item_id": t.candidates[order], "score": p[order],
                                  "n_candidates": len(t.candidates)}))
    return pd.concat(rows, ignore_index=True)


def catalogue_rankings(model: Recommender, split: TaskSet, new_items: set[int], k: int = 10) -> pd.DataFrame:
    tasks = catalogue_tasks(split, new_items)
    return top_k(tasks, predict_in_chunks(model, tasks, chunk=64), k)
