"""The whole-frame split against the per-user implementation it replaced: identical task tables.

`_reference_splits` is the previous code (one small DataFrame per user), kept here only as the
independent answer; `build_splits` must reproduce it row for row and dtype for dtype, for random and
latest query selection, on MovieLens-100K and on the synthetic source.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from metarec.data.schema import RatingData
from metarec.seeding import rng
from metarec.errors import LeakageError
from metarec.splits import SplitConfig, build_splits, check_leakage, partition
from metarec.tasks import SCENARIOS, TASK_COLUMNS
from tests.test_splits import random_data


def _split_query(g: pd.DataFrame, q: int, how: str, gen: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    if how == "latest":
        g = g.sort_values(["timestamp", "item_id"], kind="stable")
        return g.iloc[:-q], g.iloc[-q:]
    g = g.sort_values("item_id", kind="stable")
    idx = gen.permutation(len(g))
    return g.iloc[np.sort(idx[q:])], g.iloc[np.sort(idx[:q])]


def _rows(g: pd.DataFrame, role: str, task_id: int, scenario: str) -> pd.DataFrame:
    out = g[["user_id", "item_id", "rating", "timestamp"]].copy()
    out["role"], out["task_id"], out["scenario"] = role, task_id, scenario
    return out


def _reference_splits(data: RatingData, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    part = partition(data, cfg)
    ratings = data.ratings.sort_values(["user_id", "item_id"], kind="stable")
    is_new_item = ratings["item_id"].isin(part.new_items)
    gen = rng(cfg.seed, "queries")
    frames: dict[str, list[pd.DataFrame]] = {s: [] for s in ("train", "val", *SCENARIOS)}
    next_id = 0
    for uid, g_all in ratings.groupby("user_id", sort=True):
        new_here = is_new_item.loc[g_all.index]
        for new_items, g in ((False, g_all[~new_here]), (True, g_all[new_here])):
            if not (len(g) >= cfg.min_ratings and (cfg.max_ratings is None or len(g) <= cfg.max_ratings)):
                continue
            rest, query = _split_query(g, cfg.query_size, cfg.query_selection, gen)
            if uid in part.new_users:
                scenario = "user_item_cold" if new_items else "user_cold"
            elif uid in part.val_users:
                if new_items:
                    continue
                scenario = "val"
            elif new_items:
                scenario = "item_cold"
            else:
                frames["warm"] += [_rows(rest, "support", next_id, "warm"), _rows(query, "query", next_id, "warm")]
                next_id += 1
                t_support, t_query = _split_query(rest, min(cfg.query_size, max(1, len(rest) // 2)),
                                                  cfg.query_selection, gen)
                frames["train"] += [_rows(t_support, "support", next_id, "train"),
                                    _rows(t_query, "query", next_id, "train")]
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
    return out


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def assert_same_splits(data: RatingData, cfg: SplitConfig) -> None:
    new, old = build_splits(data, cfg), _reference_splits(data, cfg)
    assert list(new) == list(old)
    for name in old:
        pd.testing.assert_frame_equal(new[name], old[name], check_exact=True, obj=f"split {name}")
        assert _parquet(new[name]) == _parquet(old[name]), name


@pytest.mark.parametrize("selection", ["random", "latest"])
def test_same_tables_as_per_user_code_on_ml100k(ml100k_data, selection: str) -> None:
    assert_same_splits(ml100k_data, SplitConfig(query_selection=selection))


def test_same_tables_on_the_synthetic_source() -> None:
    from metarec.data.synthetic import generate

    data, _ = generate({"seed": 3, "n_users": 300, "n_items": 400, "n_ratings": 20_000})
    assert_same_splits(data, SplitConfig(seed=5))
    assert_same_splits(data, SplitConfig(seed=5, max_ratings=60, query_selection="latest", new_user_fraction=0.4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_tables_on_random_data_with_empty_splits(seed: int) -> None:
    data = random_data(seed)
    assert_same_splits(data, SplitConfig(new_user_fraction=0.0, val_fraction=0.3, min_ratings=11, query_size=5,
                                         seed=seed))
    assert_same_splits(data, SplitConfig(new_item_year=3000, min_ratings=11, query_size=5, seed=seed))


def test_a_warm_query_pair_in_training_is_named() -> None:
    data = random_data(4)
    cfg = SplitConfig(min_ratings=11, query_size=5, seed=4)
    splits, part = build_splits(data, cfg), partition(data, cfg)
    warm = splits["warm"]
    leak = warm[warm.role == "query"].iloc[[3]]
    leaked = {**splits, "train": pd.concat([splits["train"], leak.assign(scenario="train", task_id=10**6)],
                                           ignore_index=True)}
    with pytest.raises(LeakageError, match=rf"split warm: query pair \(user {int(leak.user_id.iloc[0])}, "
                                           rf"item {int(leak.item_id.iloc[0])}\) is in the training split"):
        check_leakage(leaked, part)
