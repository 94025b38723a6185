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
    "bootstrap_group_difference_ci",
    "permuted_group_means",
    "permutation_test_gap",
    "permutation_test_two_groups",
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


def bootstrap_group_difference_ci(
    a: Iterable[float], b: Iterable[float], *, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean(a) - mean(b), ci_low, ci_high), each sample resampled on its own (stratified)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return (np.nan, np.nan, np.nan)
    vals = np.concatenate([a, b])
    grp = np.array(["a"] * a.size + ["b"] * b.size)
    labels, means, _ = stratified_bootstrap_group_means(vals, grp, n_boot=n_boot, seed=seed)
    d = means[:, labels.index("a")] - means[:, labels.index("b")]
    lo, hi = percentile_interval(d, level)
    return (float(a.mean() - b.mean()), float(lo), float(hi))


def permuted_group_means(
    gv: GroupedValues, *, n_perm: int = 1000, seed: int = 0
) -> np.ndarray:
    """Group means under ``n_perm`` random relabellings (shape (n_perm, G)).

    Shuffling the labels keeps every group's size; group sums are one ``bincount`` per chunk.
    """
    rng = np.random.default_rng(seed)
    N, G = gv.values.size, len(gv.labels)
    out = np.empty((n_perm, G))
    pos = 0
    for c in _chunks(n_perm, N):
        perm = rng.permuted(np.broadcast_to(gv.codes, (c, N)), axis=1)
        flat = (np.arange(c)[:, None] * G + perm).ravel()
        sums = np.bincount(flat, weights=np.tile(gv.values, c), minlength=c * G).reshape(c, G)
        out[pos : pos + c] = sums / gv.counts
        pos += c
    return out


def _perm_p(t_obs: float, t_perm: np.ndarray) -> float:
    """p = (1 + #{T_perm >= T_obs}) / (1 + n_perm); a tiny tolerance absorbs float noise."""
    if not np.isfinite(t_obs):
        return np.nan
    tol = 1e-12 * max(1.0, abs(t_obs))
    return float((1 + np.count_nonzero(t_perm >= t_obs - tol)) / (1 + t_perm.size))


def permutation_test_gap(
    values: Iterable[float], groups: Iterable, *, n_perm: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(max - min of group means, permutation p-value); NaN p with fewer than two groups."""
    gv = group_codes(values, groups)
    if len(gv.labels) < 2:
        return (np.nan, np.nan)
    obs = np.bincount(gv.codes, weights=gv.values) / gv.counts
    t_obs = float(obs.max() - obs.min())
    pm = permuted_group_means(gv, n_perm=n_perm, seed=seed)
    return t_obs, _perm_p(t_obs, pm.max(axis=1) - pm.min(axis=1))


def permutation_test_two_groups(
    a: Iterable[float], b: Iterable[float], *, n_perm: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean(a) - mean(b), two-sided permutation p-value on |mean(a) - mean(b)|)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return (np.nan, np.nan)
    gv = group_codes(np.concatenate([a, b]), ["a"] * a.size + ["b"] * b.size)
    pm = permuted_group_means(gv, n_perm=n_perm, seed=seed)
    d = float(a.mean() - b.mean())
    return d, _perm_p(abs(d), np.abs(pm[:, 0] - pm[:, 1]))


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
