"""Compare the candidate with the last signed release: non-inferiority and gap growth, paired.

The question a team gating a release asks is not "is the meta-learner better than a baseline of
the same run" but "is the candidate worse than what is in production". This module answers it
from two audits of the same users:

1. The baseline audit must verify: its DSSE bundle against its public key, every subject's hash,
   and the files used here must be among the signed subjects. Otherwise: exit 2 with the reason.
2. Both audits must have scored the same data and the same task split (metrics/provenance.json).
3. Per scenario, accuracy: new minus old per user (each averaged over its own training seeds),
   with a bootstrap that resamples seeds within each audit and users jointly (the same users for
   both, so the comparison stays paired). Non-inferiority: the one-sided 95% upper bound of the
   change (in the "worse" direction) must stay below the margin. Outcome ``pass`` when it does,
   ``fail`` when even the lower bound is beyond the margin, ``inconclusive`` otherwise.
4. Per scenario and sensitive attribute, fairness: the change of the MAE gap (largest minus
   smallest group mean among groups of at least the minimum size), users resampled within their
   groups, the same way. The gap must not widen by more than its margin.
5. Under `evaluation.sample` both audits must have scored the same sample (its digest is in the
   provenance), and every mean is design-weighted (audit.sampling): the accuracy change is the
   stratified mean of the per-user changes, its users part the stratified variance about the
   population the users represent; gap bootstraps resample users within sampling strata, each at
   its design weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit import registry
from audit.sampling import Design, stratified_mean, stratified_user_weights
from metarec.errors import MetarecError

__all__ = ["RegressionInputError", "Baseline", "load_baseline", "check_same_inputs", "accuracy_change",
           "gap_change", "regression_records"]

USED_SUBJECTS = ("results/per_user.parquet", "metrics/provenance.json")
INTERVAL = ("two-sided {level}% interval (one-sided bounds at half the rest): users paired, users and training "
            "seeds both sampled")
SAMPLED_INTERVAL = ("; sampled users: stratified mean with design weights, its variance the stratified users "
                    "part about the population the users represent plus the seeds part, less the seed-by-user "
                    "noise both hold")


class RegressionInputError(MetarecError):
    """The baseline cannot be used: it does not verify, or it scored other data or other tasks."""


@dataclass(frozen=True)
class Baseline:
    """A verified release audit: its per-user results and provenance, and who signed it."""

    per_user: pd.DataFrame
    provenance: dict[str, Any]
    keyid: str
    audit_dir: Path


def load_baseline(cfg: dict[str, Any], root: Path) -> Baseline:
    """Verify the baseline bundle and read the signed files this comparison uses."""
    from audit import signing

    missing = [k for k in ("audit_dir", "bundle", "key", "model") if not cfg.get(k)]
    if missing:
        raise RegressionInputError(f"params.yaml baseline: missing {', '.join(missing)} "
                                   f"(expected audit_dir, bundle, key, model and optional margins)")
    audit_dir, bundle, key = (Path(root) / str(cfg[k]) for k in ("audit_dir", "bundle", "key"))
    try:
        verified = signing.verify(bundle, key, audit_dir)
    except (signing.VerificationFailed, signing.VerifyInputError) as exc:
        raise RegressionInputError(f"baseline bundle {cfg['bundle']} does not verify with {cfg['key']}: {exc}") from None
    unsigned = [n for n in USED_SUBJECTS if n not in verified.names]
    if unsigned:
        raise RegressionInputError(f"baseline bundle {cfg['bundle']} does not sign {unsigned[0]}, which the "
                                   f"comparison needs")
    per_user = pd.read_parquet(audit_dir / "results" / "per_user.parquet")
    if str(cfg["model"]) not in set(per_user["model"].astype(str)):
        raise RegressionInputError(f"baseline audit {cfg['audit_dir']} has no per-user results for model "
                                   f"{cfg['model']!r}; it audited {sorted(set(per_user['model'].astype(str)))}")
    prov = json.loads((audit_dir / "metrics" / "provenance.json").read_text(encoding="utf-8"))
    return Baseline(per_user, prov, verified.keyid, audit_dir)


def check_same_inputs(current: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Refuse a comparison across different data, task splits or evaluation samples."""
    for key, what in (("data_canonical_sha256", "data (canonical ratings checksum)"),
                      ("tasks_sha256", "task split"), ("sample_sha256", "evaluation sample")):
        if current.get(key) != baseline.get(key):
            raise RegressionInputError(f"the baseline audit used other {what}: {_short(baseline.get(key))} "
                                       f"against this audit's {_short(current.get(key))}; a paired "
                                       f"comparison needs the same users and ratings")


