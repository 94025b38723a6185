"""Accuracy, ranking and beyond-accuracy metrics on prediction frames.

Per-user values (one row per user and metric) are the unit for fairness and comparisons: the
fairlearn MetricFrame and the bootstraps resample users, not ratings.

Inputs (CONTRACTS.md / DESIGN.md):
- predictions: user_id, item_id, scenario, y_true, y_pred (query items of each user's task);
- rankings: user_id, scenario, rank (1-based), item_id, score (top-k over the catalogue;
  candidates = the scenario's items not in the user's support set);
- n_candidates: number of candidates per (user, scenario).

Definitions (REFERENCES.md): nDCG gain 2^r - 1 with log2 discount (MeLU); popularity metrics as in
Elliot (ARP, APLT with an 80% short head, Gini of exposure).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

__all__ = [
    "QUERY_NDCG_KS",
    "per_user_accuracy",
    "per_user_query_ndcg",
    "expected_dcg",
    "check_candidates",
    "per_user_catalogue",
    "per_user_beyond",
    "per_user_metrics",
    "pooled_metrics",
    "short_head",
    "gini",
    "catalogue_coverage",
    "beyond_accuracy",
    "genre_sets",
]

QUERY_NDCG_KS = (1, 3, 5)
_LONG = ["user_id", "scenario", "metric", "value"]


def _to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide (user_id, scenario, metric columns) -> long [user_id, scenario, metric, value]."""
    if wide.empty:
        return pd.DataFrame(columns=_LONG)
    out = wide.melt(id_vars=["user_id", "scenario"], var_name="metric", value_name="value")
    out["value"] = out["value"].astype(float)
    return out.sort_values(["scenario", "user_id", "metric"], kind="stable").reset_index(drop=True)


def _require(frame: pd.DataFrame, cols: Iterable[str], name: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} frame lacks column(s) {missing}; it has {list(frame.columns)}.")


# --------------------------------------------------------------------------------------------
# Accuracy within the query set
# --------------------------------------------------------------------------------------------


def per_user_accuracy(pred: pd.DataFrame) -> pd.DataFrame:
    """Per-user MAE, MSE and RMSE (long form).

    MSE is kept so that the pooled RMSE can be rebuilt as sqrt(mean of squared errors), i.e.
    sqrt of the n_query-weighted mean of per-user MSE; ``n_query`` is also reported for that.
    """
    _require(pred, ["user_id", "scenario", "y_true", "y_pred"], "predictions")
    err = pred["y_pred"].astype(float) - pred["y_true"].astype(float)
    tmp = pd.DataFrame({"user_id": pred["user_id"].to_numpy(),
                        "scenario": pred["scenario"].to_numpy(),
                        "ae": err.abs().to_numpy(), "se": (err**2).to_numpy()})
    g = tmp.groupby(["user_id", "scenario"], sort=True)
    wide = pd.DataFrame({"mae": g["ae"].mean(), "mse": g["se"].mean(),
                         "n_query": g["ae"].size().astype(float)}).reset_index()
    wide["rmse"] = np.sqrt(wide["mse"])
    return _to_long(wide[["user_id", "scenario", "mae", "mse", "rmse", "n_query"]])


def _dcg(gains: np.ndarray, k: int) -> float:
    g = gains[:k]
    return float(np.sum(g / np.log2(np.arange(2, g.size + 2))))


def expected_dcg(scores: np.ndarray, gains: np.ndarray, k: int) -> float:
    """DCG@k of the ranking by descending score, averaged over every order of tied scores.

    Why: breaking ties by item id is not neutral (on ML-100K low ids are rated higher, so a constant
    predictor looked better than chance). Under a uniformly random order within a block of tied
    scores occupying positions p..q, each of its items is equally likely at each of those
    positions, so the block contributes its mean gain times the sum of the discounts of the
    positions p..q that fall within the top k (the tie-aware DCG of McSherry and Najork, ECIR 2008).
    This is the exact expectation, with no generator needed.
    """
    scores = np.asarray(scores, dtype=float)
    gains = np.asarray(gains, dtype=float)
    order = np.argsort(-scores, kind="stable")
    s, g = scores[order], gains[order]
    disc = np.zeros(s.size)
    top = min(k, s.size)
    disc[:top] = 1.0 / np.log2(np.arange(2, top + 2))
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    block_gain = np.add.reduceat(g, starts) / np.diff(np.r_[starts, s.size])
    return float(np.sum(block_gain * np.add.reduceat(disc, starts)))


