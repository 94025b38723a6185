"""A second dataset shape for the tests: what a subscription service might export, not MovieLens.

String ids (`usr-…`, `sku-…`), a `country` and a `plan` attribute, ages bucketed at custom edges
(30, 45), genres as a multi-label feature with its own separator (";") and no release year, so
there are no item-cold scenarios. Ratings come from a seeded user-bias + item-bias + affinity
model on 1..5, dense enough that every user passes the default tasks.min_ratings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

COUNTRIES = ("BR", "DE", "IN", "US")
PLANS = ("free", "plus", "pro")
GENRES = ("docs", "drama", "kids", "news", "sport")
AGE_EDGES = [30, 45]
AGE_GROUPS = ("<30", "30-45", ">=45")


def schema() -> dict:
    """params.yaml `data.schema` of the generated tables."""
    return {
        "sensitive": ["country", "age", "plan"],
        "rating_min": 1, "rating_max": 5,
        "user_attributes": [
            {"name": "country", "kind": "categorical", "values": list(COUNTRIES)},
            {"name": "age", "kind": "numeric", "edges": AGE_EDGES},
            {"name": "plan", "kind": "categorical", "values": list(PLANS)},
        ],
        "item_features": [{"name": "genres", "kind": "multilabel", "separator": ";"}],
    }


def tables(n_users: int = 150, n_items: int = 90, per_user: tuple[int, int] = (16, 40),
           seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratings, users, items) with the original string ids."""
    gen = np.random.default_rng(seed)
    user_ids = [f"usr-{i:04x}{gen.integers(16 ** 4):04x}" for i in range(n_users)]
    item_ids = [f"sku-{i:05d}" for i in range(n_items)]
    users = pd.DataFrame({
        "user_id": user_ids,
        "country": gen.choice(COUNTRIES, n_users, p=[0.2, 0.3, 0.2, 0.3]),
        "age": gen.integers(16, 71, n_users),
        "plan": gen.choice(PLANS, n_users, p=[0.5, 0.3, 0.2]),
    })
    labels = [";".join(sorted(gen.choice(GENRES, gen.integers(1, 3), replace=False))) for _ in range(n_items)]
    items = pd.DataFrame({"item_id": item_ids, "genres": labels})
    user_bias, item_bias = gen.normal(0, 0.5, n_users), gen.normal(0, 0.6, n_items)
    taste = gen.normal(0, 1, (n_users, 3)) @ gen.normal(0, 0.4, (3, n_items))
    rows = []
    for u in range(n_users):
        for i in gen.choice(n_items, gen.integers(per_user[0], per_user[1] + 1), replace=False):
            score = 3.4 + user_bias[u] + item_bias[i] + taste[u, i] + gen.normal(0, 0.6)
            rows.append((user_ids[u], item_ids[i], int(np.clip(np.rint(score), 1, 5)),
                         1_600_000_000 + int(gen.integers(0, 10_000_000))))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return ratings, users, items


def write(folder: Path, **kwargs) -> dict:
    """Write ratings.csv, users.csv and items.csv under `folder`; return the params `data` block
    (paths relative to folder's parent, as params.yaml sits there)."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings, users, items = tables(**kwargs)
    ratings.to_csv(folder / "ratings.csv", index=False)
    users.to_csv(folder / "users.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    return {"source": "csv", "interactions": f"{folder.name}/ratings.csv", "users": f"{folder.name}/users.csv",
            "items": f"{folder.name}/items.csv", "duplicates": "error", "schema": schema()}


def write_readme_shape(root: Path, n_users: int = 150, n_items: int = 120, seed: int = 1) -> None:
    """The tables README.md's bring-your-own example names (my/ratings.csv, my/users.csv,
    my/items.csv): integer ids, gender and age, genres joined by "|" and a release_year that
    puts about a fifth of the items at 1997 or later (so every scenario has users)."""
    gen = np.random.default_rng(seed)
    ratings, _, _ = tables(n_users=n_users, n_items=n_items, per_user=(30, 60), seed=seed)
    uid = {u: i + 1 for i, u in enumerate(sorted(set(ratings.user_id)))}
    iid = {s: int(s.removeprefix("sku-")) + 1 for s in set(ratings.item_id)}
    folder = root / "my"
    folder.mkdir(parents=True, exist_ok=True)
    ratings.assign(user_id=ratings.user_id.map(uid), item_id=ratings.item_id.map(iid)).to_csv(
        folder / "ratings.csv", index=False)
    pd.DataFrame({"user_id": range(1, n_users + 1), "gender": gen.choice(["F", "M"], n_users),
                  "age": gen.integers(16, 70, n_users)}).to_csv(folder / "users.csv", index=False)
    genres = ["|".join(sorted(gen.choice(["Action", "Comedy", "Drama", "Horror"], gen.integers(1, 3), replace=False)))
              for _ in range(n_items)]
    pd.DataFrame({"item_id": range(1, n_items + 1), "genres": genres,
                  "release_year": gen.choice([1985, 1991, 1994, 1996, 1997, 1998], n_items,
                                             p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.1])}).to_csv(folder / "items.csv", index=False)
