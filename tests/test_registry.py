"""The metric registry: one entry per reported name, and every name the audit writes is in it."""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest

from audit import registry


def test_every_entry_names_a_function_that_exists() -> None:
    for m in registry.METRICS:
        module, _, attr = m.function.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), m.name


def test_names_are_unique_and_cutoff_families_match_only_integers() -> None:
    names = [m.name for m in registry.METRICS]
    assert len(names) == len(set(names))
    assert registry.lookup("ndcg@5").name == "ndcg@{k}"
    assert registry.lookup("list_ndcg@10").name == "list_ndcg@{k}"
    assert not registry.is_registered("ndcg@")
    assert not registry.is_registered("ndcg@0")
    assert not registry.is_registered("ndcg@k")


@pytest.mark.parametrize("name, sign", [
    ("mae", -1), ("rmse", -1), ("ndcg@3", 1), ("list_ndcg@10", 1), ("recall@10", 1),
    ("arp", -1), ("aplt", 1), ("gini", -1), ("exposure_gini", -1), ("coverage", 1),
    ("n_query", 0), ("delta_ndcg", 0), ("hit_ratio", -1),
])
def test_directions(name: str, sign: int) -> None:
    assert registry.direction(name) == sign
    assert registry.lower_is_better(name) is (sign < 0)


def test_unknown_name_is_refused_with_the_reason() -> None:
    with pytest.raises(KeyError, match=r"metric 'ndgc@5' is not in the metric registry \(audit/registry.py\)"):
        registry.lookup("ndgc@5")
    assert registry.unregistered(["mae", "ndgc@5", "mae", "foo"]) == ["foo", "ndgc@5"]


def test_better_follows_the_direction_and_skips_missing_values() -> None:
    assert registry.better("mae", [0.9, 0.7, float("nan"), None]) == 0.7
    assert registry.better("aplt", [0.1, 0.3]) == 0.3
    assert registry.better("n_query", [1.0, 2.0]) is None


def test_glossary_has_one_row_per_entry_with_a_stable_anchor() -> None:
    rows = registry.glossary(["ndcg@1", "ndcg@5", "mae"])
    assert [r["name"] for r in rows] == ["mae", "ndcg@k"]
    assert rows[1]["anchor"] == "metric-ndcg-k" == registry.anchor("ndcg@10")
    assert all(r["definition"].endswith(".") for r in rows)


def test_every_metric_an_evaluation_writes_is_registered() -> None:
    """One model's evaluation on a small synthetic run: per-user, list and scenario metrics."""
    from audit.evaluation import evaluate_run

    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item_id": np.arange(1, 41), "popularity": rng.integers(0, 50, 40),
                          "genres": rng.choice(["A", "A|B", "C"], 40)})
    pred_rows, rank_rows = [], []
    for u in range(1, 9):
        q = rng.choice(np.arange(1, 41), 6, replace=False)
        pred_rows += [{"user_id": u, "item_id": int(i), "scenario": "warm", "y_true": float(rng.integers(1, 6)),
                       "y_pred": float(rng.uniform(1, 5))} for i in q]
        top = rng.choice(np.arange(1, 41), 10, replace=False)
        rank_rows += [{"user_id": u, "scenario": "warm", "rank": r + 1, "item_id": int(i), "score": 5.0 - r / 10,
                       "n_candidates": 30} for r, i in enumerate(top)]
    per_user, listwise = evaluate_run(pd.DataFrame(pred_rows), pd.DataFrame(rank_rows), items,
                                      {"catalogue_k": 10, "like_threshold": 4, "ndcg_k": [1, 3, 5]},
                                      {"warm": list(range(1, 41))})
    names = set(per_user["metric"]) | set(listwise["metric"])
    assert {"mae", "ndcg@5", "list_ndcg@10", "gini", "coverage", "auc"} <= names
    assert registry.unregistered(names) == []