def per_user_query_ndcg(
    pred: pd.DataFrame, ks: Iterable[int] = QUERY_NDCG_KS
) -> pd.DataFrame:
    """nDCG@k within each user's query set (MeLU protocol).

    Gain 2^r - 1, discount log2(1 + position), ideal order from the true ratings. Items are
    ordered by y_pred descending; tied predictions are scored by their expectation under a random
    order (`expected_dcg`), so a constant predictor gets exactly the nDCG of a random ranking. A
    list shorter than k is scored over its full length. Users with a single query item, or whose
    ideal DCG is 0, get NaN: one item cannot be mis-ranked, so a 1.0 there would flatter the model.
    """
    _require(pred, ["user_id", "item_id", "scenario", "y_true", "y_pred"], "predictions")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"nDCG cut-offs must be >= 1, got {ks}.")
    rows = []
    for (scen, uid), grp in pred.groupby(["scenario", "user_id"], sort=True):
        gains = np.power(2.0, grp["y_true"].to_numpy(float)) - 1.0
        scores = grp["y_pred"].to_numpy(float)
        ideal = np.sort(gains)[::-1]
        row = {"user_id": uid, "scenario": scen}
        for k in ks:
            idcg = _dcg(ideal, k)
            ok = gains.size >= 2 and idcg > 0
            row[f"ndcg@{k}"] = expected_dcg(scores, gains, k) / idcg if ok else np.nan
        rows.append(row)
    cols = ["user_id", "scenario"] + [f"ndcg@{k}" for k in ks]
    return _to_long(pd.DataFrame(rows, columns=cols))


# --------------------------------------------------------------------------------------------
# Catalogue ranking (top-k over the candidates)
# --------------------------------------------------------------------------------------------


def _candidates_frame(n_candidates, rankings: pd.DataFrame) -> pd.DataFrame:
    """Normalise n_candidates to a frame [user_id, scenario, n_candidates].

    Accepts a DataFrame with those columns, a Series indexed by (user_id, scenario), or a Series
    indexed by user_id (then the rankings must hold a single scenario).
    """
    if isinstance(n_candidates, pd.DataFrame):
        _require(n_candidates, ["user_id", "n_candidates"], "n_candidates")
        nc = n_candidates.copy()
        if "scenario" not in nc.columns:
            scen = rankings["scenario"].unique()
            if len(scen) > 1:
                raise ValueError("n_candidates has no scenario column but the rankings hold "
                                 f"several scenarios {sorted(scen)}.")
            nc["scenario"] = scen[0] if len(scen) else None
        return nc[["user_id", "scenario", "n_candidates"]]
    if isinstance(n_candidates, dict):
        n_candidates = pd.Series(n_candidates)
    if isinstance(n_candidates, pd.Series):
        if isinstance(n_candidates.index, pd.MultiIndex):
            nc = n_candidates.rename("n_candidates").rename_axis(["user_id", "scenario"])
            return nc.reset_index()
        scen = rankings["scenario"].unique()
        if len(scen) > 1:
            raise ValueError("n_candidates is indexed by user_id only but the rankings hold "
                             f"several scenarios {sorted(scen)}; index it by (user_id, scenario).")
        nc = n_candidates.rename("n_candidates").rename_axis("user_id").reset_index()
        nc["scenario"] = scen[0] if len(scen) else None
        return nc[["user_id", "scenario", "n_candidates"]]
    raise TypeError("n_candidates must be a DataFrame [user_id, scenario, n_candidates] or a "
                    "Series indexed by user_id or (user_id, scenario).")


def check_candidates(rankings: pd.DataFrame, n_candidates, k: int = 10) -> pd.DataFrame:
    """Refuse catalogue metrics @k when some user has k or fewer candidates.

    With n_candidates <= k every candidate is in the list, so recall and nDCG are trivially
    perfect (the RecBole pitfall in REFERENCES.md). Returns the normalised candidate frame.
    """
    nc = _candidates_frame(n_candidates, rankings)
    users = rankings[["user_id", "scenario"]].drop_duplicates()
    m = users.merge(nc, on=["user_id", "scenario"], how="left")
    missing = m[m["n_candidates"].isna()]
    if len(missing):
        ex = missing.iloc[0]
        raise ValueError(f"n_candidates is missing for {len(missing)} ranked user(s), e.g. user "
                         f"{ex['user_id']} in scenario {ex['scenario']!r}.")
    bad = m[m["n_candidates"] <= k]
    if len(bad):
        ex = bad.sort_values("n_candidates").iloc[0]
        raise ValueError(
            f"k={k} >= number of candidates for {len(bad)} user(s) (e.g. user {ex['user_id']} in "
            f"scenario {ex['scenario']!r} has {int(ex['n_candidates'])} candidates): every "
            f"candidate would be in the top-{k}, which makes ranking metrics trivially perfect; "
            f"use a smaller k or more candidates.")
    return nc


