"""Group fairness of per-user metrics, user-oriented group fairness (UGF), parity of liked
predictions, item exposure and miscalibration, and the fairness.json records (DESIGN.md).

Users are the unit: each user's metric is averaged over the training seeds, groups are sized
within the population actually scored (small groups fold into "other"; one still too small is
reported but marked ``insufficient`` and never tested), and every test permutes users between
groups. Tests permute a studentized statistic (Welch t, Welch F), which stays calibrated when
groups differ in spread; intervals are Student t for a group and Bonferroni-simultaneous Welch
intervals for differences, so the interval of the pair a max - min gap picks still covers
(docs/CALIBRATION.md measures all of this). Each model x scenario is one family of tests with
Benjamini-Hochberg adjusted p-values. Group values equal fairlearn's MetricFrame (tests check
it); they are computed with bincount because MetricFrame's per-call cost dominated the stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
from audit import stats
from audit.metrics import design_weights_of, gini, short_head
from audit.sampling import domain_contrast, stratified_mean
from audit.strata import Strata, merge_small_groups

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


def _f(x) -> float | None:
    """JSON-safe float: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# (a) group metrics, gaps, gap to the rest
# --------------------------------------------------------------------------------------------


TEST_FIELDS = ("p_value", "p_mc_low", "p_mc_high", "p_adjusted", "p_adjusted_mc_low",
               "p_adjusted_mc_high", "adjustment", "family", "significant", "statistic", "test",
               "n_permutations")
PERMUTED_WELCH_F = "permuted Welch F (users as the unit)"
PERMUTED_WELCH_T = "permuted |Welch t| (users as the unit)"
PAIR_INTERVAL = "Welch t, Bonferroni-simultaneous over all pairs of sufficient groups"
REST_INTERVAL = "Welch t, Bonferroni-simultaneous over the sufficient groups"
MEAN_INTERVAL = "Student t"


@dataclass
class SizedGroups:
    """Group labels of one scored population after the minimum size was applied there.

    ``labels``: per user (small groups folded into ``other``); ``merged``: the folded names;
    ``sufficient``: groups with at least ``min_size`` users (and two, so a spread exists).
    """

    labels: pd.Series
    merged: list
    counts: pd.Series
    sufficient: list
    other: str


def size_groups(groups: pd.Series, min_size: int, other: str = "other") -> SizedGroups:
    """Apply the minimum group size within the population actually scored.

    Why here and not over all users: a group of 30 users overall can hold 3 of the users a
    scenario evaluates, and its mean would then drive gaps and findings.
    """
    lab, small = merge_small_groups(groups.astype(str), int(min_size), other)
    lab = lab.astype(str)
    counts = lab.value_counts().sort_index()
    floor = max(2, int(min_size))
    return SizedGroups(lab, small, counts, sorted(counts.index[counts >= floor].tolist()), other)


def _test_fields(p: float, exceed, n_perm: int, statistic: float, test: str) -> dict:
    """Raw permutation p with its Monte-Carlo interval; adjusted fields are filled per family."""
    lo, hi = stats.mc_interval(exceed, n_perm)
    return {"p_value": _f(p), "p_mc_low": _f(lo), "p_mc_high": _f(hi), "p_adjusted": None,
            "p_adjusted_mc_low": None, "p_adjusted_mc_high": None, "adjustment": None,
            "family": None, "significant": None, "statistic": _f(statistic), "test": test,
            "n_permutations": int(n_perm)}


def _no_test() -> dict:
    return {k: None for k in TEST_FIELDS}


@dataclass
class GroupComparison:
    """Per-group values with intervals, gaps and studentized tests for one metric and attribute.

    ``table``: group, value, ci_low, ci_high (Student t), n, merged, insufficient, gap (group -
    rest of the sufficient users), gap_ci_low/high (Welch, simultaneous over groups), plus the
    gap-to-rest test fields. ``difference`` = max - min over sufficient groups; its interval is
    the simultaneous Welch interval of that pair (valid although the pair is chosen by the data,
    because all pairs are covered at once); ``ratio`` = min / max with a simultaneous log-ratio
    interval. ``test`` holds the omnibus permutation test (Welch F) fields.
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
    max_group: str | None
    min_group: str | None
    n_groups: int
    n: int
    insufficient: bool
    merged: list
    test: dict
    rest_tests: list


def _aligned(values: pd.Series, groups: pd.Series) -> pd.DataFrame:
    """user_id-indexed v, g: users with both a finite value and a group."""
    df = pd.DataFrame({"v": values.astype(float)}).join(groups.rename("g"), how="inner")
    return df[np.isfinite(df["v"]) & df["g"].notna()]


def _align(values: pd.Series, groups: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Join user-indexed values and groups; drop users without a finite value or a group."""
    df = _aligned(values, groups)
    return df["v"].to_numpy(), df["g"].astype(str).reset_index(drop=True)


