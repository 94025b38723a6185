"""Intervals over training seeds and users: the two-level uncertainty of an accuracy number.

Why: the task split is fixed by `tasks.seed`, so an interval over training seeds alone says how much
the number moves when the model is retrained on the same users, not how much it would move on
another sample of users. The users a scenario evaluates are a sample from a population, and on
ML-100K that sampling dominates (issue 12: melu user_cold MAE +-0.0047 over seeds, about +-0.033 with
users resampled). Multi-level data are resampled at each level (hierarchical bootstrap; Saravanan
et al. 2020, REFERENCES.md).

The statistic is the pipeline's own: per seed, a transform of the mean over users (the identity,
or the square root of the mean squared error for RMSE), averaged over seeds. Its variance has two
parts, estimated at their own level:

- users: a bootstrap over the evaluated users (`user_weights`). One draw of users is shared by every
  seed, model and metric of a scenario, so a paired comparison stays paired over users and the
  user x seed structure is kept (a user's values under the five seeds move together).
- seeds: the sample variance of the per-seed values over the number of seeds, as in the Student-t
  interval over seeds. Five seeds are too few to resample: a bootstrap over them understates their
  variance by a fifth and its percentiles ignore the t tail, which under-covers when seeds matter
  (tests/test_hierarchical.py measures both).

The interval is estimate +- t(df) x sqrt(V_users + V_seeds), with Welch-Satterthwaite df from
n_users - 1 and n_seeds - 1; the user x seed interaction is counted in both parts, so the interval
errs on the wide side by about that term over (n_users x n_seeds). The p-value of a paired
difference is the matching two-sided t probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as _st

Transform = Callable[[np.ndarray], np.ndarray]


def user_weights(n_users: int, n_boot: int, seed: int | list[int]) -> np.ndarray:
    """(n_boot, n_users) bootstrap counts: each row draws n_users users with replacement."""
    rng = np.random.default_rng(seed)
    if n_users == 0:
        return np.zeros((n_boot, 0))
    draws = rng.integers(0, n_users, size=(n_boot, n_users)) + (np.arange(n_boot) * n_users)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * n_users).reshape(n_boot, n_users).astype(np.float64)


@dataclass(frozen=True)
class SeedValues:
    """A metric's per-seed values and their user-bootstrap replicates (all seeds kept in each)."""

    per_seed: np.ndarray  # (n_seeds,)
    replicates: np.ndarray  # (n_boot, n_seeds)
    n_users: int

    def __sub__(self, other: "SeedValues") -> "SeedValues":
        return SeedValues(self.per_seed - other.per_seed, self.replicates - other.replicates,
                          min(self.n_users, other.n_users))


def seed_values(matrix: np.ndarray, weights: np.ndarray, transform: Transform | None = None,
                mask: np.ndarray | None = None, unit_weights: np.ndarray | None = None) -> SeedValues:
    """Per-seed transform(mean over users) of a users x seeds matrix, and its bootstrap replicates.

    Non-finite cells (and cells outside `mask`) are left out of the means, so a user missing under
    one seed or without a defined value does not count as zero.
    """
    x = np.asarray(matrix, dtype=np.float64)
    ok = np.isfinite(x) if mask is None else (mask & np.isfinite(x))
    x0 = np.where(ok, x, 0.0)
    return seed_values_from_sums(x0, ok, weights @ x0, weights @ ok.astype(np.float64), transform, unit_weights)


def seed_values_from_sums(x0: np.ndarray, ok: np.ndarray, boot_sums: np.ndarray, boot_counts: np.ndarray,
                          transform: Transform | None = None, unit_weights: np.ndarray | None = None) -> SeedValues:
    """`seed_values` from precomputed replicate sums (weights @ x0) and counts (weights @ ok), so a
    caller can project many matrices through one draw of users in a single product.

    `unit_weights` (one per user): the design weights of a sampled evaluation (audit.sampling), so
    the per-seed value is the stratified mean; None: every user counts once."""
    g = transform or (lambda v: v)
    with np.errstate(invalid="ignore", divide="ignore"):
        if unit_weights is None:
            per_seed = g(x0.sum(axis=0) / ok.sum(axis=0))
        else:
            per_seed = g((unit_weights @ x0) / (unit_weights @ ok.astype(np.float64)))
        reps = g(boot_sums / boot_counts)
    return SeedValues(per_seed, reps, int(np.count_nonzero(ok.any(axis=1))))


def two_level_interval(v: SeedValues, level: float = 0.95) -> dict:
    """Estimate, standard error, df, interval and two-sided p (against 0) over seeds and users.

    NaN interval when fewer than two users or no finite value; with one seed the seed part is 0
    (there is no spread to estimate) and `note` says so.
    """
    s = v.per_seed[np.isfinite(v.per_seed)]
    out = {"estimate": float(s.mean()) if s.size else np.nan, "se": np.nan, "df": np.nan, "ci_low": np.nan,
           "ci_high": np.nan, "p_value": np.nan, "n_users": v.n_users, "n_seeds": int(s.size), "note": ""}
    reps = v.replicates.mean(axis=1) if v.replicates.size else np.zeros(0)
    reps = reps[np.isfinite(reps)]
    if s.size == 0 or v.n_users < 2 or reps.size < 2:
        out["note"] = "fewer than two users or replicates: interval over seeds and users undefined"
        return out
    var_users = float(reps.var(ddof=1))
    var_seeds = float(s.var(ddof=1) / s.size) if s.size >= 2 else 0.0
    if s.size < 2:
        out["note"] = "one seed: the interval covers users only"
    var = var_users + var_seeds
    if var == 0.0:
        out.update(se=0.0, df=np.inf, ci_low=out["estimate"], ci_high=out["estimate"],
                   p_value=1.0 if out["estimate"] == 0 else 0.0)
        return out
    denom = var_users**2 / (v.n_users - 1) + (var_seeds**2 / (s.size - 1) if s.size >= 2 else 0.0)
    df = var**2 / denom
    se = float(np.sqrt(var))
    half = float(_st.t.ppf(0.5 + level / 2.0, df)) * se
    out.update(se=se, df=float(df), ci_low=out["estimate"] - half, ci_high=out["estimate"] + half,
               p_value=float(2.0 * _st.t.sf(abs(out["estimate"]) / se, df)))
    return out