def per_user_catalogue(
    pred: pd.DataFrame, rankings: pd.DataFrame, n_candidates, threshold: float = 4.0,
    k: int = 10,
) -> pd.DataFrame:
    """Per-user Precision@k, Recall@k and nDCG@k (named list_ndcg@k) of the top-k catalogue list.

    Relevant items = the user's liked query items (y_true >= threshold); binary gain; IDCG from
    min(#relevant, k) hits at the top. Users without a relevant item get NaN for all three (no
    list can do well or badly for them), so every catalogue metric is averaged over the same users.
    Raises ValueError if any ranked user has k or fewer candidates.
    """
    _require(rankings, ["user_id", "scenario", "rank", "item_id"], "rankings")
    _require(pred, ["user_id", "item_id", "scenario", "y_true"], "predictions")
    check_candidates(rankings, n_candidates, k)
    top = rankings[rankings["rank"] <= k]
    rel = pred.loc[pred["y_true"] >= threshold, ["user_id", "scenario", "item_id"]]
    rel = rel.drop_duplicates()
    n_rel = rel.groupby(["user_id", "scenario"]).size().rename("n_rel")
    hits = top.merge(rel.assign(_hit=1), on=["user_id", "scenario", "item_id"], how="left")
    hits["_hit"] = hits["_hit"].fillna(0.0)
    hits["_disc"] = hits["_hit"] / np.log2(hits["rank"].astype(float) + 1.0)
    g = hits.groupby(["user_id", "scenario"])
    wide = pd.DataFrame({"n_hit": g["_hit"].sum(), "dcg": g["_disc"].sum()}).reset_index()
    wide = wide.merge(n_rel.reset_index(), on=["user_id", "scenario"], how="left")
    wide["n_rel"] = wide["n_rel"].fillna(0).astype(int)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    cum_ideal = np.concatenate([[0.0], np.cumsum(disc)])
    idcg = cum_ideal[np.minimum(wide["n_rel"].to_numpy(), k)]
    has = wide["n_rel"].to_numpy() > 0
    out = pd.DataFrame({"user_id": wide["user_id"], "scenario": wide["scenario"]})
    out[f"precision@{k}"] = np.where(has, wide["n_hit"] / k, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[f"recall@{k}"] = np.where(has, wide["n_hit"] / wide["n_rel"], np.nan)
        out[f"list_ndcg@{k}"] = np.where(has, wide["dcg"] / idcg, np.nan)
    return _to_long(out)


# --------------------------------------------------------------------------------------------
# Beyond accuracy
# --------------------------------------------------------------------------------------------


def genre_sets(genres: pd.Series) -> dict:
    """item_id -> frozenset of genre names from a '|'-joined Series indexed by item_id."""
    out = {}
    for iid, s in genres.items():
        if isinstance(s, str) and s.strip():
            out[iid] = frozenset(x.strip() for x in s.split("|") if x.strip())
        else:
            out[iid] = frozenset()
    return out


def short_head(popularity: pd.Series, share: float = 0.8) -> set:
    """Most popular items that together hold ``share`` of all ratings (Elliot's short head).

    Items are taken in decreasing popularity (ties by item_id) until the cumulative count first
    reaches ``share`` of the total. Every other catalogue item is long tail.
    """
    pop = popularity.astype(float)
    total = float(pop.sum())
    if total <= 0:
        return set()
    df = pd.DataFrame({"item_id": pop.index, "pop": pop.to_numpy()})
    df = df.sort_values(["pop", "item_id"], ascending=[False, True], kind="stable")
    cum = df["pop"].cumsum().to_numpy() / total
    n_head = int(np.searchsorted(cum, share - 1e-12) + 1)
    return set(df["item_id"].iloc[:n_head].tolist())


def gini(x: Iterable[float]) -> float:
    """Gini index of a non-negative vector (0 = equal, 1 - 1/n = all on one item).

    G = sum_i (2i - n - 1) x_(i) / (n sum x), x sorted ascending, i = 1..n.
    """
    v = np.sort(np.asarray(list(x), dtype=float))
    n = v.size
    if n == 0 or v.sum() <= 0:
        return np.nan
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * v) / (n * v.sum()))


def catalogue_coverage(rankings: pd.DataFrame, catalogue: Iterable, k: int = 10) -> float:
    """Share of the catalogue that appears in at least one top-k list."""
    cat = set(catalogue)
    if not cat:
        return np.nan
    rec = set(rankings.loc[rankings["rank"] <= k, "item_id"].tolist())
    return len(rec & cat) / len(cat)


