"""From prediction files to per-user metrics: the shared first step of every audit stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from audit.metrics import beyond_accuracy, per_user_metrics, pooled_metrics
from audit.strata import strata_for  # noqa: F401  (the stages' one entry to the strata)


def item_table(items: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """item_id, genres, popularity (number of training ratings)."""
    pop = train.groupby("item_id").size()
    out = items[["item_id", "genres"]].copy()
    out["popularity"] = out["item_id"].map(pop).fillna(0).astype(float)
    return out


def evaluate_run(pred: pd.DataFrame, rankings: pd.DataFrame, items: pd.DataFrame, ev: dict,
                 pools: dict[str, list[int]], weights: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-user metrics, seed-level list and pooled metrics) for one model and seed.

    `pools` maps each scenario to its item partition (the catalogue its candidates came from),
    over which coverage and the exposure Gini are computed. Scenarios without predictions (no
    evaluated users) produce no rows rather than an error. `weights` (scenario, user_id, weight):
    the users are a stratified sample (audit.sampling) and the pooled and list metrics count each
    user at its design weight (coverage excepted: audit.metrics.beyond_accuracy says why).
    """
    if pred.empty:  # every scenario empty: nothing to score (an empty scenario simply has no rows)
        return (pd.DataFrame(columns=["user_id", "scenario", "metric", "value"]),
                pd.DataFrame(columns=["scenario", "metric", "value"]))
    n_cand = rankings.groupby(["user_id", "scenario"])["n_candidates"].first().reset_index()
    k = int(ev["catalogue_k"])
    thr = float(ev["like_threshold"])
    pu = per_user_metrics(pred, rankings.drop(columns=["n_candidates"]), n_cand, thr, k=k,
                          ks=tuple(ev.get("ndcg_k", (1, 3, 5))), items=items)
    pooled = pooled_metrics(pred, thr, weights)
    rows = [pooled[pooled.metric.isin(["auc", "precision", "recall"])]]
    pop = items.set_index("item_id")["popularity"]
    genres = items.set_index("item_id")["genres"]
    for scenario, rk in rankings.groupby("scenario", sort=True):
        w = None if weights is None else weights[weights["scenario"] == scenario].set_index("user_id")["weight"]
        b = beyond_accuracy(rk, pop, catalogue=pools[scenario], genres=genres, k=k, weights=w)
        rows.append(pd.DataFrame([{"scenario": scenario, "metric": m, "value": b[m]} for m in ("coverage", "gini")]))
    return pu, pd.concat(rows, ignore_index=True)


def read_run(model: str, seed: int, root: Path = Path(".")) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_parquet(root / f"predictions/{model}/seed{seed}.parquet"),
            pd.read_parquet(root / f"rankings/{model}/seed{seed}.parquet"))
