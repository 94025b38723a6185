"""Group fairness of per-user metrics, user-oriented group fairness (UGF), parity of liked
predictions, item exposure and miscalibration, and the fairness.json records (DESIGN.md).

Point estimates per group come from fairlearn's MetricFrame over one row per user (metric = mean
of the per-user value). Intervals come from a bootstrap over users resampled within their group
(audit.stats; fairlearn's own bootstrap is not stratified). "Is there a gap" is answered by a
permutation test on group labels, since the bootstrap interval of max - min leans away from zero
when the groups are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
)

from audit import stats
from audit.metrics import gini, short_head
from audit.strata import Strata

__all__ = [
    "GroupComparison",
    "group_comparison",
    "ugf",
    "parity",
    "exposure",
    "genre_mix",
    "miscalibration_per_user",
    "fairness_records",
]


def _sub(seed: int, tag: int) -> int:
    """Independent, reproducible sub-seed for one use of the seed."""
    return int(np.random.SeedSequence([int(seed), int(tag)]).generate_state(1)[0])


def _mean(y_true, y_pred) -> float:
    """MetricFrame metric: the per-user values are passed as y_true; the group value is their mean."""
    return float(np.mean(np.asarray(y_true, dtype=float)))


def _f(x) -> float | None:
    """JSON-safe float: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# (a) group metrics, gaps, gap to the rest
# --------------------------------------------------------------------------------------------


@dataclass
class GroupComparison:
    """Per-group means with intervals and gaps for one metric and one attribute.

    ``table``: group, value, ci_low, ci_high, n, gap (group - rest), gap_ci_low, gap_ci_high,
    gap_p_value. ``difference`` = max - min of group means (fairlearn between_groups),
    ``ratio`` = min / max; intervals are stratified-bootstrap percentiles; ``p_value`` is the
    permutation p of max - min.
    """

    table: pd.DataFrame
    overall: float
    difference: float
    diff_ci_low: float
    diff_ci_high: float
    ratio: float
    ratio_ci_low: float
    ratio_ci_high: float
    p_value: float
    max_group: str
    min_group: str
    n_groups: int