def _popularity_share(popularity: pd.Series) -> pd.Series:
    """Add-one smoothed popularity share (count + 1) / (total + n_items).

    Smoothing keeps novelty finite for items nobody rated in training (new items).
    """
    pop = popularity.astype(float)
    return (pop + 1.0) / (float(pop.sum()) + len(pop))


def per_user_beyond(
    rankings: pd.DataFrame, popularity: pd.Series, genres: pd.Series | None = None,
    k: int = 10, head_share: float = 0.8,
) -> pd.DataFrame:
    """Per-user list metrics: ARP, APLT, novelty and intra-list genre diversity.

    ARP = mean training popularity of the listed items; APLT = share of long-tail items;
    novelty = mean -log2 popularity share (add-one smoothed); diversity = mean pairwise Jaccard
    distance of genre sets (NaN for lists with fewer than two items). Items unknown to
    ``popularity`` count as popularity 0.
    """
    _require(rankings, ["user_id", "scenario", "rank", "item_id"], "rankings")
    top = rankings[rankings["rank"] <= k].sort_values(["scenario", "user_id", "rank"])
    pop = popularity.astype(float)
    head = short_head(pop, head_share)
    share = _popularity_share(pop)
    floor_share = 1.0 / (float(pop.sum()) + len(pop))
    t = top[["user_id", "scenario", "item_id"]].copy()
    t["pop"] = t["item_id"].map(pop).fillna(0.0).astype(float)
    t["tail"] = (~t["item_id"].isin(head)).astype(float)
    t["nov"] = -np.log2(t["item_id"].map(share).fillna(floor_share).astype(float))
    g = t.groupby(["user_id", "scenario"], sort=True)
    wide = pd.DataFrame({"arp": g["pop"].mean(), "aplt": g["tail"].mean(),
                         "novelty": g["nov"].mean()}).reset_index()
    if genres is not None:
        gs = genre_sets(genres)
        div = {}
        for key, grp in t.groupby(["user_id", "scenario"], sort=True):
            sets = [gs.get(i, frozenset()) for i in grp["item_id"]]
            div[key] = intra_list_diversity(sets)
        wide["diversity"] = [div[(u, s)] for u, s in zip(wide["user_id"], wide["scenario"])]
    return _to_long(wide)


def intra_list_diversity(sets: list) -> float:
    """Mean pairwise Jaccard distance 1 - |A & B| / |A | B| over item pairs of one list.

    Two items both without genres are at distance 0 (nothing distinguishes them).
    """
    n = len(sets)
    if n < 2:
        return np.nan
    d = []
    for i in range(n):
        for j in range(i + 1, n):
            u = len(sets[i] | sets[j])
            d.append(0.0 if u == 0 else 1.0 - len(sets[i] & sets[j]) / u)
    return float(np.mean(d))


def design_weights_of(user_ids: pd.Series | pd.Index, weights: pd.Series | None, what: str,
                      where: str = "") -> np.ndarray:
    """Each row's design weight, from `weights` (user_id -> N_h / n_h), or ones without a design. A
    user with no weight is not in the sample, which no estimate here can absorb: one sentence naming
    the user (and `where`, e.g. " (warm)") and what it has."""
    ids = pd.Series(user_ids)
    if weights is None:
        return np.ones(len(ids))
    w = ids.map(weights).to_numpy(np.float64)
    if not np.isfinite(w).all():
        raise ValueError(f"user {ids.iloc[int(np.argmax(~np.isfinite(w)))]}{where} has {what} but no design weight.")
    return w


