"""A tiny synthetic task set with real signal, for fast model tests.

Ratings depend on user attributes x item features (women like genre A, men genre B), on a per-item
quality, and on a per-user taste for genre C that only the support set reveals, so both a global
model and per-user adaptation have something to learn. Everything derives from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from metarec.data.schema import AttrSpec, DataSpec
from metarec.features import FeatureEncoder
from metarec.tasks import TaskSet

TINY_SPEC = DataSpec(
    user_attributes=(
        AttrSpec("gender", "categorical"),
        AttrSpec("age", "numeric", edges=(30, 50)),
        AttrSpec("occupation", "categorical"),
    ),
    item_features=(
        AttrSpec("genres", "multilabel", separator="|"),
        AttrSpec("release_year", "numeric", edges=(1990, 2000)),
    ),
    sensitive=("gender", "age"),
)

GENRES = ("A", "B", "C", "D")


@dataclass
class TinyData:
    spec: DataSpec
    users: pd.DataFrame
    items: pd.DataFrame
    train: TaskSet
    val: TaskSet
    encoder: FeatureEncoder


def _task_rows(task_id: int, scenario: str, uid: int, items: np.ndarray, ratings: np.ndarray,
               n_support: int) -> list[dict]:
    rows = []
    for k, (i, r) in enumerate(zip(items, ratings)):
        rows.append({"task_id": task_id, "scenario": scenario, "user_id": uid, "item_id": int(i),
                     "rating": float(r), "timestamp": 1_000_000 + 100 * k,
                     "role": "support" if k < n_support else "query"})
    return rows


def make_tiny(seed: int = 0, n_train: int = 48, n_val: int = 16, n_items: int = 30,
              support: tuple[int, int] = (0, 12), query: int = 5, noise: float = 0.3) -> TinyData:
    """Users, items, train and val TaskSets (disjoint users) and an encoder fitted on train.

    Support sizes are drawn from `support` (inclusive), so some tasks may have an empty support.
    """
    g = np.random.default_rng(seed)
    n_users = n_train + n_val
    users = pd.DataFrame({
        "user_id": np.arange(1, n_users + 1, dtype=np.int64),
        "gender": g.choice(["F", "M"], n_users),
        "age": g.integers(18, 70, n_users),
        "occupation": g.choice(["artist", "doctor", "student"], n_users),
    })
    genre_sets = []
    for _ in range(n_items):
        k = int(g.integers(1, 3))
        genre_sets.append(sorted(g.choice(GENRES, k, replace=False).tolist()))
    items = pd.DataFrame({
        "item_id": np.arange(101, 101 + n_items, dtype=np.int64),
        "genres": ["|".join(s) for s in genre_sets],
        "release_year": g.integers(1980, 2010, n_items).astype(float),
    })
    quality = g.normal(0.0, 0.6, n_items)
    taste_c = g.choice([-1.0, 1.0], n_users)
    has = {c: np.array([c in s for s in genre_sets], dtype=float) for c in GENRES}

    frames = {"train": [], "val": []}
    for u in range(n_users):
        female = users["gender"].iloc[u] == "F"
        pref = (has["A"] - has["B"]) * (1.0 if female else -1.0)
        mean = 3.0 + 1.0 * pref + quality + 0.8 * taste_c[u] * has["C"]
        n_s = int(g.integers(support[0], support[1] + 1))
        chosen = g.choice(n_items, min(n_s + query, n_items), replace=False)
        r = np.clip(np.round(mean[chosen] + g.normal(0.0, noise, len(chosen))), 1, 5)
        split = "train" if u < n_train else "val"
        frames[split] += _task_rows(u, split, int(users["user_id"].iloc[u]), items["item_id"].to_numpy()[chosen], r,
                                    len(chosen) - query)
    train_frame = pd.DataFrame(frames["train"])
    val_frame = pd.DataFrame(frames["val"])
    encoder = FeatureEncoder.fit(TINY_SPEC, users, items, train_users=users["user_id"].iloc[:n_train],
                                 train_items=items["item_id"])
    return TinyData(TINY_SPEC, users, items, TaskSet(train_frame, users, items), TaskSet(val_frame, users, items),
                    encoder)


def mixed_batch(tiny: TinyData, n: int = 7):
    """A meta-batch of the first n training tasks with varied support sizes, one of them emptied,
    and one query set cut to two items."""
    from metarec.tasks import make_batch

    pairs = tiny.train.tasks_with_truth()[:n]
    tasks, truth = [t for t, _ in pairs], [y for _, y in pairs]
    tasks[2] = tasks[2].replace(support_items=tasks[2].support_items[:0], support_ratings=tasks[2].support_ratings[:0])
    tasks[1] = tasks[1].replace(candidates=tasks[1].candidates[:2])
    truth[1] = truth[1][:2]
    return make_batch(tasks, tiny.encoder, truth)
