"""Accuracy across seeds and users, and paired comparisons of the meta-learner with every other model.

Per seed, a model's score is the mean over users of each per-user metric (RMSE: the root of the
mean squared error, for a group too), plus pooled AUC/precision/recall. Each accuracy record carries
two intervals, each labelled in the record: over training seeds (Student t over the per-seed values,
task split fixed) and over seeds and users (audit.hierarchical: the evaluated users resampled too).
Comparisons use the seeds-and-users resampling with one draw of users shared by both models, so they
stay paired over users, and are Holm-corrected over every comparison made, as recommended for
recommender evaluation (Ihemelandu & Ekstrand, SIGIR 2023).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from audit.hierarchical import SeedValues, seed_values, seed_values_from_sums, two_level_interval, user_weights
from audit.sampling import stratified_user_weights
from audit.stats import holm, t_interval

LOWER_IS_BETTER = {"mae", "mse", "rmse", "arp", "gini"}
COMPARED = ("mae", "rmse", "ndcg@1", "ndcg@3", "ndcg@5", "list_ndcg@10", "precision@10", "recall@10")
# A seed-level metric computed from another per-user metric: RMSE is the root of the mean squared error.
DERIVED = {"rmse": ("mse", np.sqrt)}
SEEDS_LABEL = "95% Student-t interval over training seeds (task split fixed: the same users every seed)"
USERS_LABEL = ("95% interval over seeds and users: users resampled ({n_boot} bootstrap draws, the same draw for "
               "every model) plus the spread over seeds, t quantile with Satterthwaite df")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def _means(frame: pd.DataFrame, keys: list[str], weights: pd.DataFrame | None) -> pd.DataFrame:
    """Mean of `value` per keys; with `weights` (scenario, user_id, weight: a sampled evaluation's
    design weights, audit.sampling) the weighted, i.e. stratified, mean over the finite values."""
    if weights is None:
        return frame.groupby(keys, sort=True)["value"].mean().reset_index()
    f = frame.merge(weights, on=["scenario", "user_id"], how="left")
    w = f["weight"].where(f["value"].notna(), 0.0)
    f = f.assign(_wv=w * f["value"].fillna(0.0), _w=w)
    sums = f.groupby(keys, sort=True)[["_wv", "_w"]].sum()
    return (sums["_wv"] / sums["_w"]).rename("value").reset_index()


def seed_level(per_user: pd.DataFrame, weights: pd.DataFrame | None = None) -> pd.DataFrame:
    """[model, seed, scenario, metric, value]: per-seed means over users (RMSE from MSE); stratified
    means when `weights` holds a sampled evaluation's design weights."""
    keys = ["model", "seed", "scenario", "metric"]
    means = _means(per_user, keys, weights)
    mse = means[means.metric == "mse"].assign(metric="rmse", value=lambda f: np.sqrt(f["value"]))
    means = means[means.metric != "rmse"]
    return pd.concat([means, mse], ignore_index=True).sort_values(keys, kind="stable").reset_index(drop=True)


def group_level(per_user: pd.DataFrame, strata: pd.DataFrame, attributes: Sequence[str],
                weights: pd.DataFrame | None = None) -> pd.DataFrame:
    """[model, seed, scenario, attribute, group, metric, value]: per-seed group means.

    A group's RMSE is the root of the group's mean squared error (issue 12: one definition per name),
    not the mean of its users' RMSEs.
    """
    parts = []
    for a in attributes:
        f = per_user.merge(strata[["user_id", a]], on="user_id", how="left").rename(columns={a: "group"})
        g = _means(f, ["model", "seed", "scenario", "group", "metric"], weights)
        mse = g[g.metric == "mse"].assign(metric="rmse", value=lambda x: np.sqrt(x["value"]))
        g = pd.concat([g[g.metric != "rmse"], mse], ignore_index=True)
        parts.append(g.assign(attribute=a))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


