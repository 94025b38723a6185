"""Statistics for the audit: bootstrap intervals, permutation tests, seed intervals, paired
comparisons, Holm correction and the seed/user variance split.

Everything is seeded (``numpy.random.default_rng(seed)``) and vectorised over replicates, so the
same inputs and seed give the same numbers and a 1000-replicate test costs a few array operations.

Why our own bootstrap: fairlearn's ``MetricFrame(n_boot=...)`` resamples rows without regard to
groups, so a small group can vanish or swell in a replicate; here users are resampled *within*
their group (stratified), which keeps every group's size fixed.

Why permutation tests for gaps: the percentile bootstrap of ``max - min`` over group means is
biased away from zero when the groups are equal (the max of noisy means is above the true max),
so an interval that excludes zero is not evidence of a gap (REFERENCES.md, "Fairness
definitions"). Gates on "is there a gap" should read the permutation p-value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats as _st

__all__ = [
    "GroupedValues",
    "group_codes",
    "percentile_interval",
    "bootstrap_mean_ci",
    "stratified_bootstrap_group_means",
    "StudentizedTests",
    "permutations",
    "permuted_moments",
    "studentized_permutation_tests",
    "welch_t",
    "welch_f",
    "welch_df",
    "welch_interval",
    "t_quantile",
    "mc_interval",
    "exceedances",
    "benjamini_hochberg",
    "abs_interval",
    "t_interval",
    "paired_comparison",
    "holm",
    "seed_variance_share",
]

# Replicates are generated in chunks so that memory stays bounded (chunk x n_users cells).
_MAX_CELLS = 4_000_000


def _chunks(n_rep: int, n_cols: int) -> Iterable[int]:
    size = max(1, _MAX_CELLS // max(1, n_cols))
    done = 0
    while done < n_rep:
        step = min(size, n_rep - done)
        yield step
        done += step


@dataclass(frozen=True)
class GroupedValues:
    """Finite values with integer group codes; ``labels[c]`` names code ``c``."""

    values: np.ndarray
    codes: np.ndarray
    labels: list
    counts: np.ndarray


def group_codes(values: Iterable[float], groups: Iterable) -> GroupedValues:
    """Drop non-finite values and encode groups (sorted labels) as 0..G-1."""
    v = np.asarray(values, dtype=float)
    g = pd.Series(list(groups) if not isinstance(groups, (pd.Series, np.ndarray)) else groups)
    g = g.reset_index(drop=True)
    if len(v) != len(g):
        raise ValueError(f"values ({len(v)}) and groups ({len(g)}) differ in length.")
    keep = np.isfinite(v) & g.notna().to_numpy()
    v, g = v[keep], g[keep].astype(str)
    labels = sorted(g.unique().tolist())
    codes = pd.Categorical(g, categories=labels).codes.astype(np.int64)
    counts = np.bincount(codes, minlength=len(labels))
    return GroupedValues(v, codes, labels, counts)


def percentile_interval(samples: np.ndarray, level: float = 0.95, axis: int = 0) -> tuple:
    """Percentile interval of bootstrap replicates (NaN replicates ignored)."""
    a = (1.0 - level) / 2.0
    s = np.asarray(samples, dtype=float)
    if s.size == 0 or np.all(np.isnan(s)):
        return (np.nan, np.nan)
    lo, hi = np.nanquantile(s, [a, 1.0 - a], axis=axis)
    return (lo, hi)


def bootstrap_mean_ci(
    values: Iterable[float], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (non-finite values dropped)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    pos = 0
    for c in _chunks(n_boot, v.size):
        means[pos : pos + c] = v[rng.integers(0, v.size, size=(c, v.size))].mean(axis=1)
        pos += c
    return percentile_interval(means, level)


def stratified_bootstrap_group_means(
    values: Iterable[float], groups: Iterable, *, n_boot: int = 1000, seed: int = 0
) -> tuple[list, np.ndarray, np.ndarray]:
    """Bootstrap over users resampled within their group.

    Returns ``(labels, means, counts)`` with ``means`` of shape (n_boot, G): each replicate's
    group means. Group sizes are fixed, so the replicate's overall mean and any group's
    "rest" mean follow from ``means * counts``.
    """
    gv = group_codes(values, groups)
    rng = np.random.default_rng(seed)
    G = len(gv.labels)
    means = np.empty((n_boot, G))
    for j in range(G):
        x = gv.values[gv.codes == j]
        pos = 0
        for c in _chunks(n_boot, x.size):
            means[pos : pos + c, j] = x[rng.integers(0, x.size, size=(c, x.size))].mean(axis=1)
            pos += c
    return gv.labels, means, gv.counts


def exceedances(t_obs: float, t_perm: np.ndarray) -> int:
    """#{T_perm >= T_obs}; a tiny tolerance absorbs float noise (ties count as exceeding)."""
    tol = 1e-12 * max(1.0, abs(t_obs))
    return int(np.count_nonzero(t_perm >= t_obs - tol))


