"""Calibration of the fairness statistics the audit reports, in simulated worlds shaped like
ML-100K's user_cold scenario, where the truth is known.

Why: a p-value or a "95% interval" is only worth printing if it behaves as labelled for the group
sizes and spreads the audit actually meets. Each world holds 160 users with the group sizes of
user_cold (gender 46 / 114; age in seven buckets of 5 to 55; occupation in 19 groups of 1 to 33),
per-user values with unequal spreads (women's MAE sd 0.256, men's 0.198, smaller age buckets
noisier) and right-skewed noise (standardised gamma, shape 8, skewness 0.71: the skewness of
per-user MAE over 10 query ratings on ML-100K, measured with an item-mean predictor). Two metrics per world,
"mae" and "ndcg" (left-skewed, spreads reversed across ages), make one family of tests as the
audit builds it: per metric, the omnibus gap test of every attribute, every group against the
rest, and UGF (8 advantaged users against 152, which only a minimum size of at most 8 tests).

Null world: every group mean is equal. Planted worlds: women's MAE is higher by 0.05, 0.10 or
0.15, planted along the part of the gender contrast orthogonal to the age, occupation and UGF
groupings, so every other test stays exactly null and the false discovery rate is well defined.

Printed, each from ``--draws`` independent draws with its Monte-Carlo standard error: the
false-positive rate of every test (raw p <= 0.05), the family-wise error rate and the false
discovery rate after Benjamini-Hochberg, coverage of every interval (group means: Student t;
pairwise and group-vs-rest differences: Bonferroni-simultaneous Welch; the ratio of the
max/min pair; UGF), power at the planted gaps, and the previous raw-difference permutation test
for contrast. Run: ``python benchmarks/calibration.py [--draws 2000] [--perms 999] [--workers 2]``.
The test suite runs a reduced version (tests/test_calibration_synthetic.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audit import stats  # noqa: E402
from audit.fairness import size_groups  # noqa: E402

ALPHA = 0.05
LEVEL = 0.95
N_USERS = 160
GENDER = {"F": 46, "M": 114}
GENDER_SD = {"F": 0.256, "M": 0.198}
AGE = {"<18": 5, "56+": 5, "50-55": 10, "45-49": 16, "18-24": 30, "35-44": 39, "25-34": 55}
AGE_SPREAD = [1.5, 1.4, 1.25, 1.1, 1.0, 0.9, 0.85]          # smaller buckets are noisier
OCCUPATION = [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 6, 10, 13, 13, 22, 25, 33]
N_ADVANTAGED = 8                                           # top 5% of 160 users by activity
GAPS = (0.05, 0.10, 0.15)
SHAPE = 8.0   # gamma shape: skewness 2 / sqrt(8) = 0.71, as measured (docs/CALIBRATION.md)
BLOCK = 250                                                # draws sharing one set of relabellings


@dataclass(frozen=True)
class Design:
    """Fixed group labels of the 160 users (codes per attribute) and their noise scales."""

    labels: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]
    planted: np.ndarray


def design(seed: int = 0) -> Design:
    """Assign genders, ages, occupations and the UGF split to users, independently at random."""
    rng = np.random.default_rng(seed)

    def assign(sizes: dict) -> np.ndarray:
        lab = np.repeat(np.array(list(sizes), dtype=object), list(sizes.values()))
        return rng.permutation(lab)

    gender = assign(GENDER)
    age = assign(AGE)
    occ = assign({f"occ{i:02d}": n for i, n in enumerate(OCCUPATION)})
    ugf = assign({"advantaged": N_ADVANTAGED, "rest": N_USERS - N_ADVANTAGED})
    spread = dict(zip(AGE, AGE_SPREAD))
    f_age = np.array([spread[a] for a in age])
    f_age = f_age / np.sqrt(np.mean(f_age ** 2))
    sd_mae = np.array([GENDER_SD[g] for g in gender]) * f_age
    sd_ndcg = 0.12 * f_age[::-1]
    # planted contrast: women minus men, with every age, occupation and UGF group mean removed
    X = np.column_stack([pd.get_dummies(pd.Series(c)).to_numpy(float) for c in (age, occ, ugf)])
    y = (gender == "F").astype(float)
    resid = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    resid /= resid[gender == "F"].mean() - resid[gender == "M"].mean()
    return Design({"gender": gender, "age": age, "occupation": occ, "ugf": ugf},
                  {"mae": sd_mae, "ndcg": sd_ndcg}, resid)


def draw_values(d: Design, metric: str, draws: int, gap: float, rng) -> np.ndarray:
    """(draws, users) per-user values: equal means, the design's spreads, skewed noise."""
    eps = (rng.gamma(SHAPE, 1.0, (draws, N_USERS)) - SHAPE) / np.sqrt(SHAPE)  # mean 0, sd 1
    if metric == "mae":
        return 0.8 + d.sd["mae"] * eps + gap * d.planted
    return 0.75 - d.sd["ndcg"] * eps


