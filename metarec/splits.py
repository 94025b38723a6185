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
from typing import Callable, Literal

import numpy as np
import pandas as pd

from metarec.data.schema import RatingData
from metarec.errors import DataError, LeakageError
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
        """From params.yaml's `tasks`, checked against its declared schema (metarec.config.TasksConfig)."""
        from metarec.config import TasksConfig, validated

        return cls(**validated(TasksConfig, params or {}, prefix=("tasks",)).model_dump())

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


# Which users and which item partition each split draws on (existing users = the training users).
_WHO = {"train": ("train", False), "val": ("val", False), "warm": ("train", False),
        "user_cold": ("new", False), "item_cold": ("train", True), "user_item_cold": ("new", True)}
_WHO_TEXT = {"train": "training users", "val": "validation users", "new": "new users"}


@dataclass(frozen=True)
class Coverage:
    """How many users one split can have: before (`candidates`) and after the rating-count bounds.

    `empty` says why a split has no users or items by construction (no new item, no new user), or
    is None. A split that has candidates but no eligible user is the min_ratings problem that the
    prepare stage refuses (`check_coverage`), not an empty scenario.
    """

    split: str
    candidates: int
    eligible: int
    empty: str | None

    @property
    def lost(self) -> int:
        return self.candidates - self.eligible


def _no_new_items_reason(data: RatingData, cfg: SplitConfig) -> str:
    year = pd.to_numeric(data.items.get("release_year", pd.Series(np.nan, index=data.items.index)), errors="coerce")
    if year.isna().all():
        return "the items have no release_year, so no item is new and there are no item-cold scenarios"
    return f"no item has release_year >= {cfg.new_item_year}"


def coverage(data: RatingData, cfg: SplitConfig) -> dict[str, Coverage]:
    """Per split (train, val and the four scenarios): candidate and eligible users, or why empty."""
    part = partition(data, cfg)
    counts = data.ratings.assign(new=data.ratings["item_id"].isin(part.new_items)).groupby(["new", "user_id"]).size()
    users = {"train": part.train_users, "val": part.val_users, "new": part.new_users}
    n_items = len(data.items)
    out = {}
    for split, (who, new) in _WHO.items():
        per_user = counts.loc[new] if new in counts.index.get_level_values(0) else pd.Series(dtype=int)
        per_user = per_user[per_user.index.isin(users[who])]
        eligible = int(((per_user >= cfg.min_ratings)
                        & (per_user <= (cfg.max_ratings if cfg.max_ratings is not None else np.inf))).sum())
        empty = None
        if new and not part.new_items:
            empty = _no_new_items_reason(data, cfg)
        elif not new and len(part.new_items) == n_items:
            empty = f"every item has release_year >= {cfg.new_item_year}, so no item is existing"
        elif not users[who]:
            key = "val_fraction" if who == "val" else "new_user_fraction"
            empty = f"no user is a {_WHO_TEXT[who][:-1]} (tasks.{key} is {getattr(cfg, key):g})"
        elif not len(per_user):
            empty = f"no {_WHO_TEXT[who][:-1]} rated an item that is {'new' if new else 'existing'}"
        out[split] = Coverage(split, int(len(per_user)), eligible, empty)
    return out


def check_coverage(cov: dict[str, Coverage], cfg: SplitConfig) -> None:
    """Refuse a configuration under which a split that has candidates keeps no user.

    Why at prepare: otherwise the failure surfaces at `train` ("no ratings to fit on") or in a later
    stage, far from its cause, which is tasks.min_ratings (or max_ratings) against this data.
    """
    bounds = (f"at least {cfg.min_ratings}" if cfg.max_ratings is None
              else f"between {cfg.min_ratings} and {cfg.max_ratings}")
    key = "tasks.min_ratings" if cfg.max_ratings is None else "tasks.min_ratings/max_ratings"
    if cov["train"].empty:
        raise DataError(f"params.yaml: the training split has no users because {cov['train'].empty}; expected "
                        f"existing users rating existing items (check tasks.new_item_year and the items' release_year)")
    for split, c in cov.items():
        if c.empty is None and c.eligible == 0:
            who, new = _WHO[split]
            raise DataError(f"params.yaml: {key} leaves split {split!r} without users: none of its {c.candidates} "
                            f"{_WHO_TEXT[who]} has {bounds} ratings of {'new' if new else 'existing'} items, so "
                            f"all {c.lost} are lost; expected at least one user who meets {key}")


def coverage_lines(cov: dict[str, Coverage], cfg: SplitConfig) -> list[str]:
    """One line per split: users kept and lost to the rating-count bounds; empty splits that share a
    reason are named together in one line, so "no item is new" is said once, not per scenario."""
    lines = []
    reasons: dict[str, list[str]] = {}
    for split, c in cov.items():
        if c.empty:
            reasons.setdefault(c.empty, []).append(split)
    lines += [f"{', '.join(splits)}: empty, {reason}" for reason, splits in reasons.items()]
    for split, c in cov.items():
        if not c.empty:
            bounds = "" if cfg.max_ratings is None else f" and max_ratings {cfg.max_ratings}"
            lines.append(f"{split}: {c.eligible} of {c.candidates} users meet tasks.min_ratings {cfg.min_ratings}"
                         f"{bounds} ({c.lost} lost)")
    return lines


def _group_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end row of each run of equal keys in an array sorted by key."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    return starts, np.r_[starts[1:], len(keys)].astype(np.int64)