def _align(values: pd.Series, groups: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Join user-indexed values and groups; drop users without a finite value or a group."""
    df = pd.DataFrame({"v": values.astype(float)}).join(groups.rename("g"), how="inner")
    df = df[np.isfinite(df["v"]) & df["g"].notna()]
    return df["v"].to_numpy(), df["g"].astype(str).reset_index(drop=True)


def group_comparison(
    values: pd.Series, groups: pd.Series, *, n_boot: int = 1000, n_perm: int = 1000,
    seed: int = 0, level: float = 0.95,
) -> GroupComparison:
    """Compare groups on one per-user metric (both Series indexed by user_id)."""
    v, g = _align(values, groups)
    if v.size == 0:
        raise ValueError("no user has both a finite metric value and a group.")
    mf = MetricFrame(metrics=_mean, y_true=v, y_pred=v, sensitive_features=g.rename("group"))
    by = mf.by_group.astype(float)
    labels = [str(x) for x in by.index]
    gv = stats.group_codes(v, g)
    assert gv.labels == sorted(labels)
    order = [gv.labels.index(x) for x in labels]
    counts = gv.counts[order].astype(float)
    N = counts.sum()
    sums = by.to_numpy() * counts
    rest_n = N - counts
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = by.to_numpy() - (sums.sum() - sums) / rest_n

    # stratified bootstrap: replicate group means -> difference, ratio, gap to rest
    _, bm, _ = stats.stratified_bootstrap_group_means(v, g, n_boot=n_boot, seed=_sub(seed, 1))
    bm = bm[:, order]
    bsum = bm * counts
    with np.errstate(divide="ignore", invalid="ignore"):
        b_gap = bm - (bsum.sum(axis=1, keepdims=True) - bsum) / rest_n
        b_diff = bm.max(axis=1) - bm.min(axis=1)
        b_ratio = bm.min(axis=1) / bm.max(axis=1)
    ci = np.array([stats.percentile_interval(bm[:, j], level) for j in range(len(labels))])
    gci = np.array([stats.percentile_interval(b_gap[:, j], level) if rest_n[j] > 0
                    else (np.nan, np.nan) for j in range(len(labels))])
    dlo, dhi = stats.percentile_interval(b_diff, level) if len(labels) > 1 else (np.nan, np.nan)
    rlo, rhi = stats.percentile_interval(b_ratio, level) if len(labels) > 1 else (np.nan, np.nan)

    # permutation test: max - min and |gap to rest| under shuffled labels (same permutations)
    if len(labels) > 1:
        pm = stats.permuted_group_means(gv, n_perm=n_perm, seed=_sub(seed, 2))[:, order]
        psum = pm * counts
        p_gap = np.abs(pm - (psum.sum(axis=1, keepdims=True) - psum) / rest_n)
        p_diff = stats._perm_p(float(by.max() - by.min()), pm.max(axis=1) - pm.min(axis=1))
        gap_p = [stats._perm_p(abs(gap[j]), p_gap[:, j]) for j in range(len(labels))]
    else:
        p_diff, gap_p = np.nan, [np.nan] * len(labels)

    table = pd.DataFrame({
        "group": labels, "value": by.to_numpy(), "ci_low": ci[:, 0], "ci_high": ci[:, 1],
        "n": counts.astype(int), "gap": gap, "gap_ci_low": gci[:, 0], "gap_ci_high": gci[:, 1],
        "gap_p_value": gap_p,
    })
    return GroupComparison(
        table=table, overall=float(mf.overall), difference=float(mf.difference()),
        diff_ci_low=float(dlo), diff_ci_high=float(dhi), ratio=float(mf.ratio()),
        ratio_ci_low=float(rlo), ratio_ci_high=float(rhi), p_value=float(p_diff),
        max_group=str(by.idxmax()), min_group=str(by.idxmin()), n_groups=len(labels),
    )


# --------------------------------------------------------------------------------------------
# (b) UGF
# --------------------------------------------------------------------------------------------


def ugf(
    values: pd.Series, interaction_counts: pd.Series, *, top_frac: float = 0.05,
    n_boot: int = 1000, n_perm: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict:
    """User-oriented group fairness (Li et al., WWW 2021).

    Advantaged = the top ``top_frac`` of the users that have a finite value, by interaction count
    (ties by user_id; at least one user); UGF = |mean(advantaged) - mean(rest)|. The interval for
    UGF is the one implied for |d| by the stratified bootstrap interval of the signed difference
    d; p from a permutation test on |d|.
    """
    v = values.astype(float)
    v = v[np.isfinite(v)]
    df = pd.DataFrame({"v": v, "c": interaction_counts.reindex(v.index).fillna(0).astype(float)})
    df = df.rename_axis("user_id").reset_index()
    df = df.sort_values(["c", "user_id"], ascending=[False, True], kind="stable")
    n_adv = max(1, int(math.ceil(top_frac * len(df))))
    adv, dis = df["v"].iloc[:n_adv].to_numpy(), df["v"].iloc[n_adv:].to_numpy()
    out = {"advantaged": _f(adv.mean()) if adv.size else None,
           "disadvantaged": _f(dis.mean()) if dis.size else None,
           "n_advantaged": int(adv.size), "n_disadvantaged": int(dis.size),
           "ugf": None, "ci_low": None, "ci_high": None, "p_value": None,
           "min_interactions_advantaged": _f(df["c"].iloc[n_adv - 1]) if len(df) else None}
    if adv.size == 0 or dis.size == 0:
        return out
    d, lo, hi = stats.bootstrap_group_difference_ci(adv, dis, n_boot=n_boot, seed=_sub(seed, 3),
                                                    level=level)
    _, p = stats.permutation_test_two_groups(adv, dis, n_perm=n_perm, seed=_sub(seed, 4))
    alo, ahi = stats.abs_interval(lo, hi)
    out.update(ugf=_f(abs(d)), ci_low=_f(alo), ci_high=_f(ahi), p_value=_f(p),
               difference=_f(d))
    return out


# --------------------------------------------------------------------------------------------
# (c) parity of liked predictions
# --------------------------------------------------------------------------------------------


def _parity_stats(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DP and worst-case EO differences from group sums (..., G, 6) of (n, pp, pos, tp, neg, fp)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sr = sums[..., 1] / sums[..., 0]
        tpr = sums[..., 3] / sums[..., 2]
        fpr = sums[..., 5] / sums[..., 4]
    rng_ = lambda x: np.nanmax(x, axis=-1) - np.nanmin(x, axis=-1)  # noqa: E731
    with np.errstate(invalid="ignore"):
        return rng_(sr), np.fmax(rng_(tpr), rng_(fpr))


def parity(
    pred: pd.DataFrame, groups: pd.Series, *, threshold: float = 4.0, n_perm: int = 1000,
    seed: int = 0,
) -> dict:
    """Demographic parity and equalized odds differences of liked predictions.

    liked_pred = y_pred >= threshold, liked_true = y_true >= threshold; values from fairlearn
    (between_groups, worst_case). p-values: group labels are shuffled between *users* (a user's
    ratings stay together, so within-user correlation is kept), vectorised over permutations.
    """
    df = pred[["user_id", "y_true", "y_pred"]].merge(
        groups.rename("g").rename_axis("user_id").reset_index(), on="user_id", how="inner")
    df = df[df["g"].notna()]
    out = {"demographic_parity_difference": None, "equalized_odds_difference": None,
           "p_dp": None, "p_eo": None, "n_groups": int(df["g"].nunique())}
    if df.empty or df["g"].nunique() < 2:
        return out
    yt = (df["y_true"].to_numpy(float) >= threshold).astype(int)
    yp = (df["y_pred"].to_numpy(float) >= threshold).astype(int)
    sf = df["g"].astype(str).to_numpy()
    dp = demographic_parity_difference(yt, yp, sensitive_features=sf)
    eo = equalized_odds_difference(yt, yp, sensitive_features=sf)

    per = pd.DataFrame({"user_id": df["user_id"].to_numpy(), "g": sf, "n": 1, "pp": yp,
                        "pos": yt, "tp": yt * yp, "neg": 1 - yt, "fp": (1 - yt) * yp})
    agg = per.groupby("user_id").agg(g=("g", "first"), n=("n", "sum"), pp=("pp", "sum"),
                                     pos=("pos", "sum"), tp=("tp", "sum"), neg=("neg", "sum"),
                                     fp=("fp", "sum"))
    labels = sorted(agg["g"].unique())
    codes = pd.Categorical(agg["g"], categories=labels).codes.astype(np.int64)
    X = agg[["n", "pp", "pos", "tp", "neg", "fp"]].to_numpy(float)
    G, U = len(labels), len(codes)

    def group_sums(code_mat: np.ndarray) -> np.ndarray:
        c = code_mat.shape[0]
        flat = (np.arange(c)[:, None] * G + code_mat).ravel()
        cols = [np.bincount(flat, weights=np.tile(X[:, j], c), minlength=c * G).reshape(c, G)
                for j in range(X.shape[1])]
        return np.stack(cols, axis=-1)

    dp_obs, eo_obs = (x[0] for x in _parity_stats(group_sums(codes[None, :])))
    rng = np.random.default_rng(_sub(seed, 5))
    dps, eos = [], []
    for c in stats._chunks(n_perm, U * 6):
        perm = rng.permuted(np.broadcast_to(codes, (c, U)), axis=1)
        a, b = _parity_stats(group_sums(perm))
        dps.append(a)
        eos.append(b)
    out.update(demographic_parity_difference=_f(dp), equalized_odds_difference=_f(eo),
               p_dp=_f(stats._perm_p(float(dp_obs), np.concatenate(dps))),
               p_eo=_f(stats._perm_p(float(eo_obs), np.concatenate(eos))))
    return out


# --------------------------------------------------------------------------------------------
# (d) exposure
# --------------------------------------------------------------------------------------------


def exposure(
    rankings: pd.DataFrame, popularity: pd.Series, *, catalogue: Iterable | None = None,
    k: int = 10, head_share: float = 0.8,
) -> dict:
    """Position-weighted exposure (1 / log2(1 + rank), Singh & Joachims 2018) of the top-k lists.

    short_head_share / long_tail_share: shares of total exposure on short-head (the most popular
    items holding ``head_share`` of training ratings) and other items; gini: Gini index of item
    exposure over the catalogue (default: the items in ``popularity``; unexposed items count 0).
    """
    top = rankings[rankings["rank"] <= k]
    w = 1.0 / np.log2(1.0 + top["rank"].to_numpy(float))
    per_item = pd.Series(w, index=top["item_id"].to_numpy()).groupby(level=0).sum()
    total = float(per_item.sum())
    head = short_head(popularity, head_share)
    sh = float(per_item[per_item.index.isin(head)].sum()) / total if total > 0 else np.nan
    cat = list(popularity.index if catalogue is None else catalogue)
    cat_exp = per_item.reindex(pd.Index(cat).union(per_item.index)).fillna(0.0)
    return {"short_head_share": _f(sh), "long_tail_share": _f(1.0 - sh if total > 0 else np.nan),
            "gini": _f(gini(cat_exp.to_numpy())), "n_short_head": len(head),
            "n_lists": int(top.groupby(["user_id", "scenario"]).ngroups if "scenario" in top
                           else top["user_id"].nunique())}


# --------------------------------------------------------------------------------------------
# (e) miscalibration
# --------------------------------------------------------------------------------------------


def _item_genre_weights(genres: pd.Series) -> pd.DataFrame:
    """Long [item_id, genre, w] with w = 1 / #genres of the item (items without genres absent)."""
    rows = []
    for iid, s in genres.items():
        if not isinstance(s, str):
            continue
        gs = sorted({x.strip() for x in s.split("|") if x.strip()})
        rows += [(iid, g, 1.0 / len(gs)) for g in gs]
    return pd.DataFrame(rows, columns=["item_id", "genre", "w"])


def genre_mix(user_items: pd.DataFrame, genres: pd.Series) -> pd.DataFrame:
    """users x genres matrix of p(g|u) = mean over the user's items of p(g|i) (Steck 2018).

    Items without genres are skipped; rows sum to 1.
    """
    ig = _item_genre_weights(genres)
    m = user_items[["user_id", "item_id"]].merge(ig, on="item_id", how="inner")
    mat = m.pivot_table(index="user_id", columns="genre", values="w", aggfunc="sum", fill_value=0.0)
    return mat.div(mat.sum(axis=1), axis=0)


def miscalibration_per_user(
    support: pd.DataFrame, rankings: pd.DataFrame, genres: pd.Series, *, alpha: float = 0.01,
    k: int = 10,
) -> pd.Series:
    """C_KL(p, q~) = sum_g p(g|u) log(p(g|u) / q~(g|u)), q~ = (1 - alpha) q + alpha p.

    p = genre mix of the user's history (support items), q = genre mix of the top-k list.
    Users without a history with genres or without a list get no value (absent).
    """
    p = genre_mix(support, genres)
    q = genre_mix(rankings[rankings["rank"] <= k], genres)
    users = p.index.intersection(q.index)
    cols = p.columns.union(q.columns)
    P = p.reindex(index=users, columns=cols, fill_value=0.0).to_numpy()
    Q = q.reindex(index=users, columns=cols, fill_value=0.0).to_numpy()
    Qt = (1.0 - alpha) * Q + alpha * P
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P > 0, P * np.log(P / Qt), 0.0)
    return pd.Series(terms.sum(axis=1), index=users, name="miscalibration")