@dataclass
class Row:
    """One printed line: a quantity, its world, its estimate and Monte-Carlo standard error."""

    quantity: str
    world: str
    min_size: int | str
    estimate: float
    se: float
    target: str


def _rate(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else np.nan


@dataclass
class AttributeResult:
    """Per-draw results for one attribute and metric: p-values, coverage indicators, truth."""

    p_gap: np.ndarray            # (D,)
    p_rest: np.ndarray           # (D, S)
    null_gap: bool
    null_rest: np.ndarray        # (S,)
    cover_means: dict            # group size -> (D,) bool
    cover_pairs: np.ndarray      # (D,) all pairs covered at once
    cover_gap: np.ndarray        # (D,) the max - min pair's interval covers its true difference
    cover_ratio: np.ndarray      # (D,)
    cover_rest: np.ndarray       # (D,) all groups' gap-to-rest intervals covered at once
    p_raw_difference: np.ndarray | None = None


def analyse(V: np.ndarray, labels: np.ndarray, truth: np.ndarray, min_size: int, n_perm: int,
            seed: int, raw: bool = False) -> AttributeResult | None:
    """Apply the audit's sizing, tests and intervals to every draw of one attribute.

    ``truth``: each user's expected value (the group's true mean is the mean over its users).
    Returns None when fewer than two groups reach ``min_size`` (the audit reports no test).
    """
    sg = size_groups(pd.Series(labels), min_size)
    lab = sg.labels.to_numpy()
    cover_means = {}
    for g in sg.counts.index:
        x = V[:, lab == g]
        n = x.shape[1]
        if n < 2:
            continue
        se = x.std(axis=1, ddof=1) / np.sqrt(n)
        half = stats.t_quantile(LEVEL, n - 1) * se
        mu = truth[lab == g].mean()
        cover_means.setdefault(n, []).append(np.abs(x.mean(axis=1) - mu) <= half)
    cover_means = {n: np.concatenate(v) for n, v in cover_means.items()}
    if len(sg.sufficient) < 2:
        return None
    keep = np.isin(lab, sg.sufficient)
    Vs, ts = V[:, keep], truth[keep]
    codes = pd.Categorical(lab[keep], categories=sg.sufficient).codes.astype(np.int64)
    S = len(sg.sufficient)
    # fresh relabellings for every block of draws, so that draws share few permutations
    blocks = [stats.studentized_permutation_tests(Vs[b:b + BLOCK], codes, n_perm=n_perm,
                                                  seed=seed + b) for b in range(0, len(Vs), BLOCK)]
    p_max = np.concatenate([b.p_max for b in blocks])
    p_rest = np.concatenate([b.p_rest for b in blocks])
    n = np.bincount(codes).astype(float)
    onehot = np.eye(S)[codes]
    mean = Vs @ onehot / n
    var = ((Vs * Vs) @ onehot - n * mean ** 2) / (n - 1)
    a = var / n
    mu = ts @ onehot / n
    # all pairs at once, Bonferroni over S(S-1)/2
    i, j = np.triu_indices(S, 1)
    lo, hi = stats.welch_interval(mean[:, i] - mean[:, j], a[:, i], n[i], a[:, j], n[j], LEVEL,
                                  len(i))
    true_d = mu[i] - mu[j]
    inside = (lo <= true_d) & (true_d <= hi)
    cover_pairs = inside.all(axis=1)
    # the reported pair (max, min of observed means)
    hi_j, lo_j = mean.argmax(axis=1), mean.argmin(axis=1)
    r = np.arange(V.shape[0])
    glo, ghi = stats.welch_interval(mean[r, hi_j] - mean[r, lo_j], a[r, hi_j], n[hi_j],
                                    a[r, lo_j], n[lo_j], LEVEL, len(i))
    gd = mu[hi_j] - mu[lo_j]
    cover_gap = (glo <= gd) & (gd <= ghi)
    # ratio min / max on the log scale, delta method, Bonferroni over pairs
    with np.errstate(divide="ignore", invalid="ignore"):
        llo, lhi = stats.welch_interval(np.log(mean[r, lo_j] / mean[r, hi_j]),
                                        a[r, lo_j] / mean[r, lo_j] ** 2, n[lo_j],
                                        a[r, hi_j] / mean[r, hi_j] ** 2, n[hi_j], LEVEL, len(i))
    tr = np.log(mu[lo_j] / mu[hi_j])
    cover_ratio = (llo <= tr) & (tr <= lhi)
    # each group against the rest, Bonferroni over S
    N = Vs.shape[1]
    rs = Vs.sum(axis=1)[:, None] - mean * n
    rss = (Vs * Vs).sum(axis=1)[:, None] - (var * (n - 1) + n * mean ** 2)
    rn = N - n
    rmean = rs / rn
    rvar = (rss - rn * rmean ** 2) / (rn - 1)
    rlo, rhi = stats.welch_interval(mean - rmean, a, n, rvar / rn, rn, LEVEL, S)
    tmu = mu - (ts.sum() - mu * n) / rn
    cover_rest = ((rlo <= tmu) & (tmu <= rhi)).all(axis=1)
    out = AttributeResult(p_max, p_rest, bool(np.allclose(mu, mu[0])),
                          np.isclose(tmu, 0.0), cover_means, cover_pairs, cover_gap,
                          cover_ratio, cover_rest)
    if raw:
        out.p_raw_difference = np.concatenate([raw_difference_p(Vs[b:b + BLOCK], codes, n_perm,
                                                                seed + b)
                                               for b in range(0, len(Vs), BLOCK)])
    return out


def raw_difference_p(V: np.ndarray, codes: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """The audit's previous test, for contrast: permuted max - min of raw group means."""
    n = np.bincount(codes).astype(float)
    m = V @ np.eye(len(n))[codes] / n
    obs = m.max(axis=1) - m.min(axis=1)
    exceed = np.zeros(V.shape[0])
    for pm, _ in stats.permuted_moments(V, codes, n_perm=n_perm, seed=seed):
        exceed += ((pm.max(axis=2) - pm.min(axis=2)) >= obs[:, None] - 1e-12).sum(axis=1)
    return (1 + exceed) / (1 + n_perm)


def family(results: dict, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BH over every test of the family per draw: (any false rejection, false discovery
    proportion, rejected) with rejected a dict key -> (D,) bool."""
    cols, nulls, keys = [], [], []
    for key, r in results.items():
        if r is None:
            continue
        cols.append(r.p_gap[:, None])
        nulls.append([r.null_gap])
        keys.append((key, "gap"))
        cols.append(r.p_rest)
        nulls.append(list(r.null_rest))
        keys += [(key, f"rest{j}") for j in range(r.p_rest.shape[1])]
    P = np.concatenate(cols, axis=1)
    null = np.concatenate([np.asarray(x, bool) for x in nulls])
    adj = np.apply_along_axis(stats.benjamini_hochberg, 1, P)
    rej = adj <= alpha
    false = (rej & null).sum(axis=1)
    fdp = np.where(rej.sum(axis=1) > 0, false / np.maximum(rej.sum(axis=1), 1), 0.0)
    gap_cols = {key: rej[:, i] for i, (key, what) in enumerate(keys) if what == "gap"}
    return false > 0, fdp, gap_cols


def _analyse_job(job: tuple) -> AttributeResult | None:
    return analyse(*job)


def run(draws: int = 2000, n_perm: int = 999, min_sizes=(5, 10, 20), default_min: int = 10,
        gaps=GAPS, seed: int = 0, workers: int = 1) -> list[Row]:
    """All rows of the table (see the module docstring).

    The minimum-size sweep runs on the null "mae" world; the family (both metrics, every
    attribute) at ``default_min``; planted worlds at ``default_min``.
    """
    d = design(seed)
    rng = np.random.default_rng(seed + 1)
    null = {m: draw_values(d, m, draws, 0.0, rng) for m in ("mae", "ndcg")}
    truth = {"mae": np.full(N_USERS, 0.8), "ndcg": np.full(N_USERS, 0.75)}
    jobs: dict[tuple, tuple] = {}
    for ms in min_sizes:
        for k, a in enumerate(("gender", "age", "occupation", "ugf")):
            jobs[("null", ms, "mae", a)] = (null["mae"], d.labels[a], truth["mae"], ms, n_perm,
                                            1000 * ms + 10 * k, a in ("gender", "age"))
    for k, a in enumerate(("gender", "age", "occupation", "ugf")):
        jobs[("null", default_min, "ndcg", a)] = (null["ndcg"], d.labels[a], truth["ndcg"],
                                                  default_min, n_perm, 5 + 10 * k, False)
    for gap in gaps:
        mae = draw_values(d, "mae", draws, gap, rng)
        for k, a in enumerate(("gender", "age", "occupation", "ugf")):
            jobs[(gap, default_min, "mae", a)] = (mae, d.labels[a], 0.8 + gap * d.planted,
                                                  default_min, n_perm, 7 + 10 * k, False)
    keys = list(jobs)
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = pool.map(_analyse_job, [jobs[k] for k in keys], chunksize=1)
    else:
        done = [_analyse_job(jobs[k]) for k in keys]
    res = dict(zip(keys, done))

    rows: list[Row] = []
    for ms in min_sizes:
        cover: dict[int, list] = {}
        for (world, m_s, metric, a), r in res.items():
            if world != "null" or m_s != ms or (metric == "ndcg" and ms != default_min):
                continue
            if r is None:
                rows.append(Row(f"{metric} {a}: not tested (fewer than 2 groups of {ms})",
                                "null", ms, np.nan, np.nan, ""))
                continue
            for n, c in r.cover_means.items():
                cover.setdefault(n, []).append(c)
            worst_rest = max(_rate(r.p_rest[:, j] <= ALPHA) for j in range(r.p_rest.shape[1]))
            rows += [
                Row(f"{metric} {a}: FPR omnibus gap test (permuted Welch)", "null", ms,
                    *_rate(r.p_gap <= ALPHA), "<= 0.06"),
                Row(f"{metric} {a}: FPR group vs rest (permuted Welch t, worst group)", "null",
                    ms, *worst_rest, "<= 0.06"),
                Row(f"{metric} {a}: coverage, all pairwise differences at once", "null", ms,
                    *_rate(r.cover_pairs), ">= 0.93"),
                Row(f"{metric} {a}: coverage, the max - min pair's interval", "null", ms,
                    *_rate(r.cover_gap), ">= 0.93"),
                Row(f"{metric} {a}: coverage, min/max ratio interval", "null", ms,
                    *_rate(r.cover_ratio), ">= 0.93"),
                Row(f"{metric} {a}: coverage, all group-vs-rest differences at once", "null",
                    ms, *_rate(r.cover_rest), ">= 0.93"),
            ]
            if r.p_raw_difference is not None:
                rows.append(Row(f"{metric} {a}: FPR previous raw-difference permutation",
                                "null", ms, *_rate(r.p_raw_difference <= ALPHA), "(contrast)"))
        for n in sorted(cover):
            if n <= 20:
                rows.append(Row(f"group mean Student t interval, n = {n}", "null", ms,
                                *_rate(np.concatenate(cover[n])), ">= 0.93"))
    fam = {(m, a): r for (w, ms, m, a), r in res.items() if w == "null" and ms == default_min}
    fw, _, _ = family(fam)
    rows.append(Row("family (2 metrics x 4 attributes): FWER after BH", "null", default_min,
                    *_rate(fw), "<= 0.05"))
    for gap in gaps:
        fam = {(m, a): (res[(gap, default_min, m, a)] if m == "mae" else r)
               for (m, a), r in fam.items()}
        g = fam[("mae", "gender")]
        _, fdp, rej = family(fam)
        w = f"planted {gap:.2f}"
        rows += [
            Row("mae gender: power, raw p <= 0.05", w, default_min, *_rate(g.p_gap <= ALPHA),
                ">= 0.8 at 0.15"),
            Row("mae gender: power, BH-adjusted in the family", w, default_min,
                *_rate(rej[("mae", "gender")]), ""),
            Row("mae gender: coverage, difference interval", w, default_min,
                *_rate(g.cover_gap), ">= 0.93"),
            Row("mae age: FPR omnibus (planted gender gap)", w, default_min,
                *_rate(fam[("mae", "age")].p_gap <= ALPHA), "<= 0.06"),
            Row("family: FDR after BH", w, default_min, *_rate(fdp), "<= 0.05"),
        ]
    return rows


def format_table(rows: list[Row]) -> str:
    """Markdown table (docs/CALIBRATION.md holds a copy)."""
    out = ["| quantity | world | min size | estimate | MC s.e. | target |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        est = "n/a" if np.isnan(r.estimate) else f"{r.estimate:.4f}"
        se = "" if np.isnan(r.se) else f"{r.se:.4f}"
        out.append(f"| {r.quantity} | {r.world} | {r.min_size} | {est} | {se} | {r.target} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--perms", type=int, default=999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (fork)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args.draws, args.perms, seed=args.seed, workers=args.workers)
    print(format_table(rows))
    print(f"\n{args.draws} draws, {args.perms} permutations per test, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
