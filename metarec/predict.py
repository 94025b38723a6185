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
    """Predict in blocks to bound memory. A model whose predictions depend on the whole set of
    tasks asked together (classic models fold every support set into one fit) sets
    `predict_chunk = None` and gets all tasks in one call, so chunking never changes its answers."""
    if hasattr(model, "predict_chunk"):
        chunk = model.predict_chunk or max(len(tasks), 1)
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
    tasks = [t for t, _ in pairs]
    preds = predict_in_chunks(model, tasks)
    sizes = [len(t.candidates) for t in tasks]
    return pd.DataFrame({
        "user_id": np.repeat(np.array([t.user_id for t in tasks], dtype=np.int64), sizes),
        "item_id": np.concatenate([t.candidates for t in tasks]) if tasks else np.zeros(0, np.int64),
        "scenario": np.repeat(np.array([t.scenario for t in tasks], dtype=object), sizes),
        "y_true": np.concatenate([y for _, y in pairs]).astype(np.float64) if tasks else np.zeros(0),
        "y_pred": np.concatenate(preds) if tasks else np.zeros(0)})


def catalogue_tasks(split: TaskSet, new_items: set[int]) -> list[Task]:
    """The split's tasks with every unrated item of the scenario's item partition as candidates."""
    all_items = np.sort(split.items["item_id"].to_numpy(np.int64))
    is_new = np.isin(all_items, np.fromiter(new_items, dtype=np.int64, count=len(new_items)))
    out = []
    for t in split.tasks():
        pool = all_items[is_new] if t.scenario in NEW_ITEM_SCENARIOS else all_items[~is_new]
        out.append(t.replace(candidates=np.setdiff1d(pool, t.support_items, assume_unique=True)))
    return out


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the k highest scores, best first; tied scores in a random order drawn from `rng`.

    Why random: breaking ties by item id is not neutral (on ML-100K low ids are rated higher, so a
    constant predictor's lists looked better than chance). A seeded generator keeps the lists
    reproducible. The one ranking helper for catalogue lists and the counterfactual test.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((rng.random(scores.size), -scores))[:k]


def task_rng(seed: int, user_id: int) -> np.random.Generator:
    """The tie-breaking generator of one user's list: a function of (seed, user) only, so the lists
    do not depend on how tasks are chunked or ordered, and every model sees the same tie order."""
    return np.random.default_rng([int(seed), int(user_id)])


def top_k_lists(tasks: Sequence[Task], preds: Sequence[np.ndarray], k: int, seed: int = 0) -> pd.DataFrame:
    """Top-k per task by score (ties at random, seeded per user); records how many candidates there were."""
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("user_id", "scenario", "rank", "item_id", "score", "n_candidates")}
    for t, p in zip(tasks, preds):
        n = len(t.candidates)
        if k >= n:
            raise ValueError(f"user {t.user_id} ({t.scenario}): k={k} is not below the {n} candidates; "
                             "every ranking metric would be trivially perfect")
        order = top_k(p, k, task_rng(seed, t.user_id))
        cols["user_id"].append(np.full(k, t.user_id, dtype=np.int64))
        cols["scenario"].append(np.full(k, t.scenario, dtype=object))
        cols["rank"].append(np.arange(1, k + 1, dtype=np.int64))
        cols["item_id"].append(t.candidates[order])
        cols["score"].append(np.asarray(p, dtype=np.float64)[order])
        cols["n_candidates"].append(np.full(k, n, dtype=np.int64))
    return pd.DataFrame({c: np.concatenate(v) if v else np.zeros(0) for c, v in cols.items()})


def catalogue_rankings(model: Recommender, split: TaskSet, new_items: set[int], k: int = 10,
                       seed: int = 0) -> pd.DataFrame:
    """Top-k catalogue lists of every task; `seed` fixes the random order of tied scores."""
    tasks = catalogue_tasks(split, new_items)
    return top_k_lists(tasks, predict_in_chunks(model, tasks, chunk=64), k, seed)