def _stratified(v: np.ndarray, h: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """(mean, standard error, df) of sampled users' values from their strata and design weights
    (audit.sampling.stratified_mean; N_h = the weights of the stratum's users scored here). The
    error is about the population the users represent, as the unsampled Student-t one is."""
    if v.size == 0:
        return np.nan, np.nan, np.nan
    r = stratified_mean(v, h, pd.Series(w).groupby(h).sum())
    return r["estimate"], math.sqrt(r["variance"]) if r["variance"] >= 0 else np.nan, r["df"]


def _group_mean(v: np.ndarray, mask: np.ndarray, level: float, design: pd.DataFrame | None) -> dict:
    """Mean and Student-t interval of one group's values: plain, or with ``design`` (stratum,
    weight aligned with ``v``) the stratified mean with its stratified standard error, as
    group_comparison computes group means."""
    x = v[mask]
    if design is None:
        ti = stats.t_interval(x, level)
        return {"mean": float(x.mean()) if x.size else np.nan, "ci_low": ti["ci_low"], "ci_high": ti["ci_high"]}
    mean, se, df = _stratified(x, design["stratum"].to_numpy()[mask], design["weight"].to_numpy(np.float64)[mask])
    with np.errstate(invalid="ignore"):
        half = float(stats.t_quantile(level, df)) * se if np.isfinite(se) else np.nan
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def _transform(mean: np.ndarray, se: np.ndarray, root: bool) -> tuple[np.ndarray, np.ndarray]:
    """Value and delta-method standard error on the reported scale (sqrt for RMSE from MSE)."""
    if not root:
        return mean, se
    val = np.sqrt(np.maximum(mean, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return val, se / (2.0 * val)


def _welch_interval(d, a1, n1, a2, n2, level: float, m: int) -> tuple[float, float]:
    lo, hi = stats.welch_interval(d, a1, n1, a2, n2, level, m)
    return float(lo), float(hi)


def group_comparison(
    values: pd.Series, groups: pd.Series, *, n_perm: int = 9999, seed: int = 0,
    level: float = 0.95, min_size: int = 2, other: str = "other", root: bool = False,
    design: pd.DataFrame | None = None,
) -> GroupComparison:
    """Compare groups on one per-user metric (both Series indexed by user_id).

    ``root``: the values are per-user squared errors and the reported value is the root of the
    group's mean (group RMSE); tests and intervals are computed on the mean squared error and
    carried to the root scale (monotone for group intervals, delta method for differences).
    ``design`` (user_id-indexed stratum, weight): the users are a stratified sample
    (audit.sampling); group, rest and overall means are then stratified means with stratified
    standard errors, while the permutation tests relabel the sampled users as they are (valid
    conditionally on the sample; audit.sampling says why) and ``n`` counts sampled users.
    """
    df = _aligned(values, groups)
    v, g = df["v"].to_numpy(), df["g"].astype(str).reset_index(drop=True)
    if v.size == 0:
        raise ValueError("no user has both a finite metric value and a group.")
    sg = size_groups(g, min_size, other)
    g = sg.labels.reset_index(drop=True)
    labels = sorted(sg.counts.index.tolist())
    codes = pd.Categorical(g, categories=labels).codes
    n = np.bincount(codes, minlength=len(labels)).astype(float)
    if design is None:
        mean = np.bincount(codes, weights=v, minlength=len(labels)) / n
        sd = np.array([v[(g == x).to_numpy()].std(ddof=1) if c > 1 else np.nan
                       for x, c in zip(labels, n)])
        se = sd / np.sqrt(n)
        df_mean = n - 1
        w = h = None
    else:
        d = design.reindex(df.index)
        w, h = d["weight"].to_numpy(np.float64), d["stratum"].to_numpy()
        est = [_stratified(v[codes == j], h[codes == j], w[codes == j]) for j in range(len(labels))]
        mean, se, df_mean = (np.array(x, dtype=float) for x in zip(*est))
    value, _ = _transform(mean, se, root)
    with np.errstate(invalid="ignore"):
        half = stats.t_quantile(level, df_mean) * se
    lo_m, hi_m = mean - half, mean + half
    ci_low = np.sqrt(np.maximum(lo_m, 0.0)) if root else lo_m
    ci_high = np.sqrt(np.maximum(hi_m, 0.0)) if root else hi_m
    suff = np.array([x in sg.sufficient for x in labels])
    S = int(suff.sum())
    G = len(labels)
    gap = np.full(G, np.nan)
    gap_lo, gap_hi = np.full(G, np.nan), np.full(G, np.nan)
    rest_tests = [_no_test() for _ in range(G)]
    diff = dlo = dhi = ratio = rlo = rhi = np.nan
    gmax = gmin = None
    omnibus = _no_test()
    N = int(n[suff].sum())
    if S >= 2:
        keep = g.isin(sg.sufficient).to_numpy()
        sv = v[keep]
        slabels = [x for x in labels if x in sg.sufficient]
        codes = pd.Categorical(g[keep], categories=slabels).codes.astype(np.int64)
        tests = stats.studentized_permutation_tests(sv, codes, n_perm=n_perm, seed=seed)
        omnibus = _test_fields(tests.p_max[0], tests.exceed_max[0], n_perm,
                               tests.stat_max[0], PERMUTED_WELCH_F if S > 2 else PERMUTED_WELCH_T)
        if S == 2:  # Welch F = t^2: report |t| so two-group records read as the familiar t
            omnibus["statistic"] = _f(math.sqrt(float(tests.stat_max[0])))
        idx = np.flatnonzero(suff)
        tval, tse = _transform(mean[idx], se[idx], root)
        for j, gi in enumerate(idx):
            rv = sv[codes != j]
            if design is None:
                r_mean, r_se = rv.mean(), rv.std(ddof=1) / math.sqrt(rv.size)
            else:
                rest = np.flatnonzero(keep)[codes != j]
                r_mean, r_se, _ = _stratified(v[rest], h[rest], w[rest])
            rmean, rse = _transform(np.array([r_mean]), np.array([r_se]), root)
            gap[gi] = tval[j] - rmean[0]
            gap_lo[gi], gap_hi[gi] = _welch_interval(gap[gi], tse[j] ** 2, n[gi], rse[0] ** 2,
                                                     rv.size, level, S)
            rest_tests[gi] = _test_fields(tests.p_rest[0, j], tests.exceed_rest[0, j], n_perm,
                                          tests.stat_rest[0, j], PERMUTED_WELCH_T)
        hi_j, lo_j = int(np.argmax(tval)), int(np.argmin(tval))
        gmax, gmin = slabels[hi_j], slabels[lo_j]
        diff = float(tval[hi_j] - tval[lo_j])
        m_pairs = S * (S - 1) // 2
        a_hi, a_lo = tse[hi_j] ** 2, tse[lo_j] ** 2
        dlo, dhi = _welch_interval(diff, a_hi, n[idx[hi_j]], a_lo, n[idx[lo_j]], level, m_pairs)
        if tval[lo_j] > 0 and tval[hi_j] > 0:
            ratio = float(tval[lo_j] / tval[hi_j])
            lr_lo, lr_hi = _welch_interval(math.log(ratio), a_lo / tval[lo_j] ** 2, n[idx[lo_j]],
                                           a_hi / tval[hi_j] ** 2, n[idx[hi_j]], level, m_pairs)
            rlo, rhi = math.exp(lr_lo), math.exp(lr_hi)
    table = pd.DataFrame({
        "group": labels, "value": value, "ci_low": ci_low, "ci_high": ci_high,
        "n": n.astype(int), "merged": [bool(sg.merged) and x == other for x in labels],
        "insufficient": ~suff, "gap": gap, "gap_ci_low": gap_lo, "gap_ci_high": gap_hi,
    })
    overall = float(v.mean()) if design is None else float((w * v).sum() / w.sum())
    return GroupComparison(
        table=table, overall=math.sqrt(max(overall, 0.0)) if root else overall,
        difference=diff, diff_ci_low=dlo, diff_ci_high=dhi, ratio=ratio, ratio_ci_low=rlo,
        ratio_ci_high=rhi, p_value=np.nan if omnibus["p_value"] is None else omnibus["p_value"],
        max_group=gmax, min_group=gmin, n_groups=S, n=N, insufficient=S < 2, merged=sg.merged,
        test=omnibus, rest_tests=rest_tests,
    )


# --------------------------------------------------------------------------------------------
# (b) UGF
# --------------------------------------------------------------------------------------------


UGF_INTERVAL = "|Welch t interval of the signed difference|"
UGF_SAMPLED_INTERVAL = ("|t interval of the signed difference|: design-weighted domain means, linearised stratified "
                        "standard error (audit.sampling.domain_contrast)")


def ugf(
    values: pd.Series, interaction_counts: pd.Series, *, top_frac: float = 0.05,
    n_perm: int = 9999, seed: int = 0, level: float = 0.95, min_size: int = 2,
    design: pd.DataFrame | None = None,
) -> dict:
    """User-oriented group fairness (Li et al., WWW 2021).

    Advantaged = the top ``top_frac`` of the users that have a finite value, by interaction count
    (ties by user_id; at least one user); UGF = |mean(advantaged) - mean(rest)|. The interval for
    UGF is the one implied for |d| by the Welch interval of the signed difference d; p from the
    permuted |Welch t|. With fewer than ``min_size`` users on either side the record is
    ``insufficient`` and carries no test.

    ``design`` (user_id-indexed stratum, weight: every sampled user of the scenario): the users are
    a stratified sample. Activity cuts across the sampling strata, so the advantaged users are the
    top ``top_frac`` of the represented population (cumulative design weight), both sides are
    design-weighted domain means, and the interval uses their contrast's linearised standard error
    (audit.sampling.domain_contrast). The permutation test relabels the sampled users as they are
    (valid conditionally on the sample, as for group gaps) and the counts are sampled users.
    """
    v = values.astype(float)
    v = v[np.isfinite(v)]
    df = pd.DataFrame({"v": v, "c": interaction_counts.reindex(v.index).fillna(0).astype(float)})
    df = df.rename_axis("user_id").reset_index()
    df = df.sort_values(["c", "user_id"], ascending=[False, True], kind="stable")
    if design is None:
        n_adv = max(1, int(math.ceil(top_frac * len(df))))
    else:   # the first users whose cumulative weight reaches top_frac of the represented population
        cum = np.cumsum(design["weight"].reindex(df["user_id"]).to_numpy(np.float64))
        n_adv = max(1, int(np.searchsorted(cum, top_frac * cum[-1], side="left")) + 1) if len(df) else 1
    adv, dis = df["v"].iloc[:n_adv].to_numpy(), df["v"].iloc[n_adv:].to_numpy()
    sides = None
    if design is not None and len(df):
        pos = design.index.get_indexer(df["user_id"])
        if (pos < 0).any():
            raise ValueError(f"user {df['user_id'].iloc[int(np.argmax(pos < 0))]} has a value but is not in the sample.")
        full = np.full(len(design), np.nan)
        full[pos] = df["v"].to_numpy()
        is_adv = np.zeros(len(design), dtype=bool)
        is_adv[pos[:n_adv]] = True
        sides = (full, design["stratum"].to_numpy(), design["weight"].to_numpy(np.float64), is_adv)
        means = [domain_contrast(*sides[:3], [m])[0] for m in (is_adv, ~is_adv)]
    else:
        means = [adv.mean() if adv.size else np.nan, dis.mean() if dis.size else np.nan]
    out = {"advantaged": _f(means[0]) if adv.size else None,
           "disadvantaged": _f(means[1]) if dis.size else None,
           "n_advantaged": int(adv.size), "n_disadvantaged": int(dis.size),
           "ugf": None, "difference": None, "ci_low": None, "ci_high": None,
           "interval": None, "insufficient": True, **_no_test(),
           "min_interactions_advantaged": _f(df["c"].iloc[n_adv - 1]) if len(df) else None}
    if min(adv.size, dis.size) < max(2, int(min_size)):
        return out
    if sides is None:
        d = float(adv.mean() - dis.mean())
        lo, hi = _welch_interval(d, adv.var(ddof=1) / adv.size, adv.size, dis.var(ddof=1) / dis.size,
                                 dis.size, level, 1)
    else:
        full, strata, weight, is_adv = sides
        d, se, dof = domain_contrast(full, strata, weight, [is_adv, ~is_adv], (1.0, -1.0))
        half = float(stats.t_quantile(level, dof)) * se
        lo, hi = d - half, d + half
    codes = np.r_[np.zeros(adv.size, np.int64), np.ones(dis.size, np.int64)]
    t = stats.studentized_permutation_tests(np.r_[adv, dis], codes, n_perm=n_perm, seed=seed)
    alo, ahi = stats.abs_interval(lo, hi)
    out.update(ugf=_f(abs(d)), difference=_f(d), ci_low=_f(alo), ci_high=_f(ahi),
               interval=UGF_INTERVAL if sides is None else UGF_SAMPLED_INTERVAL, insufficient=False,
               **_test_fields(t.p_rest[0, 0], t.exceed_rest[0, 0], n_perm, t.stat_rest[0, 0],
                              PERMUTED_WELCH_T))
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
    pred: pd.DataFrame, groups: pd.Series, *, threshold: float = 4.0, n_perm: int = 9999,
    seed: int = 0, min_size: int = 1, other: str = "other", weights: pd.Series | None = None,
) -> dict:
    """Demographic parity and equalized odds differences of liked predictions.

    liked_pred = y_pred >= threshold, liked_true = y_true >= threshold; values as fairlearn's
    demographic_parity_difference and equalized_odds_difference (between_groups, worst_case;
    tests check equality), computed by the vectorised code the permutations use over the users of sufficient groups (the minimum size applied
    to the users in ``pred``; rows of several seeds pool into each user's counts). p-values:
    group labels are shuffled between *users* (a user's ratings stay together, so within-user
    correlation is kept), vectorised over permutations.

    ``weights`` (user_id -> design weight N_h / n_h): the users are a stratified sample; each
    user's counts are multiplied by the weight, so every group rate is the rate of the population
    the sampled users represent (a ratio of Horvitz-Thompson totals). The permutations carry each
    user's weighted counts with the user, so the test is the same relabelling of the sampled users.
    """
    df = pred[["user_id", "y_true", "y_pred"]].merge(
        groups.rename("g").rename_axis("user_id").reset_index(), on="user_id", how="inner")
    df = df[df["g"].notna()]
    ug = df.groupby("user_id")["g"].first()
    sg = size_groups(ug, min_size, other) if len(ug) else None
    out = {"demographic_parity_difference": None, "equalized_odds_difference": None,
           "p_dp": None, "p_eo": None, "test_dp": _no_test(), "test_eo": _no_test(),
           "n_groups": len(sg.sufficient) if sg else 0, "insufficient": True,
           "groups_excluded": sorted(set(sg.counts.index) - set(sg.sufficient)) if sg else [],
           "n": int(sg.counts[sg.sufficient].sum()) if sg else 0}
    if sg is None or len(sg.sufficient) < 2:
        return out
    df = df.assign(g=df["user_id"].map(sg.labels))
    df = df[df["g"].isin(sg.sufficient)]
    yt = (df["y_true"].to_numpy(float) >= threshold).astype(int)
    yp = (df["y_pred"].to_numpy(float) >= threshold).astype(int)
    sf = df["g"].astype(str).to_numpy()

    per = pd.DataFrame({"user_id": df["user_id"].to_numpy(), "g": sf, "n": 1, "pp": yp,
                        "pos": yt, "tp": yt * yp, "neg": 1 - yt, "fp": (1 - yt) * yp})
    agg = per.groupby("user_id").agg(g=("g", "first"), n=("n", "sum"), pp=("pp", "sum"),
                                     pos=("pos", "sum"), tp=("tp", "sum"), neg=("neg", "sum"),
                                     fp=("fp", "sum"))
    labels = sorted(agg["g"].unique())
    codes = pd.Categorical(agg["g"], categories=labels).codes.astype(np.int64)
    X = agg[["n", "pp", "pos", "tp", "neg", "fp"]].to_numpy(float)
    if weights is not None:
        X = X * design_weights_of(agg.index, weights, "predictions")[:, None]
    G, U = len(labels), len(codes)

    def group_sums(code_mat: np.ndarray) -> np.ndarray:
        c = code_mat.shape[0]
        flat = (np.arange(c)[:, None] * G + code_mat).ravel()
        cols = [np.bincount(flat, weights=np.tile(X[:, j], c), minlength=c * G).reshape(c, G)
                for j in range(X.shape[1])]
        return np.stack(cols, axis=-1)

    dp_obs, eo_obs = (float(x[0]) for x in _parity_stats(group_sums(codes[None, :])))
    rng = np.random.default_rng(_sub(seed, 5))
    dps, eos = [], []
    for c in stats._chunks(n_perm, U * 6):
        perm = rng.permuted(np.broadcast_to(codes, (c, U)), axis=1)
        a, b = _parity_stats(group_sums(perm))
        dps.append(a)
        eos.append(b)
    b_dp = stats.exceedances(dp_obs, np.concatenate(dps))
    b_eo = stats.exceedances(eo_obs, np.concatenate(eos))
    test = "permuted range of group rates (users as the unit)"
    t_dp = _test_fields((1 + b_dp) / (1 + n_perm), b_dp, n_perm, dp_obs, test)
    t_eo = _test_fields((1 + b_eo) / (1 + n_perm), b_eo, n_perm, eo_obs, test)
    out.update(demographic_parity_difference=_f(dp_obs), equalized_odds_difference=_f(eo_obs),
               p_dp=t_dp["p_value"], p_eo=t_eo["p_value"], test_dp=t_dp, test_eo=t_eo,
               insufficient=False)
    return out


# --------------------------------------------------------------------------------------------
# (d) exposure
# --------------------------------------------------------------------------------------------


def exposure(
    rankings: pd.DataFrame, popularity: pd.Series, *, catalogue: Iterable | None = None,
    k: int = 10, head_share: float = 0.8, weights: pd.Series | None = None,
) -> dict:
    """Position-weighted exposure (1 / log2(1 + rank), Singh & Joachims 2018) of the top-k lists.

    Lists of several seeds (a ``seed`` column) pool: shares and the Gini index are unchanged by
    scaling, so the pool equals the average over seeds.

    short_head_share / long_tail_share: shares of total exposure on short-head (the most popular
    items holding ``head_share`` of training ratings) and other items; gini: Gini index of item
    exposure over the catalogue (default: the items in ``popularity``; unexposed items count 0).
    ``weights`` (user_id -> design weight): the lists are a stratified sample of users; each list's
    exposure counts its user's weight, so item exposure estimates the represented population's.
    """
    top = rankings[rankings["rank"] <= k]
    w = 1.0 / np.log2(1.0 + top["rank"].to_numpy(float))
    w = w * design_weights_of(top["user_id"], weights, "a list")
    per_item = pd.Series(w, index=top["item_id"].to_numpy()).groupby(level=0).sum()
    total = float(per_item.sum())
    head = short_head(popularity, head_share)
    sh = float(per_item[per_item.index.isin(head)].sum()) / total if total > 0 else np.nan
    cat = list(popularity.index if catalogue is None else catalogue)
    cat_exp = per_item.reindex(pd.Index(cat).union(per_item.index)).fillna(0.0)
    return {"short_head_share": _f(sh), "long_tail_share": _f(1.0 - sh if total > 0 else np.nan),
            "exposure_gini": _f(gini(cat_exp.to_numpy())), "n_short_head": len(head),
            "n_lists": int(top.groupby([c for c in ("user_id", "scenario", "seed")
                                        if c in top.columns]).ngroups)}


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


def _seeds_of(df: pd.DataFrame | None, default: list[int]) -> list[int]:
    """The seeds a frame's rows come from (its ``seed`` column), else the caller's list."""
    if df is not None and "seed" in df.columns:
        return sorted(int(s) for s in df["seed"].unique())
    return list(default)


def _miscalibration(support, rankings, genres, alpha: float, k: int) -> pd.Series:
    """Per-user C_KL averaged over the seeds of ``rankings`` (one list per user and seed)."""
    if "seed" not in rankings.columns:
        return miscalibration_per_user(support, rankings, genres, alpha=alpha, k=k)
    per_seed = [miscalibration_per_user(support, r, genres, alpha=alpha, k=k)
                for _, r in rankings.groupby("seed", sort=True)]
    return pd.concat(per_seed, axis=1).mean(axis=1).rename("miscalibration")


def adjust_family(records: list[dict], family: str, alpha: float) -> None:
    """Benjamini-Hochberg over every test in one family (records updated in place).

    Why BH per model x scenario: a reviewer reads one model's fairness in one scenario as a
    whole; dozens of attributes, metrics and groups would otherwise yield false gaps by chance.
    The Monte-Carlo bounds of the raw p-values are adjusted the same way; BH is monotone in
    every p-value, so the adjusted bounds bracket the adjusted p that unlimited permutations
    would give. ``significant`` reads the adjusted p.
    """
    tests = [r for r in records if r.get("p_value") is not None and not r.get("insufficient")]
    if not tests:
        return
    cols = [stats.benjamini_hochberg([r[k] for r in tests])
            for k in ("p_value", "p_mc_low", "p_mc_high")]
    for r, p, lo, hi in zip(tests, *cols):
        r.update(p_adjusted=_f(p), p_adjusted_mc_low=_f(lo), p_adjusted_mc_high=_f(hi),
                 adjustment="BH", family=family, significant=bool(p < alpha))


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
    n_perm: int = 9999,
    level: float = 0.95,
    test_alpha: float = 0.05,
    min_group_size: int = 10,
    seeds: Iterable[int] = (),
    seed: int = 0,
    design: pd.DataFrame | None = None,
) -> list[dict]:
    """fairness.json records (DESIGN.md) for one (model, scenario), which is one test family.

    per_user: [user_id, metric, value] and optionally seed (rows of other scenarios are dropped
    when a scenario column exists; a user's values over seeds are averaged, so users are the
    unit). users_strata: a Strata or a frame user_id + attribute columns holding the unmerged
    groups: ``min_group_size`` is applied within each population scored here (groups below it
    merge into "other"; a group still below it stays in the tables as ``insufficient`` and is
    left out of gaps and tests). "rmse" is the root of the group's mean squared error (from the
    per-user "mse"). Kinds: group_metric, gap, gap_to_rest (always); ugf (with
    interaction_counts); parity (with pred); exposure (with rankings and items[popularity]);
    miscalibration (with rankings, support and items[genres]). Every record names the seeds it
    averages (``seeds``); every test carries raw and BH-adjusted p-values with Monte-Carlo
    intervals. Non-finite numbers are written as None (valid JSON). ``design``: the scenario's
    sampled users (user_id-indexed stratum, weight; audit.sampling) for stratified group means.
    """
    frame, premerged, other = _strata_frame(users_strata)
    attributes = [a for a in (attributes or [c for c in frame.columns if c != "user_id"])]
    for a in attributes:
        if a not in frame.columns:
            raise ValueError(f"attribute {a!r} is not a strata column ({list(frame.columns)}).")
    strata = frame.set_index("user_id")
    pu = per_user
    if "scenario" in pu.columns:
        pu = pu[pu["scenario"] == scenario]
    if pu.empty:
        return []
    pu_seeds = _seeds_of(pu, list(seeds))
    wide = pu.groupby(["user_id", "metric"])["value"].mean().unstack("metric")
    metrics = list(metrics) if metrics is not None else [
        m for m in wide.columns if m not in _SKIP_METRICS]
    base = {"model": model, "scenario": scenario}
    weights = None if design is None else design["weight"]
    recs: list[dict] = []
    perm_seed = _sub(seed, 1)  # one set of relabellings per population size (stats.permutations)

    for metric in metrics:
        root = metric == "rmse"
        source = "mse" if root else metric
        if source not in wide.columns:
            raise ValueError(f"metric {source!r} is not in per_user ({list(wide.columns)}).")
        vals = wide[source]
        for a in attributes:
            gc = group_comparison(vals, strata[a], n_perm=n_perm, seed=perm_seed, level=level,
                                  min_size=min_group_size, other=other, root=root, design=design)
            folded = sorted(set(premerged.get(a, [])) | set(gc.merged))
            for r, rt in zip(gc.table.itertuples(index=False), gc.rest_tests):
                is_m = bool(folded) and r.group == other
                recs.append({**base, "kind": "group_metric", "attribute": a, "group": r.group,
                             "metric": metric, "value": _f(r.value), "ci_low": _f(r.ci_low),
                             "ci_high": _f(r.ci_high), "interval": MEAN_INTERVAL, "n": int(r.n),
                             "merged": is_m, "merged_groups": folded if is_m else [],
                             "insufficient": bool(r.insufficient), "seeds": pu_seeds})
                recs.append({**base, "kind": "gap_to_rest", "attribute": a, "group": r.group,
                             "metric": metric, "gap": _f(r.gap), "ci_low": _f(r.gap_ci_low),
                             "ci_high": _f(r.gap_ci_high),
                             "interval": None if r.insufficient else REST_INTERVAL,
                             "n": int(r.n), "merged": is_m,
                             "insufficient": bool(r.insufficient), **rt, "seeds": pu_seeds})
            recs.append({**base, "kind": "gap", "attribute": a, "metric": metric,
                         "difference": _f(gc.difference), "diff_ci_low": _f(gc.diff_ci_low),
                         "diff_ci_high": _f(gc.diff_ci_high),
                         "interval": None if gc.insufficient else PAIR_INTERVAL,
                         "ratio": _f(gc.ratio), "ratio_ci_low": _f(gc.ratio_ci_low),
                         "ratio_ci_high": _f(gc.ratio_ci_high), **gc.test,
                         "max_group": gc.max_group, "min_group": gc.min_group,
                         "n_groups": gc.n_groups, "n": gc.n, "overall": _f(gc.overall),
                         "insufficient": gc.insufficient, "min_group_size": int(min_group_size),
                         "seeds": pu_seeds})
        if interaction_counts is not None and not root:
            u = ugf(vals, interaction_counts, top_frac=top_frac, n_perm=n_perm, seed=perm_seed,
                    level=level, min_size=min_group_size, design=design)
            recs.append({**base, "kind": "ugf", "metric": metric, "top_frac": top_frac, **u,
                         "seeds": pu_seeds})

    if pred is not None:
        pr = pred[pred["scenario"] == scenario] if "scenario" in pred.columns else pred
        pr_seeds = _seeds_of(pr, list(seeds))
        for ai, a in enumerate(attributes):
            p = parity(pr, strata[a], threshold=threshold, n_perm=n_perm,
                       seed=_sub(seed, 7000 + ai), min_size=min_group_size, other=other, weights=weights)
            for name, tk in (("demographic_parity_difference", "test_dp"),
                             ("equalized_odds_difference", "test_eo")):
                recs.append({**base, "kind": "parity", "attribute": a, "metric": name,
                             "value": p[name], **p[tk], "threshold": threshold,
                             "n_groups": p["n_groups"], "n": p["n"],
                             "groups_excluded": p["groups_excluded"],
                             "insufficient": p["insufficient"], "seeds": pr_seeds})

    rk = None
    if rankings is not None:
        rk = rankings[rankings["scenario"] == scenario] if "scenario" in rankings else rankings
    if rk is not None and items is not None:
        it = items.set_index("item_id")
        rk_seeds = _seeds_of(rk, list(seeds))
        if popularity_col in it.columns:
            e = exposure(rk, it[popularity_col], k=k, weights=weights)
            recs.append({**base, "kind": "exposure", **e, "seeds": rk_seeds})
        if support is not None and "genres" in it.columns:
            sp = support[support["scenario"] == scenario] if "scenario" in support else support
            mc = _miscalibration(sp, rk, it["genres"], alpha, k)
            groups = [("all", pd.Series("all", index=mc.index))] + [(a, strata[a])
                                                                   for a in attributes]
            for a, grp in groups:
                v, g = _align(mc, grp)
                if v.size == 0:
                    continue
                mc_design = None if design is None else design.reindex(_aligned(mc, grp).index)
                sg = size_groups(g, min_group_size if a != "all" else 1, other)
                for lab, n in sg.counts.items():
                    ti = _group_mean(v, (sg.labels == lab).to_numpy(), level, mc_design)
                    recs.append({**base, "kind": "miscalibration", "attribute": a,
                                 "group": lab, "value": _f(ti["mean"]), "ci_low": _f(ti["ci_low"]),
                                 "ci_high": _f(ti["ci_high"]), "interval": MEAN_INTERVAL, "n": int(n),
                                 "alpha": alpha,
                                 "merged": bool(sg.merged or premerged.get(a)) and lab == other,
                                 "insufficient": lab not in sg.sufficient, "seeds": rk_seeds})
    adjust_family(recs, f"{model}/{scenario}", test_alpha)
    return recs