def beyond_accuracy(
    rankings: pd.DataFrame, popularity: pd.Series, catalogue: Iterable | None = None,
    genres: pd.Series | None = None, k: int = 10, head_share: float = 0.8,
    weights: pd.Series | None = None,
) -> dict:
    """List-level summary for one scenario: coverage, Gini of exposure and the per-user means.

    ``catalogue`` is the scenario's item set (default: every item in ``popularity``). The Gini is
    over recommendation counts of every catalogue item (unrecommended items count 0).
    ``weights`` (user_id -> design weight; audit.sampling): the lists are a stratified sample of
    users; each list counts at its user's weight in the Gini's counts and the per-user means.
    Coverage stays the share of the catalogue in the sampled lists: a union over users, which no
    weight can scale up, so under sampling it is a lower bound of everyone's coverage.
    """
    cat = list(popularity.index if catalogue is None else catalogue)
    top = rankings[rankings["rank"] <= k]
    counts = pd.Series(design_weights_of(top["user_id"], weights, "a list"), index=top["item_id"].to_numpy())
    counts = counts.groupby(level=0).sum()
    exp = pd.Series(0.0, index=pd.Index(cat)).add(counts.reindex(cat).fillna(0.0), fill_value=0)
    pu = per_user_beyond(rankings, popularity, genres, k, head_share)
    out = {"coverage": catalogue_coverage(rankings, cat, k), "gini": gini(exp.to_numpy())}
    pu = pu[np.isfinite(pu["value"].to_numpy(np.float64))]
    pu = pu.assign(w=design_weights_of(pu["user_id"], weights, "a list"))
    means = (pu["value"] * pu["w"]).groupby(pu["metric"]).sum() / pu["w"].groupby(pu["metric"]).sum()
    for m in ["arp", "aplt", "novelty", "diversity"]:
        if m in means.index:
            out[m] = float(means[m])
    return out


# --------------------------------------------------------------------------------------------
# Pooled and combined
# --------------------------------------------------------------------------------------------


def pooled_metrics(pred: pd.DataFrame, threshold: float = 4.0, weights: pd.DataFrame | None = None) -> pd.DataFrame:
    """Pooled (over all ratings) metrics per scenario: MAE, RMSE, AUC, precision and recall of
    liked (y_pred >= threshold vs y_true >= threshold). AUC uses y_pred as the score and is NaN
    when a scenario has only one class; precision/recall are NaN when undefined (0/0).

    ``weights`` (scenario, user_id, weight; audit.sampling): the users are a stratified sample;
    every rating counts at its user's design weight (AUC through roc_auc_score's sample_weight), so
    each metric estimates the represented population's. ``n`` stays the number of ratings.
    """
    _require(pred, ["scenario", "y_true", "y_pred"], "predictions")
    rows = []
    for scen, g in pred.groupby("scenario", sort=True):
        yt = g["y_true"].to_numpy(float)
        yp = g["y_pred"].to_numpy(float)
        w = design_weights_of(g["user_id"], None if weights is None else
                              weights[weights["scenario"] == scen].set_index("user_id")["weight"], "predictions")
        liked, pl = yt >= threshold, yp >= threshold
        auc = roc_auc_score(liked, yp, sample_weight=None if weights is None else w) \
            if 0 < liked.sum() < liked.size else np.nan
        tp = float(np.sum(w * (liked & pl)))
        wpl, wliked = float(np.sum(w * pl)), float(np.sum(w * liked))
        vals = {
            "mae": float(np.average(np.abs(yp - yt), weights=w)),
            "rmse": float(np.sqrt(np.average((yp - yt) ** 2, weights=w))),
            "auc": float(auc),
            "precision": tp / wpl if wpl else np.nan,
            "recall": tp / wliked if wliked else np.nan,
            "n": float(yt.size),
        }
        rows += [{"scenario": scen, "metric": m, "value": v} for m, v in vals.items()]
    return pd.DataFrame(rows, columns=["scenario", "metric", "value"])


def per_user_metrics(
    pred: pd.DataFrame, rankings: pd.DataFrame | None, n_candidates=None,
    threshold: float = 4.0, *, k: int = 10, ks: Iterable[int] = QUERY_NDCG_KS,
    items: pd.DataFrame | None = None, popularity_col: str = "popularity",
) -> pd.DataFrame:
    """All per-user metrics in long form [user_id, scenario, metric, value].

    Query-set metrics (mae, mse, rmse, n_query, ndcg@1/3/5) from ``pred``; catalogue metrics
    (precision@k, recall@k, list_ndcg@k) when ``rankings`` is given (needs ``n_candidates``; raises
    ValueError when k >= candidates for any user); list metrics (arp, aplt, novelty, diversity)
    when ``items`` (item_id, genres, popularity column) is also given.
    """
    parts = [per_user_accuracy(pred), per_user_query_ndcg(pred, ks)]
    if rankings is not None:
        if n_candidates is None:
            raise ValueError("catalogue metrics need n_candidates per user (to refuse k >= "
                             "candidates).")
        parts.append(per_user_catalogue(pred, rankings, n_candidates, threshold, k))
        if items is not None:
            _require(items, ["item_id", popularity_col], "items")
            it = items.set_index("item_id")
            genres = it["genres"] if "genres" in it.columns else None
            parts.append(per_user_beyond(rankings, it[popularity_col], genres, k))
    out = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return out.sort_values(["scenario", "user_id", "metric"], kind="stable").reset_index(drop=True)
