"""Cold-start scenarios after MeLU (Lee et al., KDD 2019), adapted to MovieLens-100K.

Items are existing or new by release year (MeLU splits ML-1M at 1997/1998); users are existing,
validation or new by a seeded draw. Every task holds one user's ratings within one item partition:
a support set to adapt on and a query set to be judged on.

The warm scenario is where public re-implementations leak: if existing users are evaluated on
ratings they were trained on, "warm" accuracy is training accuracy. Here each existing user's
query ratings are held out before the training task is built, so the warm query is never seen.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Literal

import numpy as np
import pandas as pd

from metarec.data.schema import RatingData
from metarec.errors import ConfigError, LeakageError
from metarec.seeding import rng
from metarec.tasks import SCENARIOS, TASK_COLUMNS


@dataclass(frozen=True)
class SplitConfig:
    new_item_year: int = 1997
    new_user_fraction: float = 0.2
    val_fraction: float = 0.15
    min_ratings: int = 13
    max_ratings: int | None = None
    query_size: int = 10
    query_selection: Literal["random", "latest"] = "random"
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict) -> "SplitConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(params) - known
        if unknown:
            raise ConfigError(f"params.yaml tasks: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
        cfg = cls(**params)
        if not 0 <= cfg.new_user_fraction < 1 or not 0 <= cfg.val_fraction < 1:
            raise ConfigError("params.yaml tasks: new_user_fraction and val_fraction must lie in [0, 1)")
        if cfg.query_size < 1:
            raise ConfigError("params.yaml tasks.query_size must be at least 1")
        if cfg.min_ratings < cfg.query_size + 1:
            raise ConfigError(f"params.yaml tasks.min_ratings ({cfg.min_ratings}) must exceed query_size "
                              f"({cfg.query_size}) so every task keeps a support rating")
        if cfg.query_selection not in ("random", "latest"):
            raise ConfigError(f"params.yaml tasks.query_selection must be 'random' or 'latest', got {cfg.query_selection!r}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Partition:
    """Who and what is new: the sets every split and the leakage guard agree on."""

    new_items: set[int]
    new_users: set[int]
    val_users: set[int]
    train_users: set[int]


def partition(data: RatingData, cfg: SplitConfig) -> Partition:
    items = data.items
    year = pd.to_numeric(items.get("release_year", pd.Series(np.nan, index=items.index)), errors="coerce")
    # Unknown release year: treat as existing (an item without a date cannot be "new" by date).
    new_items = set(items.loc[year >= cfg.new_item_year, "item_id"].astype(int))
    users = np.sort(data.users["user_id"].to_numpy(np.int64))
    order = rng(cfg.seed, "users").permutation(users)
    n_new = int(round(cfg.new_user_fraction * len(order)))
    rest = order[n_new:]
    n_val = int(round(cfg.val_fraction * len(rest)))
    return Partition(new_items=new_items, new_users=set(order[:n_new].tolist()),
                     val_users=set(rest[:n_val].tolist()), train_users=set(rest[n_val:].tolist()))


def _split_query(g: pd.DataFrame, q: int, how: str, gen: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split one user's ratings into (rest, query) with q query rows."""
    if how == "latest":
        g = g.sort_values(["timestamp", "item_id"], kind="stable")
        return g.iloc[:-q], g.iloc[-q:]
    g = g.sort_values("item_id", kind="stable")
    idx = gen.permutation(len(g))
    return g.iloc[np.sort(idx[q:])], g.iloc[np.sort(idx[:q])]


def _rows(g: pd.DataFrame, role: str, task_id: int, scenario: str) -> pd.DataFrame:
    out = g[["user_id", "item_id", "rating", "timestamp"]].copy()
    out["role"] = role
    out["task_id"] = task_id
    out["scenario"] = scenario
    return out