def _perm_p(t_obs: float, t_perm: np.ndarray) -> float:
    """p = (1 + #{T_perm >= T_obs}) / (1 + n_perm)."""
    if not np.isfinite(t_obs):
        return np.nan
    return float((1 + exceedances(t_obs, t_perm)) / (1 + t_perm.size))


def abs_interval(lo: float, hi: float) -> tuple[float, float]:
    """Interval for |d| implied by an interval [lo, hi] for d (covers |d| whenever d is covered)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return (np.nan, np.nan)
    if lo <= 0.0 <= hi:
        return (0.0, float(max(-lo, hi)))
    return (float(min(abs(lo), abs(hi))), float(max(abs(lo), abs(hi))))


def t_interval(values: Iterable[float], level: float = 0.95) -> dict:
    """Mean, sample std and Student-t interval across seeds.

    With one seed the spread is unknown: std and the interval are NaN and ``note`` says so.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    out = {"mean": float(v.mean()) if n else np.nan, "std": np.nan, "ci_low": np.nan,
           "ci_high": np.nan, "n": n, "note": ""}
    if n < 2:
        out["note"] = f"n={n}: no spread estimate, interval undefined"
        return out
    sd = float(v.std(ddof=1))
    half = float(_st.t.ppf(0.5 + level / 2.0, n - 1)) * sd / np.sqrt(n)
    out.update(std=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def paired_comparison(
    model: Iterable[float], baseline: Iterable[float], *, n_perm: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Paired comparison over users (pairs with a non-finite side dropped).

    mean_diff = mean(model - baseline) with a t interval, paired t-test (scipy ``ttest_rel``),
    sign-flip permutation p-value (two-sided, on |mean diff|) and Cohen's d_z = mean/sd of the
    differences.
    """
    m = np.asarray(model, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if m.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {m.shape} vs {b.shape}.")
    keep = np.isfinite(m) & np.isfinite(b)
    m, b = m[keep], b[keep]
    d = m - b
    n = int(d.size)
    out = {"mean_diff": float(d.mean()) if n else np.nan, "ci_low": np.nan, "ci_high": np.nan,
           "t_stat": np.nan, "p_ttest": np.nan, "p_perm": np.nan, "effect_size": np.nan, "n": n}
    if n < 2:
        return out
    ti = t_interval(d, level)
    out["ci_low"], out["ci_high"] = ti["ci_low"], ti["ci_high"]
    sd = float(d.std(ddof=1))
    if sd > 0:
        res = _st.ttest_rel(m, b)
        out["t_stat"], out["p_ttest"] = float(res.statistic), float(res.pvalue)
        out["effect_size"] = float(d.mean() / sd)
    elif np.all(d == 0):
        out["p_ttest"], out["effect_size"] = 1.0, 0.0
    rng = np.random.default_rng(seed)
    t_obs = abs(float(d.mean()))
    t_perm = np.empty(n_perm)
    pos = 0
    for c in _chunks(n_perm, n):
        signs = rng.integers(0, 2, size=(c, n), dtype=np.int8) * 2 - 1
        t_perm[pos : pos + c] = np.abs(signs @ d) / n
        pos += c
    out["p_perm"] = _perm_p(t_obs, t_perm)
    return out


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN entries stay NaN and do not count in m).

    p_(i) sorted ascending, adjusted_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def seed_variance_share(matrix: np.ndarray | pd.DataFrame) -> dict:
    """Two-way split of a user x seed matrix of per-user metric values.

    With grand mean m, user means u_i, seed means s_j (n users, k seeds):
    SS_total = sum_ij (x_ij - m)^2, SS_seed = n * sum_j (s_j - m)^2,
    SS_user = k * sum_i (u_i - m)^2, SS_rest = SS_total - SS_seed - SS_user (user x seed
    interaction / noise). Shares are SS / SS_total. between_seed_share is the part of the spread
    explained by which seed was used; everything else is "the rest". Users with a missing value
    in any seed are dropped (the decomposition needs a complete matrix).
    """
    x = np.asarray(matrix, dtype=float)
    if x.ndim != 2:
        raise ValueError("seed_variance_share needs a 2-D users x seeds matrix.")
    x = x[np.all(np.isfinite(x), axis=1)]
    n, k = x.shape
    out = {"between_seed_share": np.nan, "between_user_share": np.nan, "residual_share": np.nan,
           "n_users": int(n), "n_seeds": int(k)}
    if n < 1 or k < 2:
        return out
    m = x.mean()
    ss_total = float(((x - m) ** 2).sum())
    if ss_total == 0:
        return out
    ss_seed = float(n * ((x.mean(axis=0) - m) ** 2).sum())
    ss_user = float(k * ((x.mean(axis=1) - m) ** 2).sum())
    out.update(between_seed_share=ss_seed / ss_total, between_user_share=ss_user / ss_total,
               residual_share=(ss_total - ss_seed - ss_user) / ss_total)
    return out


# --------------------------------------------------------------------------------------------
# Studentized permutation tests, Welch intervals, Monte-Carlo error, Benjamini-Hochberg
# --------------------------------------------------------------------------------------------


def welch_df(a1: np.ndarray, n1: np.ndarray, a2: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Welch-Satterthwaite degrees of freedom from squared standard errors a = var / n."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a1 + a2) ** 2 / (a1 ** 2 / (n1 - 1) + a2 ** 2 / (n2 - 1))


def welch_t(m1, v1, n1, m2, v2, n2) -> np.ndarray:
    """Welch t = (m1 - m2) / sqrt(v1/n1 + v2/n2), broadcast over any shape.

    With both variances zero the statistic is 0 for equal means and +-inf otherwise, so a
    permutation that separates two constant groups counts as extreme rather than as NaN.
    """
    d = np.asarray(m1, dtype=float) - m2
    se = np.sqrt(np.maximum(v1, 0.0) / n1 + np.maximum(v2, 0.0) / n2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = d / se
        return np.where(se > 0, t, np.where(d == 0, 0.0, np.sign(d) * np.inf))


def t_quantile(level: float, df, m: int = 1) -> np.ndarray:
    """Two-sided Student-t critical value at ``level``, Bonferroni-split over ``m`` intervals.

    Each of m intervals gets level 1 - (1 - level) / m, so all m cover together with probability
    at least ``level`` (why: the gap record reports the interval of a data-chosen pair, which is
    only honest when every pair is covered at once).
    """
    q = 1.0 - (1.0 - level) / (2.0 * max(1, int(m)))
    return _st.t.ppf(q, np.asarray(df, dtype=float))


def welch_interval(d, a1, n1, a2, n2, level: float = 0.95, m: int = 1) -> tuple:
    """d +- t(Welch df, Bonferroni over m) * sqrt(a1 + a2); a = squared standard errors.

    Broadcasts, so the benchmark applies the audit's exact formula to thousands of draws.
    """
    q = t_quantile(level, welch_df(a1, n1, a2, n2), m)
    half = q * np.sqrt(np.asarray(a1, dtype=float) + a2)
    return d - half, d + half


def _moments(V: np.ndarray, onehot: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group means and unbiased variances of ``V`` (..., N) for groups given as (N, G) one-hot."""
    s1 = V @ onehot
    s2 = (V * V) @ onehot
    mean = s1 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1)
    return mean, var


def welch_f(mean: np.ndarray, var: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Welch's heteroscedastic one-way F over the last axis (Welch 1951); F = t^2 for two groups.

    Weights w = n / var; a zero variance is floored at 1e-12 so constant groups stay finite.
    """
    w = n / np.maximum(var, 1e-12)
    sw = w.sum(axis=-1, keepdims=True)
    mw = (w * mean).sum(axis=-1, keepdims=True) / sw
    k = mean.shape[-1]
    between = (w * (mean - mw) ** 2).sum(axis=-1) / (k - 1)
    lam = ((1.0 - w / sw) ** 2 / (n - 1)).sum(axis=-1)
    return between / (1.0 + 2.0 * (k - 2) / (k * k - 1) * lam)


def _studentized(mean: np.ndarray, var: np.ndarray, n: np.ndarray, N: int, tot1: np.ndarray,
                 tot2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Welch F over all groups, |Welch t| of each group against the rest pooled) per row."""
    rn = N - n
    r1 = tot1[..., None] - mean * n
    r2 = tot2[..., None] - (var * (n - 1) + n * mean * mean)
    rmean = r1 / rn
    with np.errstate(divide="ignore", invalid="ignore"):
        rvar = np.maximum(r2 - rn * rmean * rmean, 0.0) / (rn - 1)
    return welch_f(mean, var, n), np.abs(welch_t(mean, var, n, rmean, rvar, rn))


@functools.lru_cache(maxsize=4)
def permutations(n: int, n_perm: int, seed: int) -> np.ndarray:
    """``n_perm`` random orderings of ``range(n)`` (read-only, cached).

    Why cached: every test of a family over the same number of users can share one set of
    relabellings (each test stays exact on its own), which removes the main cost of the stage.
    """
    rng = np.random.default_rng(seed)
    out = rng.permuted(np.broadcast_to(np.arange(n, dtype=np.int32), (n_perm, n)), axis=1)
    out.setflags(write=False)
    return out


def permuted_moments(V: np.ndarray, codes: np.ndarray, *, n_perm: int, seed: int):
    """Yield (means, variances), each (D, c, G), of the groups under blocks of relabellings.

    Relabelling users (``codes[perm]``) and summing by a matrix product, (D, N) @ (N, c * G)
    one-hot, serves all D draws at once; this replaced gathering permuted values, which cost
    D * c * N random reads per block.
    """
    D, N = V.shape
    G = int(codes.max()) + 1
    n = np.bincount(codes, minlength=G).astype(float)
    perms = permutations(N, n_perm, seed)
    V2 = V * V
    pos = 0
    for c in _chunks(n_perm, max(N, D) * G):
        onehot = (codes[perms[pos : pos + c]].T[:, :, None] == np.arange(G)).reshape(N, c * G)
        onehot = onehot.astype(float)
        pos += c
        pm = (V @ onehot).reshape(D, c, G) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            pv = np.maximum((V2 @ onehot).reshape(D, c, G) - n * pm * pm, 0.0) / (n - 1)
        yield pm, pv


@dataclass(frozen=True)
class StudentizedTests:
    """Permutation tests on studentized statistics for one or many draws of the same groups.

    ``stat_max`` (D,): observed Welch F over all groups (the square of Welch t for two
    groups, so the same test); ``stat_rest`` (D, G): observed |Welch t| of each group against the others
    pooled. ``exceed_*``: how many of the ``n_perm`` relabellings reached the observed value;
    ``p_*`` = (1 + exceed) / (1 + n_perm).
    """

    stat_max: np.ndarray
    stat_rest: np.ndarray
    exceed_max: np.ndarray
    exceed_rest: np.ndarray
    n_perm: int

    @property
    def p_max(self) -> np.ndarray:
        return (1.0 + self.exceed_max) / (1.0 + self.n_perm)

    @property
    def p_rest(self) -> np.ndarray:
        return (1.0 + self.exceed_rest) / (1.0 + self.n_perm)


def studentized_permutation_tests(
    values: np.ndarray, codes: np.ndarray, *, n_perm: int = 9999, seed: int = 0,
) -> StudentizedTests:
    """Permute users between groups and compare studentized statistics (Welch t).

    ``values``: (N,) per-user values or (D, N) for D independent draws over the same users and
    groups (the calibration benchmark); ``codes``: (N,) group codes 0..G-1, every group with at
    least two users; relabellings come from ``permutations(N, n_perm, seed)``. Why studentized: permuting a raw difference of means tests "identical
    distributions" and rejects too often when groups differ in spread; permuting Welch t is
    exact under exchangeability and asymptotically valid for equal means (Janssen 1997; Chung &
    Romano 2013). One set of relabellings serves the omnibus and every group-vs-rest test, and
    the same relabellings serve all D draws.
    """
    V = np.atleast_2d(np.asarray(values, dtype=float))
    codes = np.asarray(codes, dtype=np.int64)
    D, N = V.shape
    G = int(codes.max()) + 1
    onehot = np.zeros((N, G))
    onehot[np.arange(N), codes] = 1.0
    n = onehot.sum(axis=0)
    if G < 2 or n.min() < 2:
        raise ValueError(f"studentized tests need at least two groups of two users (sizes {n.tolist()}).")
    tot1, tot2 = V.sum(axis=1), (V * V).sum(axis=1)
    m, v = _moments(V, onehot, n)
    obs_max, obs_rest = _studentized(m, v, n, N, tot1, tot2)
    tol_max = 1e-9 * np.maximum(1.0, obs_max)
    tol_rest = 1e-9 * np.maximum(1.0, obs_rest)
    ex_max = np.zeros(D, dtype=np.int64)
    ex_rest = np.zeros((D, G), dtype=np.int64)
    for pm, pv in permuted_moments(V, codes, n_perm=n_perm, seed=seed):
        tmax, trest = _studentized(pm, pv, n, N, tot1[:, None], tot2[:, None])
        ex_max += np.count_nonzero(tmax >= (obs_max - tol_max)[:, None], axis=1)
        ex_rest += np.count_nonzero(trest >= (obs_rest - tol_rest)[:, None, :], axis=1)
    return StudentizedTests(obs_max, obs_rest, ex_max, ex_rest, int(n_perm))


def mc_interval(exceed, n_perm: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson interval for the p-value an infinite number of permutations would give.

    ``exceed`` of ``n_perm`` relabellings reached the observed statistic; the interval says how
    far Monte-Carlo error alone could move the p-value.
    """
    b = np.asarray(exceed, dtype=float)
    a = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        lo = np.where(b > 0, _st.beta.ppf(a, b, n_perm - b + 1), 0.0)
        hi = np.where(b < n_perm, _st.beta.ppf(1.0 - a, b + 1, n_perm - b), 1.0)
    return lo, hi


def benjamini_hochberg(pvalues: Iterable[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy); NaN entries stay NaN and do not count in m."""
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = _st.false_discovery_control(p[ok], method="bh")
    return out
