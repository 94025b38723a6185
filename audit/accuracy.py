"""Accuracy across seeds and paired comparisons of the meta-learner with every other model.

Per seed, a model's score is the mean over users of each per-user metric (RMSE: the root of the
mean squared error), plus pooled AUC/precision/recall. Across seeds: mean, sd and a t-interval.
Comparisons pair users (each user's value averaged over seeds) and are Holm-corrected over every
comparison made, as recommended for recommender evaluation (Ihemelandu & Ekstrand, SIGIR 2023).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from audit.stats import holm, paired_comparison, t_interval

LOWER_IS_BETTER = {"mae", "mse", "rmse", "arp", "gini"}
COMPARED = ("mae", "rmse", "ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "precision@10", "recall@10")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def seed_level(per_user: pd.DataFrame) -> pd.DataFrame:
    """[model, seed, scenario, metric, value]: per-seed means over users (RMSE from MSE)."""
    keys = ["model", "seed", "scenario", "metric"]
    means = per_user.groupby(keys, sort=True)["value"].mean().reset_index()
    mse = means[means.metric == "mse"].assign(metric="rmse", value=lambda f: np.sqrt(f["value"]))
    means = means[means.metric != "rmse"]
    return pd.concat([means, mse], ignore_index=True).sort_values(keys, kind="stable").reset_index(drop=True)


def group_level(per_user: pd.DataFrame, strata: pd.DataFrame, attributes: Sequence[str]) -> pd.DataFrame:
    """[model, seed, scenario, attribute, group, metric, value]: per-seed group means."""
    parts = []
    for a in attributes:
        f = per_user.merge(strata[["user_id", a]], on="user_id", how="left").rename(columns={a: "group"})
        g = f.groupby(["model", "seed", "scenario", "group", "metric"], sort=True)["value"].mean().reset_index()
        mse = g[g.metric == "mse"].assign(metric="rmse", value=lambda x: np.sqrt(x["value"]))
        g = pd.concat([g[g.metric != "rmse"], mse], ignore_index=True)
        parts.append(g.assign(attribute=a))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def accuracy_records(seed_values: pd.DataFrame) -> list[dict]:
    recs = []
    for (model, scenario, metric), g in seed_values.groupby(["model", "scenario", "metric"], sort=True):
        g = g.sort_values("seed")
        ti = t_interval(g["value"].to_numpy())
        recs.append({"kind": "accuracy", "model": model, "scenario": scenario, "metric": metric,
                     "mean": ti["mean"], "std": ti["std"], "ci_low": ti["ci_low"], "ci_high": ti["ci_high"],
                     "n_seeds": ti["n"], "seeds": g["seed"].tolist(), "values": g["value"].tolist(),
                     "note": ti["note"]})
    return recs


def comparison_records(per_user: pd.DataFrame, meta: str, models: Iterable[str], *, metrics: Sequence[str] = COMPARED,
                       alpha: float = 0.05, n_perm: int = 1000, seed: int = 0) -> list[dict]:
    """meta vs each other model, per scenario and metric: paired over users, Holm over all."""
    user_means = per_user.groupby(["model", "scenario", "metric", "user_id"])["value"].mean()
    recs = []
    for other in models:
        if other == meta:
            continue
        for scenario in sorted(per_user["scenario"].unique()):
            for i, metric in enumerate(metrics):
                try:
                    a = user_means.loc[(meta, scenario, metric)]
                    b = user_means.loc[(other, scenario, metric)]
                except KeyError:
                    continue
                a, b = a.align(b, join="inner")
                res = paired_comparison(a.to_numpy(), b.to_numpy(), n_perm=n_perm, seed=seed + i)
                recs.append({"kind": "comparison", "scenario": scenario, "metric": metric, "model": meta,
                             "baseline": other, "mean_diff": res["mean_diff"], "ci_low": res["ci_low"],
                             "ci_high": res["ci_high"], "p_value": res["p_ttest"], "p_perm": res["p_perm"],
                             "effect_size": res["effect_size"], "n_users": res["n"]})
    adjusted = holm([r["p_value"] for r in recs])
    for r, p in zip(recs, adjusted):
        r["p_holm"] = float(p) if np.isfinite(p) else None
        r["significant"] = bool(np.isfinite(p) and p < alpha)
        better_sign = -1 if lower_is_better(r["metric"]) else 1
        if not r["significant"]:
            r["better"] = "tie"
        else:
            r["better"] = "model" if better_sign * r["mean_diff"] > 0 else "baseline"
    return recs


def best_baseline_records(accuracy: list[dict], comparisons: list[dict], meta: str) -> list[dict]:
    """Per scenario and metric: the best other model by mean and how the meta-learner fares."""
    acc = pd.DataFrame([r for r in accuracy if r["model"] != meta])
    recs = []
    if acc.empty:
        return recs
    comp = {(c["scenario"], c["metric"], c["baseline"]): c for c in comparisons}
    for (scenario, metric), g in acc.groupby(["scenario", "metric"], sort=True):
        g = g.dropna(subset=["mean"])
        if g.empty:
            continue
        best = g.loc[g["mean"].idxmin() if lower_is_better(metric) else g["mean"].idxmax()]
        c = comp.get((scenario, metric, best["model"]))
        if c is None:
            continue
        recs.append({**{k: c[k] for k in ("scenario", "metric", "model", "baseline", "mean_diff", "ci_low", "ci_high",
                                           "p_value", "p_holm", "effect_size", "n_users", "significant", "better")},
                     "kind": "best_baseline_comparison",
                     "relative_diff": float(c["mean_diff"] / best["mean"]) if best["mean"] else None,
                     "significantly_worse": bool(c["better"] == "baseline"),
                     "significantly_better": bool(c["better"] == "model")})
    return recs


def winner_records(accuracy: list[dict]) -> list[dict]:
    """Who has the best mean per scenario and metric (ties in the interval are shown by the report)."""
    acc = pd.DataFrame(accuracy).dropna(subset=["mean"])
    recs = []
    for (scenario, metric), g in acc.groupby(["scenario", "metric"], sort=True):
        best = g.loc[g["mean"].idxmin() if lower_is_better(metric) else g["mean"].idxmax()]
        recs.append({"kind": "winner", "scenario": scenario, "metric": metric, "model": best["model"],
                     "mean": best["mean"], "ci_low": best["ci_low"], "ci_high": best["ci_high"]})
    return recs