def _query_picker(r: pd.DataFrame, how: str, gen: np.random.Generator) -> Callable[[np.ndarray, int], np.ndarray]:
    """`pick(rows, q)` -> the q query rows among `rows` (row positions of one user's ratings within
    one item partition, in item order).

    "random" draws `gen.permutation(len(rows))` and takes its first q positions, one draw per call
    in call order, which is what keeps the split a function of the seed alone. "latest" takes the
    q newest rows (by timestamp, then item id), and draws nothing.
    """
    if how == "latest":
        # rank of each row in (timestamp, item_id) order: the newest q of any subset are its top ranks
        rank = np.empty(len(r), dtype=np.int64)
        rank[np.lexsort((r["item_id"].to_numpy(), r["timestamp"].to_numpy()))] = np.arange(len(r))

        def pick(rows: np.ndarray, q: int) -> np.ndarray:
            return rows[np.argsort(rank[rows])[len(rows) - q:]]
    else:
        def pick(rows: np.ndarray, q: int) -> np.ndarray:
            return rows[gen.permutation(len(rows))[:q]]
    return pick


def build_splits(data: RatingData, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    """All splits as long tables (train, val and the four test scenarios).

    Each user's ratings within one item partition (existing or new items) form a group; groups are
    visited in (user, partition) order. An eligible group becomes a task of its scenario with
    `query_size` query rows; an existing user's existing-item group becomes a warm task and, from
    its support rows, a training task. Why the loop only draws row positions and every table is
    built once at the end: building small frames per user cost milliseconds per user.
    """
    part = partition(data, cfg)
    r = data.ratings.sort_values(["user_id", "item_id"], kind="stable")
    r = r.assign(_new=r["item_id"].isin(part.new_items)).sort_values(["user_id", "_new"], kind="stable")
    r = r.reset_index(drop=True)
    users = r["user_id"].to_numpy(np.int64)
    is_new = r["_new"].to_numpy(bool)
    starts, ends = _group_bounds(users * 2 + is_new)
    pick = _query_picker(r, cfg.query_selection, rng(cfg.seed, "queries"))
    q = cfg.query_size
    upper = np.inf if cfg.max_ratings is None else cfg.max_ratings
    scenario_of = {("new", False): "user_cold", ("new", True): "user_item_cold", ("val", False): "val",
                   ("train", True): "item_cold", ("train", False): "warm"}
    # per split: the row positions of its tasks, their task ids and whether each row is a query row
    rows: dict[str, list[np.ndarray]] = {s: [] for s in ("train", "val", *SCENARIOS)}
    ids: dict[str, list[np.ndarray]] = {s: [] for s in rows}
    queries: dict[str, list[np.ndarray]] = {s: [] for s in rows}

    marked = np.zeros(len(r), dtype=bool)  # scratch: the query rows of the task being added

    def add(split: str, task_rows: np.ndarray, query: np.ndarray, task_id: int) -> np.ndarray:
        """Record one task; returns its support rows."""
        marked[query] = True
        is_query = marked[task_rows]
        marked[query] = False
        rows[split].append(task_rows)
        ids[split].append(np.full(len(task_rows), task_id, dtype=np.int64))
        queries[split].append(is_query)
        return task_rows[~is_query]

    next_id = 0
    for a, b in zip(starts.tolist(), ends.tolist()):
        if not cfg.min_ratings <= b - a <= upper:
            continue
        group = np.arange(a, b)
        query = pick(group, q)
        uid, new_items = int(users[a]), bool(is_new[a])
        who = "new" if uid in part.new_users else "val" if uid in part.val_users else "train"
        if who == "val" and new_items:
            continue  # validation users only serve early stopping on existing items
        scenario = scenario_of[(who, new_items)]
        rest = add(scenario, group, query, next_id)
        next_id += 1
        if scenario == "warm":
            # Existing user, existing items: the held-out query is the warm test; the rest trains.
            add("train", rest, pick(rest, min(q, max(1, len(rest) // 2))), next_id)
            next_id += 1

    out = {}
    for name in rows:
        if rows[name]:
            at = np.concatenate(rows[name])
            f = r.iloc[at][["user_id", "item_id", "rating", "timestamp"]].reset_index(drop=True)
            f["role"] = np.where(np.concatenate(queries[name]), "query", "support").astype(object)
            f["task_id"] = np.concatenate(ids[name])
            f["scenario"] = name
        else:
            f = pd.DataFrame(columns=list(TASK_COLUMNS))
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
    # (user, item) pairs as one int64 each, compared with isin: a set of tuples costs ~100 bytes a rating
    width = 1 + max([int(f["item_id"].max()) for f in splits.values() if len(f)] + [0])
    train_pairs = train["user_id"].to_numpy(np.int64) * width + train["item_id"].to_numpy(np.int64)
    for name in ("val", *SCENARIOS):
        q = splits[name]
        q = q[q["role"] == "query"]
        keys = pd.Series(q["user_id"].to_numpy(np.int64) * width + q["item_id"].to_numpy(np.int64))
        hit = np.flatnonzero(keys.isin(train_pairs).to_numpy())  # a hash table: np.isin sorts both sides
        if len(hit):
            raise LeakageError(f"split {name}: query pair (user {int(q['user_id'].iloc[hit[0]])}, "
                               f"item {int(q['item_id'].iloc[hit[0]])}) is in the training split")
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