def build_splits(data: RatingData, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    """All splits as long tables (train, val and the four test scenarios)."""
    part = partition(data, cfg)
    ratings = data.ratings.sort_values(["user_id", "item_id"], kind="stable")
    is_new_item = ratings["item_id"].isin(part.new_items)
    gen = rng(cfg.seed, "queries")
    frames: dict[str, list[pd.DataFrame]] = {s: [] for s in ("train", "val", *SCENARIOS)}
    next_id = 0

    def eligible(n: int) -> bool:
        return n >= cfg.min_ratings and (cfg.max_ratings is None or n <= cfg.max_ratings)

    for uid, g_all in ratings.groupby("user_id", sort=True):
        uid = int(uid)
        for new_items, g in ((False, g_all[~is_new_item.loc[g_all.index]]), (True, g_all[is_new_item.loc[g_all.index]])):
            if not eligible(len(g)):
                continue
            rest, query = _split_query(g, cfg.query_size, cfg.query_selection, gen)
            if uid in part.new_users:
                scenario = "user_item_cold" if new_items else "user_cold"
            elif uid in part.val_users:
                if new_items:
                    continue  # validation users only serve early stopping on existing items
                scenario = "val"
            elif new_items:
                scenario = "item_cold"
            else:
                # Existing user, existing items: held-out query is the warm test; the rest trains.
                frames["warm"] += [_rows(rest, "support", next_id, "warm"), _rows(query, "query", next_id, "warm")]
                next_id += 1
                q_train = min(cfg.query_size, max(1, len(rest) // 2))
                t_support, t_query = _split_query(rest, q_train, cfg.query_selection, gen)
                frames["train"] += [_rows(t_support, "support", next_id, "train"), _rows(t_query, "query", next_id, "train")]
                next_id += 1
                continue
            frames[scenario] += [_rows(rest, "support", next_id, scenario), _rows(query, "query", next_id, scenario)]
            next_id += 1

    out = {}
    for name, parts in frames.items():
        f = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(TASK_COLUMNS))
        f = f[list(TASK_COLUMNS)].astype({"task_id": "int64", "user_id": "int64", "item_id": "int64",
                                          "rating": "float64", "timestamp": "int64"})
        out[name] = f.sort_values(["task_id", "role", "item_id"], kind="stable").reset_index(drop=True)
    check_leakage(out, part)
    return out


def check_leakage(splits: dict[str, pd.DataFrame], part: Partition) -> None:
    """Raise LeakageError on any way evaluation data could reach training."""
    for name, f in splits.items():
        both = f.groupby(["task_id", "user_id", "item_id"])["role"].nunique()
        if (both > 1).any():
            t, u, i = both[both > 1].index[0]
            raise LeakageError(f"split {name}: task {t} has user {u}, item {i} in both support and query")
        dup = f.duplicated(["task_id", "item_id"])
        if dup.any():
            r = f[dup].iloc[0]
            raise LeakageError(f"split {name}: task {r.task_id} lists item {r.item_id} twice")
    train = splits["train"]
    bad = train[train["item_id"].isin(part.new_items)]
    if len(bad):
        raise LeakageError(f"split train: new item {int(bad.item_id.iloc[0])} appears in training")
    for who, users in (("new user", part.new_users), ("validation user", part.val_users)):
        bad = train[train["user_id"].isin(users)]
        if len(bad):
            raise LeakageError(f"split train: {who} {int(bad.user_id.iloc[0])} appears in training")
    train_pairs = set(zip(train.user_id.to_numpy().tolist(), train.item_id.to_numpy().tolist()))
    for name in ("val", *SCENARIOS):
        q = splits[name]
        q = q[q["role"] == "query"]
        hit = [p for p in zip(q.user_id.to_numpy().tolist(), q.item_id.to_numpy().tolist()) if p in train_pairs]
        if hit:
            raise LeakageError(f"split {name}: query pair (user {hit[0][0]}, item {hit[0][1]}) is in the training split")
    expect = {"val": (part.val_users, False), "user_cold": (part.new_users, False),
              "user_item_cold": (part.new_users, True), "item_cold": (part.train_users, True),
              "warm": (part.train_users, False)}
    for name, (users, new) in expect.items():
        f = splits[name]
        if len(f) and not f["user_id"].isin(users).all():
            raise LeakageError(f"split {name}: holds users outside its partition, e.g. {int(f.loc[~f.user_id.isin(users), 'user_id'].iloc[0])}")
        if len(f) and not (f["item_id"].isin(part.new_items) == new).all():
            raise LeakageError(f"split {name}: holds items of the wrong partition (expected {'new' if new else 'existing'} items)")


def summary_table(splits: dict[str, pd.DataFrame], users: pd.DataFrame, by: list[tuple[str, pd.Series]]) -> pd.DataFrame:
    """Users, tasks and ratings per split, overall and per group of each given labelling."""
    rows = []
    for name, f in splits.items():
        rows.append({"split": name, "attribute": "all", "group": "all", "users": f.user_id.nunique(),
                     "items": f.item_id.nunique(), "tasks": f.task_id.nunique(), "ratings": len(f)})
        for attr, labels in by:
            lab = f["user_id"].map(labels)
            for group, g in f.groupby(lab, sort=True):
                rows.append({"split": name, "attribute": attr, "group": str(group), "users": g.user_id.nunique(),
                             "items": g.item_id.nunique(), "tasks": g.task_id.nunique(), "ratings": len(g)})
    return pd.DataFrame(rows)