class UserSeedCube:
    """Per-user values as users x seeds matrices per (scenario, model, metric), with one shared
    bootstrap draw of the scenario's evaluated users (audit.hierarchical). Every matrix of a scenario
    goes through the draw in one matrix product.

    `design` (scenario, user_id, stratum, weight; audit.sampling.Design.sampled rows): the evaluated
    users are a stratified sample, so the draw resamples within strata with design weights and the
    per-seed values are stratified means. None: every user counts once (the unsampled audit)."""

    def __init__(self, per_user: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                 design: pd.DataFrame | None = None) -> None:
        self.n_boot = int(n_boot)
        self.seeds = sorted(per_user["seed"].unique().tolist())
        self.users: dict[str, pd.Index] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.unit: dict[str, np.ndarray | None] = {}
        self._cells: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for i, (scenario, f) in enumerate(per_user.groupby("scenario", sort=True)):
            wide = f.groupby(["user_id", "model", "metric", "seed"], sort=True)["value"].mean().unstack(
                ["model", "metric", "seed"])
            cells = wide.columns.droplevel("seed").unique()
            wide = wide.reindex(columns=pd.MultiIndex.from_tuples(
                [(m, k, s) for m, k in cells for s in self.seeds], names=wide.columns.names))
            x = wide.to_numpy(np.float64)
            ok = np.isfinite(x)
            x0 = np.where(ok, x, 0.0)
            unit = None
            if design is None:
                w = user_weights(len(wide.index), self.n_boot, [int(seed), i])
            else:
                d = design[design.scenario == scenario].set_index("user_id").reindex(wide.index)
                if d["weight"].isna().any():
                    raise ValueError(f"scenario {scenario}: user {d.index[d['weight'].isna()][0]} has predictions "
                                     f"but is not in the drawn sample")
                unit = d["weight"].to_numpy(np.float64)
                w = stratified_user_weights(d["stratum"].to_numpy(), unit, self.n_boot, [int(seed), i])
            sums, counts = w @ x0, w @ ok.astype(np.float64)
            self.users[scenario], self.weights[scenario], self.unit[scenario] = wide.index, w, unit
            n = len(self.seeds)
            for j, (model, metric) in enumerate(cells):
                c = slice(j * n, (j + 1) * n)
                self._cells[(scenario, model, metric)] = (x[:, c], ok[:, c], sums[:, c], counts[:, c])

    def matrix(self, scenario: str, model: str, metric: str) -> np.ndarray | None:
        """users x seeds for one cell (NaN where a user has no value), or None when absent."""
        cell = self._cells.get((scenario, model, metric))
        return None if cell is None else cell[0]

    def values(self, scenario: str, model: str, metric: str, mask: np.ndarray | None = None) -> SeedValues | None:
        """Per-seed values and replicates of a metric (RMSE from MSE); `mask` restricts the cells used."""
        source, transform = DERIVED.get(metric, (metric, None))
        cell = self._cells.get((scenario, model, source))
        if cell is None:
            return None
        x, ok, sums, counts = cell
        if mask is None or np.array_equal(mask & ok, ok):
            return seed_values_from_sums(np.where(ok, x, 0.0), ok, sums, counts, transform, self.unit[scenario])
        return seed_values(x, self.weights[scenario], transform, mask, self.unit[scenario])


def accuracy_records(seed_values_frame: pd.DataFrame, cube: UserSeedCube | None = None) -> list[dict]:
    """One record per model, scenario and metric: mean over seeds, the interval over training seeds
    (`ci_low/ci_high`, `interval`) and, for per-user metrics, over seeds and users
    (`ci_users_low/ci_users_high`, `interval_users`). Pooled metrics (AUC, coverage, Gini...) have no
    per-user values: their users interval is null and `interval_users` says why."""
    recs = []
    for (model, scenario, metric), g in seed_values_frame.groupby(["model", "scenario", "metric"], sort=True):
        g = g.sort_values("seed")
        ti = t_interval(g["value"].to_numpy())
        rec = {"kind": "accuracy", "model": model, "scenario": scenario, "metric": metric,
               "mean": ti["mean"], "std": ti["std"], "ci_low": ti["ci_low"], "ci_high": ti["ci_high"],
               "interval": SEEDS_LABEL, "n_seeds": ti["n"], "seeds": g["seed"].tolist(), "values": g["value"].tolist(),
               "note": ti["note"], "ci_users_low": None, "ci_users_high": None, "se_users": None, "n_users": None,
               "interval_users": "not available: a pooled metric has no per-user values to resample"}
        v = cube.values(scenario, model, metric) if cube is not None else None
        if v is not None:
            tl = two_level_interval(v)
            rec.update(ci_users_low=_finite(tl["ci_low"]), ci_users_high=_finite(tl["ci_high"]),
                       se_users=_finite(tl["se"]), n_users=tl["n_users"],
                       interval_users=USERS_LABEL.format(n_boot=cube.n_boot) + (f" ({tl['note']})" if tl["note"] else ""))
        recs.append(rec)
    return recs


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def comparison_records(cube: UserSeedCube, meta: str, models: Iterable[str], *, metrics: Sequence[str] = COMPARED,
                       alpha: float = 0.05) -> list[dict]:
    """meta vs each other model, per scenario and metric: paired over users (one bootstrap draw of
    users for both models, cells finite for both), intervals over seeds and users, Holm over all."""
    recs = []
    for other in models:
        if other == meta:
            continue
        for scenario in sorted(cube.users):
            for metric in metrics:
                source = DERIVED.get(metric, (metric, None))[0]
                a, b = cube.matrix(scenario, meta, source), cube.matrix(scenario, other, source)
                if a is None or b is None:
                    continue
                both = np.isfinite(a) & np.isfinite(b)
                va, vb = cube.values(scenario, meta, metric, both), cube.values(scenario, other, metric, both)
                res = two_level_interval(va - vb)
                n_both = both.sum(axis=1)
                user_diff = np.where(both, a - b, 0.0).sum(axis=1)[n_both > 0] / n_both[n_both > 0]
                sd = float(user_diff.std(ddof=1)) if user_diff.size >= 2 else np.nan
                recs.append({"kind": "comparison", "scenario": scenario, "metric": metric, "model": meta,
                             "baseline": other, "mean_diff": res["estimate"], "ci_low": res["ci_low"],
                             "ci_high": res["ci_high"], "interval": USERS_LABEL.format(n_boot=cube.n_boot)
                             + "; paired over users; not adjusted for multiplicity",
                             "p_value": res["p_value"], "df": res["df"],
                             "effect_size": float(user_diff.mean() / sd) if sd and np.isfinite(sd) and sd > 0 else None,
                             "n_users": res["n_users"], "n_seeds": res["n_seeds"]})
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
                                           "interval", "p_value", "p_holm", "effect_size", "n_users", "significant",
                                           "better")},
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
                     "mean": best["mean"], "ci_low": best["ci_low"], "ci_high": best["ci_high"],
                     "ci_users_low": best.get("ci_users_low"), "ci_users_high": best.get("ci_users_high")})
    return recs