def _short(digest: Any) -> str:
    """A digest's first 16 characters, or "none" (an audit without an evaluation sample has none)."""
    return "none" if digest is None else f"{str(digest)[:16]}..."


def _matrix(per_user: pd.DataFrame, model: str, scenario: str, metric: str) -> pd.DataFrame:
    """seeds x users values of one model, scenario and metric."""
    f = per_user[(per_user["model"].astype(str) == model) & (per_user["scenario"] == scenario)
                 & (per_user["metric"] == metric)]
    return f.pivot_table(index="seed", columns="user_id", values="value", aggfunc="mean")


def _seed_weights(new: pd.DataFrame, old: pd.DataFrame, n_boot: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap weights over each audit's seeds (resampling with replacement), rows summing to 1.

    When both audits trained under the same seeds, seed pairs are resampled together: for two
    independent runs that is still a valid bootstrap of the difference, and an unchanged model
    then compares as exactly unchanged.
    """
    def draw(n: int) -> np.ndarray:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n

    if list(new.index) == list(old.index):
        w = draw(len(new.index))
        return w, w
    return draw(len(new.index)), draw(len(old.index))


def _outcome(lo: float, hi: float, margin: float) -> str:
    """Non-inferiority on a 'worse is positive' change: pass below the margin, fail beyond it."""
    if hi < margin:
        return "pass"
    if lo > margin:
        return "fail"
    return "inconclusive"


def _two_way_variance(x: np.ndarray) -> tuple[float, float]:
    """Variance of the grand mean of a seeds x users table and its Satterthwaite degrees of freedom.

    Model x_su = mu + seed_s + user_u + e_su (two-way random effects, one value per cell):
    Var(grand mean) = (MS_users + MS_seeds - MS_error) / (S U), estimated from the mean squares.
    Both users and training seeds are sampled, so both enter; with one seed only users do.
    """
    s, u = x.shape
    grand = x.mean()
    if u < 2:
        return float("nan"), float("nan")
    if s < 2:
        ms_u = float(x.var(ddof=1))
        return ms_u / u, float(u - 1)
    row, col = x.mean(axis=1, keepdims=True), x.mean(axis=0, keepdims=True)
    ms_s = u * float(((row - grand) ** 2).sum()) / (s - 1)
    ms_u = s * float(((col - grand) ** 2).sum()) / (u - 1)
    ms_e = float(((x - row - col + grand) ** 2).sum()) / ((s - 1) * (u - 1))
    total = max(ms_u + ms_s - ms_e, ms_e, 0.0)
    denom = ms_u ** 2 / (u - 1) + ms_s ** 2 / (s - 1) + ms_e ** 2 / ((s - 1) * (u - 1))
    return total / (s * u), (total ** 2 / denom) if denom > 0 else float("inf")


def _satterthwaite(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """Sum of independent variance parts (variance, df) and its Satterthwaite degrees of freedom."""
    var = sum(v for v, _ in parts)
    denom = sum(v ** 2 / d for v, d in parts if np.isfinite(d) and d > 0)
    return var, (var ** 2 / denom if denom > 0 else float("inf"))


def _seed_parts(xs: list[np.ndarray], w: np.ndarray | None = None) -> list[tuple[float, float]]:
    """The variance of each seeds x users table's grand mean (users weighted by w, summing to one,
    or equally) that its seeds add."""
    return [(float((x.mean(axis=1) if w is None else x @ w).var(ddof=1)) / x.shape[0], x.shape[0] - 1)
            for x in xs if x.shape[0] > 1]


def _residual_ms(x: np.ndarray) -> float:
    """MS_error of a seeds x users table under the two-way model x_su = mu + seed_s + user_u + e_su."""
    s, u = x.shape
    e = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + x.mean()
    return float((e ** 2).sum()) / ((s - 1) * (u - 1))


def _sampled_variance(a: np.ndarray, b: np.ndarray, same_seeds: bool, strata: np.ndarray,
                      population: pd.Series) -> tuple[float, float, float, float, float]:
    """(new, old, new - old, its variance, df) for sampled users (the columns of a and b) from the
    strata in `population` (stratum -> N_h; every one must have a scored user).

    Every user of stratum h counts W_h / m_h (W_h = N_h / N, m_h its users scored in both audits),
    so new, old and their difference are stratified means. Variance, the weighted two-way analogue
    of `_two_way_variance` (to which it reduces with one stratum taken whole): users part, the
    stratified variance of the per-user seed-averaged differences about the population the users
    represent (`stratified_mean`); seeds part, the spread over seeds of the weighted mean, of the
    paired differences when both audits ran the same seeds; both hold the seed-by-user noise
    sum w^2 MS_e / S, which is then subtracted once (floored at that noise, as there). With
    independent seeds each audit's seed spread is added, without that correction: conservative,
    as the unsampled path."""
    d_u = a.mean(axis=0) - b.mean(axis=0)
    users = stratified_mean(d_u, strata, population)
    counts = pd.Series(strata).value_counts()
    share = population / population.sum()
    w = (share.reindex(strata).to_numpy() / counts.reindex(strata).to_numpy()).astype(float)
    m_new, m_old = float(a.mean(axis=0) @ w), float(b.mean(axis=0) @ w)
    parts = [(users["variance"], users["df"])]
    if same_seeds and a.shape[0] > 1:
        (seeds, seeds_df), = _seed_parts([a - b], w)
        noise = float((w ** 2).sum()) * _residual_ms(a - b) / a.shape[0]
        total = max(users["variance"] + seeds - noise, noise, 0.0)
        denom = sum(v ** 2 / d for v, d in ((users["variance"], users["df"]), (seeds, seeds_df),
                                             (noise, (a.shape[0] - 1) * (a.shape[1] - 1))) if np.isfinite(d) and d > 0)
        return m_new, m_old, users["estimate"], total, (total ** 2 / denom if denom > 0 else float("inf"))
    parts += _seed_parts([a, b], w) if not same_seeds else []
    var, df = _satterthwaite(parts)
    return m_new, m_old, users["estimate"], var, df


def accuracy_change(new: pd.DataFrame, old: pd.DataFrame, metric: str, margin: float, *,
                    level: float = 0.90, design: pd.DataFrame | None = None,
                    population: pd.Series | None = None) -> dict[str, Any]:
    """Change of a per-user metric, new minus old, signed so that positive means worse.

    Paired over users. When both audits ran the same seeds, seed pairs are differenced too (an
    unchanged model then compares as exactly unchanged); otherwise each audit's seed spread adds
    its own variance. The interval is a t interval with Satterthwaite degrees of freedom, so few
    seeds widen it as they should (a bootstrap over 3 to 5 seeds under-covers).

    ``design`` (user_id-indexed stratum and weight) and ``population`` (stratum -> N_h): the users
    are a stratified sample (audit.sampling); means and the users variance are then stratified.
    """
    from scipy import stats as sps

    users = new.columns.intersection(old.columns)
    if design is not None:
        users = users.intersection(design.index)
    a, b = new[users].to_numpy(float), old[users].to_numpy(float)
    keep = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    a, b = a[:, keep], b[:, keep]
    sign = -registry.direction(metric) or 1          # lower better: +1; higher better: -1
    n = a.shape[1]
    same_seeds = list(new.index) == list(old.index)
    interval = INTERVAL.format(level=round(100 * level)) + ("" if design is None else SAMPLED_INTERVAL)
    base = {"metric": metric, "n_users": int(n), "margin": float(margin), "worse_is": "positive", "interval": interval}
    if n < 2:
        return {**base, "new": None, "old": None, "change": None, "ci_low": None, "ci_high": None,
                "outcome": "inconclusive"}
    if design is not None:
        if population is None:
            raise ValueError("accuracy_change: a sampling design needs its population (stratum -> N_h)")
        strata = design.loc[users[keep], "stratum"].to_numpy()
        unscored = sorted(set(population.index) - set(strata))
        if unscored:     # its users' mean is unknown, so the population's is too
            return {**base, "new": None, "old": None, "change": None, "ci_low": None, "ci_high": None,
                    "outcome": "inconclusive", "strata_without_scored_users": len(unscored)}
        m_new, m_old, diff, var, df = _sampled_variance(a, b, same_seeds, strata, population)
    else:
        m_new, m_old = float(a.mean()), float(b.mean())
        diff = m_new - m_old
        if same_seeds:
            var, df = _two_way_variance(a - b)
        else:   # users shared, seeds independent: user part from per-user differences, plus each seed spread
            d_u = a.mean(axis=0) - b.mean(axis=0)
            var, df = _satterthwaite([(float(d_u.var(ddof=1)) / n, n - 1),
                                      *_seed_parts([a, b])])
    point = sign * float(diff)
    if not np.isfinite(var):     # a sampling stratum left with one scored user of several: no variance
        return {**base, "new": m_new, "old": m_old, "change": point, "ci_low": None, "ci_high": None,
                "outcome": "inconclusive"}
    half = float(sps.t.ppf(0.5 + level / 2, df)) * float(np.sqrt(var)) if var > 0 else 0.0
    lo, hi = point - half, point + half
    return {**base, "new": m_new, "old": m_old, "change": point, "ci_low": lo, "ci_high": hi,
            "df": float(df), "outcome": _outcome(lo, hi, margin)}


def gap_change(new: pd.DataFrame, old: pd.DataFrame, groups: pd.Series, margin: float, *, min_size: int,
               n_boot: int, seed: int, design: pd.DataFrame | None = None) -> dict[str, Any] | None:
    """Change of the largest-minus-smallest group mean, new minus old; None with under two groups.

    ``design`` (user_id-indexed stratum and weight): the users are a stratified sample whose strata
    nest within the groups (audit.sampling); group means are then design-weighted, the bootstrap
    resamples users within strata, and a group's size is its sampled users."""
    users = new.columns.intersection(old.columns).intersection(groups.dropna().index)
    if design is not None:
        users = users.intersection(design.index)
    labels = groups.loc[users].astype(str)
    sizes = labels.value_counts()
    kept = sorted(sizes[sizes >= min_size].index)
    if len(kept) < 2:
        return None
    users = labels[labels.isin(kept)].index
    a, b = new[users].to_numpy(float), old[users].to_numpy(float)
    code = labels.loc[users].map({g: i for i, g in enumerate(kept)}).to_numpy()
    rng = np.random.default_rng(seed)
    wa, wb = _seed_weights(new, old, n_boot, rng)
    ua, ub = wa @ a, wb @ b                                   # [B, users] seed-resampled user values

    def gaps(x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        """max - min over groups of the (weighted) group means; x [B or 1, users]."""
        means = []
        for g in range(len(kept)):
            cols = code == g
            wg = np.ones((x.shape[0], cols.sum())) if w is None else w[:, cols]
            means.append((x[:, cols] * wg).sum(axis=1) / wg.sum(axis=1))
        m = np.stack(means, axis=1)
        return m.max(axis=1) - m.min(axis=1)

    if design is None:
        # users resampled within their group: per group, multinomial counts over its members
        w = np.zeros((n_boot, len(users)))
        for g in range(len(kept)):
            cols = np.flatnonzero(code == g)
            w[:, cols] = rng.multinomial(cols.size, np.full(cols.size, 1.0 / cols.size), size=n_boot)
        point_w = None
        how = "users resampled within their groups"
    else:
        strata, point_w = design.loc[users, "stratum"].to_numpy(), design.loc[users, "weight"].to_numpy(float)[None, :]
        w = stratified_user_weights(strata, point_w[0], n_boot, [seed, 1])
        how = "sampled users resampled within their sampling strata, each at its design weight"
    boot = gaps(ua, w) - gaps(ub, w)
    g_new = float(gaps(a.mean(axis=0, keepdims=True), point_w)[0])
    g_old = float(gaps(b.mean(axis=0, keepdims=True), point_w)[0])
    lo, hi = (float(q) for q in np.quantile(boot, [0.05, 0.95]))
    return {"gap_new": g_new, "gap_old": g_old, "change": g_new - g_old, "ci_low": lo, "ci_high": hi,
            "margin": float(margin), "outcome": _outcome(lo, hi, margin), "groups": kept,
            "n_users": int(len(users)), "worse_is": "positive",
            "interval": f"two-sided 90% percentile bootstrap: {how}, seed pairs jointly"}


def regression_records(current: pd.DataFrame, baseline: Baseline, candidate: str, baseline_model: str,
                       strata: pd.DataFrame, margins: dict[str, float], *, min_group_size: int,
                       n_boot: int = 4000, seed: int = 0, design: Design | None = None) -> list[dict[str, Any]]:
    """accuracy_change and gap_change records for every scenario both audits scored; `design`: the
    evaluation sample both scored (None: everyone was evaluated)."""
    records: list[dict[str, Any]] = []
    attrs = [c for c in strata.columns if c != "user_id"]
    strata = strata.set_index("user_id")
    scenarios = sorted(set(current["scenario"]) & set(baseline.per_user["scenario"]))
    base = {"candidate": candidate, "baseline": baseline_model}
    for si, scenario in enumerate(scenarios):
        sampled = None if design is None else design.sampled(scenario).set_index("user_id")
        population = None if design is None else design.population(scenario)
        for metric in (m for m in margins if m != "gap"):
            new = _matrix(current, candidate, scenario, metric)
            old = _matrix(baseline.per_user, baseline_model, scenario, metric)
            if new.empty or old.empty:
                continue
            r = accuracy_change(new, old, metric, margins[metric], design=sampled, population=population)
            records.append({"kind": "accuracy_change", "scenario": scenario, **base, **r})
        if "gap" not in margins:
            continue
        new = _matrix(current, candidate, scenario, "mae")
        old = _matrix(baseline.per_user, baseline_model, scenario, "mae")
        for ai, attr in enumerate(attrs):
            r = gap_change(new, old, strata[attr], margins["gap"], min_size=min_group_size, n_boot=n_boot,
                           seed=seed + 1000 * si + 500 + ai, design=sampled)
            if r is not None:
                records.append({"kind": "gap_change", "scenario": scenario, "attribute": attr, "metric": "mae",
                                **base, **r})
    return records


DEFAULT_MARGINS = {"mae": 0.005, "gap": 0.02}


def compare(root: Path, params: dict[str, Any], strata: pd.DataFrame) -> dict[str, Any]:
    """metrics/regression.json's content; with no `baseline` in params, an empty comparison."""
    cfg = params.get("baseline")
    if not cfg:
        return {"baseline": None, "note": "no baseline configured (params.yaml baseline)", "records": []}
    root = Path(root)
    margins = {**DEFAULT_MARGINS, **(cfg.get("margins") or {})}
    for name in margins:
        if name != "gap":
            registry.lookup(name)
    base = load_baseline(cfg, root)
    current_prov = json.loads((root / "metrics" / "provenance.json").read_text(encoding="utf-8"))
    check_same_inputs(current_prov, base.provenance)
    ev = params.get("evaluation", {})
    records = regression_records(pd.read_parquet(root / "results" / "per_user.parquet"), base,
                                 str(cfg.get("candidate") or params["meta_learner"]), str(cfg["model"]), strata,
                                 margins, min_group_size=int(params["strata"]["min_group_size"]),
                                 n_boot=int(ev.get("bootstrap", 4000)), seed=int(ev.get("seed", 0)),
                                 design=Design.load(root / "data" / "tasks"))
    outcomes = [r["outcome"] for r in records]
    verdict = "fail" if "fail" in outcomes else "inconclusive" if "inconclusive" in outcomes else "pass"
    return {"baseline": {"audit_dir": str(cfg["audit_dir"]), "model": str(cfg["model"]), "keyid": base.keyid,
                         "data_canonical_sha256": base.provenance.get("data_canonical_sha256"),
                         "tasks_sha256": base.provenance.get("tasks_sha256"),
                         "sample_sha256": base.provenance.get("sample_sha256")},
            "candidate": str(cfg.get("candidate") or params["meta_learner"]), "margins": margins,
            "verdict": verdict, "records": records}