# --------------------------------------------------------------------------------------------
# (f) records
# --------------------------------------------------------------------------------------------


def _strata_frame(users_strata) -> tuple[pd.DataFrame, dict, str]:
    if isinstance(users_strata, Strata):
        return users_strata.frame, users_strata.merged, users_strata.other_label
    if isinstance(users_strata, pd.DataFrame):
        return users_strata, {}, "other"
    raise TypeError("users_strata must be a Strata or a DataFrame [user_id, attributes...].")


_SKIP_METRICS = {"n_query"}


def fairness_records(
    model: str,
    scenario: str,
    per_user: pd.DataFrame,
    users_strata,
    attributes: Iterable[str] | None = None,
    *,
    metrics: Iterable[str] | None = None,
    pred: pd.DataFrame | None = None,
    rankings: pd.DataFrame | None = None,
    support: pd.DataFrame | None = None,
    items: pd.DataFrame | None = None,
    interaction_counts: pd.Series | None = None,
    threshold: float = 4.0,
    popularity_col: str = "popularity",
    k: int = 10,
    alpha: float = 0.01,
    top_frac: float = 0.05,
    n_boot: int = 1000,
    n_perm: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """fairness.json records (DESIGN.md) for one (model, scenario).

    per_user: [user_id, metric, value] (rows of other scenarios are dropped when a scenario
    column exists; repeated (user, metric) rows, e.g. several seeds, are averaged).
    users_strata: a Strata (merged groups are flagged) or a frame user_id + attribute columns.
    Kinds: group_metric, gap, gap_to_rest (always); ugf (with interaction_counts); parity (with
    pred); exposure (with rankings and items[popularity]); miscalibration (with rankings, support
    and items[genres]). Non-finite numbers are written as None (valid JSON).
    """
    frame, merged, other = _strata_frame(users_strata)
    attributes = [a for a in (attributes or [c for c in frame.columns if c != "user_id"])]
    for a in attributes:
        if a not in frame.columns:
            raise ValueError(f"attribute {a!r} is not a strata column ({list(frame.columns)}).")
    strata = frame.set_index("user_id")
    pu = per_user
    if "scenario" in pu.columns:
        pu = pu[pu["scenario"] == scenario]
    wide = pu.groupby(["user_id", "metric"])["value"].mean().unstack("metric")
    metrics = list(metrics) if metrics is not None else [
        m for m in wide.columns if m not in _SKIP_METRICS]
    base = {"model": model, "scenario": scenario}
    recs: list[dict] = []

    def merged_info(a: str, g: str) -> tuple[bool, list]:
        is_m = bool(merged.get(a)) and g == other
        return is_m, list(merged.get(a, [])) if is_m else []

    for mi, metric in enumerate(metrics):
        if metric not in wide.columns:
            raise ValueError(f"metric {metric!r} is not in per_user ({list(wide.columns)}).")
        vals = wide[metric]
        for ai, a in enumerate(attributes):
            s = _sub(seed, 1000 + 97 * mi + ai)
            gc = group_comparison(vals, strata[a], n_boot=n_boot, n_perm=n_perm, seed=s,
                                  level=level)
            for r in gc.table.itertuples(index=False):
                is_m, mg = merged_info(a, r.group)
                recs.append({**base, "kind": "group_metric", "attribute": a, "group": r.group,
                             "metric": metric, "value": _f(r.value), "ci_low": _f(r.ci_low),
                             "ci_high": _f(r.ci_high), "n": int(r.n), "merged": is_m,
                             "merged_groups": mg})
                recs.append({**base, "kind": "gap_to_rest", "attribute": a, "group": r.group,
                             "metric": metric, "gap": _f(r.gap), "ci_low": _f(r.gap_ci_low),
                             "ci_high": _f(r.gap_ci_high), "p_value": _f(r.gap_p_value),
                             "n": int(r.n), "merged": is_m})
            recs.append({**base, "kind": "gap", "attribute": a, "metric": metric,
                         "difference": _f(gc.difference), "diff_ci_low": _f(gc.diff_ci_low),
                         "diff_ci_high": _f(gc.diff_ci_high), "ratio": _f(gc.ratio),
                         "ratio_ci_low": _f(gc.ratio_ci_low),
                         "ratio_ci_high": _f(gc.ratio_ci_high), "p_value": _f(gc.p_value),
                         "max_group": gc.max_group, "min_group": gc.min_group,
                         "n_groups": gc.n_groups, "n": int(gc.table["n"].sum()),
                         "overall": _f(gc.overall)})
        if interaction_counts is not None:
            u = ugf(vals, interaction_counts, top_frac=top_frac, n_boot=n_boot, n_perm=n_perm,
                    seed=_sub(seed, 5000 + mi), level=level)
            recs.append({**base, "kind": "ugf", "metric": metric, "top_frac": top_frac, **u})

    if pred is not None:
        pr = pred[pred["scenario"] == scenario] if "scenario" in pred.columns else pred
        for ai, a in enumerate(attributes):
            p = parity(pr, strata[a], threshold=threshold, n_perm=n_perm,
                       seed=_sub(seed, 7000 + ai))
            for name, pk in (("demographic_parity_difference", "p_dp"),
                             ("equalized_odds_difference", "p_eo")):
                recs.append({**base, "kind": "parity", "attribute": a, "metric": name,
                             "value": p[name], "p_value": p[pk], "threshold": threshold,
                             "n_groups": p["n_groups"]})

    rk = None
    if rankings is not None:
        rk = rankings[rankings["scenario"] == scenario] if "scenario" in rankings else rankings
    if rk is not None and items is not None:
        it = items.set_index("item_id")
        if popularity_col in it.columns:
            e = exposure(rk, it[popularity_col], k=k)
            recs.append({**base, "kind": "exposure", **e})
        if support is not None and "genres" in it.columns:
            sp = support[support["scenario"] == scenario] if "scenario" in support else support
            mc = miscalibration_per_user(sp, rk, it["genres"], alpha=alpha, k=k)
            groups = [("all", pd.Series("all", index=mc.index))] + [(a, strata[a])
                                                                   for a in attributes]
            for ai, (a, grp) in enumerate(groups):
                v, g = _align(mc, grp)
                for gi, lab in enumerate(sorted(g.unique())):
                    x = v[(g == lab).to_numpy()]
                    lo, hi = stats.bootstrap_mean_ci(x, n_boot=n_boot,
                                                     seed=_sub(seed, 9000 + 31 * ai + gi),
                                                     level=level)
                    is_m, _ = merged_info(a, lab) if a != "all" else (False, [])
                    recs.append({**base, "kind": "miscalibration", "attribute": a,
                                 "group": lab, "value": _f(x.mean()), "ci_low": _f(lo),
                                 "ci_high": _f(hi), "n": int(x.size), "alpha": alpha,
                                 "merged": is_m})
    return recs
