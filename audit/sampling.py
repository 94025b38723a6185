"""A stratified sample of evaluation users (params `evaluation.sample`) and the estimators that
account for it.

Why: at MovieLens-25M size, catalogue scoring and the counterfactual test cost hours per model and
seed because they run for every evaluation user. A stratified sample of users, drawn once per
scenario before any model is scored and written to data/tasks (`SAMPLE_FILE`), lets every later
stage run on fewer users while every model and seed still sees the SAME users, so paired
comparisons stay paired.

Strata. Every group the audit reports must be a union of sampling strata, so that its mean is an
ordinary stratified mean and its sample size can be guaranteed. The strata are therefore the
cells ("atoms") of the cross-classification of every reported stratum column (audit.strata, with
groups unmerged: a small group folded into "other" later is still a union of atoms). The cost:
with many attributes the atoms are small and the saving shrinks; a group at or under
`strata.min_group_size` is taken whole, so a reported group is never sampled below the floor.

Sizing. For each reported group g of N_g users: from a half-width h, n0 = (z S_g / h)^2 and
n_g = n0 / (1 + n0 / N_g) (finite population correction); from a maximum, n_g = min(N_g, max); both
set: the smaller; then n_g >= min(N_g, max(2, floor)). S_g is a PILOT standard deviation: that of
the per-user MAE of the item-mean baseline (training ratings; the global mean for items without
any) over every evaluation user of the group. The baseline needs no trained model, so the pilot is
the population value for that baseline, and the audited models' per-user errors have spreads of
the same order. Each atom takes the highest sampling rate any of its groups needs, rounded up
(n_a = max over its groups of ceil(n_g N_a / N_g), at least two users or the whole atom), so every
group gets at least n_g users, and its stratified variance is at most the target (stratifying
within the group can only lower it, up to N/(N - 1) terms).

Estimators. With design weights N_h / n_h, a mean is the stratified mean sum_h W_h ybar_h
(W_h = N_h / N). Its variance has two readings (`stratified_mean` gives both):
- about the value the full evaluation (every user) would give: sum_h W_h^2 (1 - n_h/N_h) s_h^2 / n_h,
  the finite population correction included (Cochran, Sampling Techniques, 5.6); this is what the
  coverage test under repeated sampling from a fixed population checks;
- about the population the evaluation users represent (what the audit's users intervals already
  target when everyone is evaluated): that design variance plus the population part
  sum_h W_h^2 s_h^2 / N_h, which adds up to sum_h W_h^2 s_h^2 / n_h and reduces to the unsampled
  stratified variance when n_h = N_h. The pipeline's bootstrap over users (`stratified_user_weights`)
  resamples within strata with these weights, so its intervals are of this second kind.

Every other sampled estimate is design-weighted as well (sample notes name each one's estimator):
a group that cuts across the strata, such as UGF's most active users, is a domain, whose mean is
the ratio sum w y / sum w with the linearised variance of `domain_contrast`; rates, exposure,
shilling effects and robustness curves count each user at its weight. Coverage, a union over
users, cannot be weighted and is reported as what it is: a lower bound.

Permutation tests among groups stay valid: within each stratum the sample is a simple random
sample drawn independently of the audited models' values (the pilot only sets how many), so under
the null hypothesis that a metric's values are exchangeable across groups, the sampled users'
values are exchangeable too; the p-value is conditional on the sample, its group sizes are the
sampled ones (lower power than everyone), and it speaks about the sampled users' groups.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats as _st

from audit.strata import strata_for
from metarec.data.schema import RatingData
from metarec.prepared import SAMPLE_FILE
from metarec.tasks import SCENARIOS

__all__ = [
    "PILOT",
    "SAMPLE_FILE",
    "SAMPLE_JSON",
    "SampleRule",
    "Design",
    "allocate",
    "domain_contrast",
    "draw",
    "pilot_errors",
    "sample_evaluation_users",
    "sample_scenario",
    "stratified_mean",
    "stratified_user_weights",
]

SAMPLE_JSON = "sample.json"        # in data/tasks: the rule, and population and sample per group and stratum
PILOT = ("standard deviation over every evaluation user of the group of the per-user MAE of the item-mean "
         "baseline (training ratings; the global mean for items without any)")


@dataclass(frozen=True)
class SampleRule:
    """How many users each reported group needs: from a target half-width of its mean MAE (at
    `level`) and/or a maximum per group; never below `floor` (taken whole at or under it)."""

    half_width: float | None
    max_per_group: int | None
    floor: int
    level: float = 0.95

    @classmethod
    def from_params(cls, evaluation: Mapping, strata: Mapping) -> "SampleRule | None":
        """None when `evaluation.sample` is null or sets neither key: everyone is evaluated."""
        cfg = (evaluation or {}).get("sample") or {}
        hw, mx = cfg.get("half_width"), cfg.get("max_per_group")
        if hw is None and mx is None:
            return None
        return cls(None if hw is None else float(hw), None if mx is None else int(mx),
                   int((strata or {}).get("min_group_size", 10)), 1.0 - float(evaluation.get("alpha", 0.05)))

    def group_size(self, population: int, pilot_sd: float) -> int:
        """n_g for a group of `population` users whose pilot standard deviation is `pilot_sd`."""
        n = population
        if self.half_width is not None and np.isfinite(pilot_sd):
            z = float(_st.norm.ppf(0.5 + self.level / 2.0))
            n0 = (z * pilot_sd / self.half_width) ** 2
            n = min(n, math.ceil(n0 / (1.0 + n0 / population)))
        if self.max_per_group is not None:
            n = min(n, self.max_per_group)
        return min(population, max(n, 2, self.floor))

    def to_dict(self) -> dict:
        return {"half_width": self.half_width, "max_per_group": self.max_per_group, "min_group_size": self.floor,
                "level": self.level, "metric": "mae", "pilot": PILOT,
                "allocation": "per group from the rule (half-width with the finite population correction); each "
                              "stratum at the highest rate any of its groups needs, rounded up"}


def pilot_errors(train: pd.DataFrame, split: pd.DataFrame) -> pd.Series:
    """user_id -> MAE of the item-mean baseline on the user's query ratings (the sizing pilot)."""
    item_mean = train.groupby("item_id")["rating"].mean()
    query = split[split["role"] == "query"]
    pred = query["item_id"].map(item_mean).fillna(float(train["rating"].mean()))
    err = (query["rating"] - pred).abs()
    return err.groupby(query["user_id"]).mean()


def allocate(labels: pd.DataFrame, pilot: pd.Series, rule: SampleRule) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(groups, strata) for one scenario's evaluation users.

    `labels`: user_id plus one column per reported stratum (unmerged labels). groups: attribute,
    group, population, pilot_sd, required. strata: stratum (0..H-1, by sorted labels), one column
    per attribute, population, sample.
    """
    attrs = [c for c in labels.columns if c != "user_id"]
    lab = labels.assign(_pilot=labels["user_id"].map(pilot).astype(float))
    rows = []
    for a in attrs:
        for g, f in lab.groupby(a, sort=True):
            sd = float(f["_pilot"].std(ddof=1)) if f["_pilot"].notna().sum() >= 2 else float("nan")
            rows.append({"attribute": a, "group": str(g), "population": len(f), "pilot_sd": sd,
                         "required": rule.group_size(len(f), sd)})
    groups = pd.DataFrame(rows, columns=["attribute", "group", "population", "pilot_sd", "required"])
    strata = lab.groupby(attrs, sort=True).size().rename("population").reset_index() if attrs else \
        pd.DataFrame({"population": [len(lab)]})
    need = np.minimum(strata["population"].to_numpy(), 2)
    for a in attrs:
        g = groups[groups.attribute == a].set_index("group")
        key = strata[a].astype(str)
        n_g, big_n = key.map(g["required"]).to_numpy(), key.map(g["population"]).to_numpy()
        need = np.maximum(need, -(-n_g * strata["population"].to_numpy() // big_n))   # exact integer ceiling
    if not attrs:   # no reported strata: one stratum sized as a group
        need = np.asarray([rule.group_size(len(lab), float(lab["_pilot"].std(ddof=1)))])
    strata["sample"] = np.minimum(need, strata["population"].to_numpy()).astype(np.int64)
    strata.insert(0, "stratum", np.arange(len(strata), dtype=np.int64))
    return groups, strata


def draw(labels: pd.DataFrame, strata: pd.DataFrame, seed: int | list[int]) -> pd.DataFrame:
    """user_id, stratum, sampled, weight (N_h / n_h when sampled, else 0): a simple random sample
    without replacement of `sample` users in each stratum, users in user_id order, strata in order."""
    attrs = [c for c in strata.columns if c not in ("stratum", "population", "sample")]
    lab = labels.sort_values("user_id", kind="stable")
    lab = lab.merge(strata, on=attrs, how="left") if attrs else lab.assign(stratum=0, population=len(lab),
                                                                           sample=int(strata["sample"].iloc[0]))
    rng = np.random.default_rng(seed)
    sampled = np.zeros(len(lab), dtype=bool)
    pos = lab.groupby("stratum", sort=True).indices
    for h, n in zip(strata["stratum"], strata["sample"]):
        idx = pos[h]
        sampled[idx[rng.choice(len(idx), size=int(n), replace=False)] if n < len(idx) else idx] = True
    weight = np.where(sampled, lab["population"] / lab["sample"], 0.0)
    return pd.DataFrame({"user_id": lab["user_id"].to_numpy(np.int64), "stratum": lab["stratum"].to_numpy(np.int64),
                         "sampled": sampled, "weight": weight.astype(np.float64)})


def sample_scenario(labels: pd.DataFrame, pilot: pd.Series, rule: SampleRule, seed: int | list[int]
                    ) -> tuple[pd.DataFrame, dict]:
    """The design rows of one scenario and its record (groups with population, required and
    sampled sizes; strata with population and sample)."""
    groups, strata = allocate(labels, pilot, rule)
    design = draw(labels, strata, seed)
    got = labels.merge(design[design.sampled][["user_id"]], on="user_id")
    attrs = [c for c in labels.columns if c != "user_id"]
    sampled = {(a, str(g)): int(n) for a in attrs for g, n in got[a].astype(str).value_counts().items()}
    groups["sampled"] = [sampled.get((a, g), 0) for a, g in zip(groups.attribute, groups.group)]
    record = {"population": int(len(design)), "sampled": int(design.sampled.sum()), "n_strata": int(len(strata)),
              "groups": json.loads(groups.to_json(orient="records")),
              "strata": json.loads(strata.to_json(orient="records"))}
    return design, record


def sample_evaluation_users(data: RatingData, splits: Mapping[str, pd.DataFrame], evaluation: Mapping,
                            strata: Mapping | None) -> tuple[pd.DataFrame, dict] | None:
    """The sample of every evaluation scenario (design rows with a scenario column, and the record
    for SAMPLE_JSON), or None when `evaluation.sample` is off. Scenario i of SCENARIOS draws from
    the generator seeded [evaluation.seed, i], so a scenario's sample does not depend on others."""
    rule = SampleRule.from_params(evaluation, strata)
    if rule is None:
        return None
    raw = strata_for(data, {**(strata or {}), "min_group_size": 1}).frame   # unmerged: "other" is a union
    seed = int(evaluation.get("seed", 0))
    frames, records = [], {}
    for i, scenario in enumerate(SCENARIOS):
        split = splits.get(scenario)
        if split is None or split.empty:
            continue
        labels = pd.DataFrame({"user_id": np.unique(split["user_id"].to_numpy())}).merge(raw, on="user_id", how="left")
        design, records[scenario] = sample_scenario(labels, pilot_errors(splits["train"], split), rule, [seed, i])
        frames.append(design.assign(scenario=scenario))
    frame = pd.concat(frames, ignore_index=True)[["scenario", "user_id", "stratum", "sampled", "weight"]] if frames \
        else pd.DataFrame({"scenario": pd.Series(dtype=object), "user_id": pd.Series(dtype=np.int64),
                           "stratum": pd.Series(dtype=np.int64), "sampled": pd.Series(dtype=bool),
                           "weight": pd.Series(dtype=np.float64)})
    return frame, {"rule": rule.to_dict(), "seed": seed, "strata": [c for c in raw.columns if c != "user_id"],
                   "scenarios": records}


@dataclass(frozen=True)
class Design:
    """The drawn sample as the stages read it: per scenario, every evaluation user with its
    stratum, whether it was sampled and its design weight."""

    frame: pd.DataFrame    # scenario, user_id, stratum, sampled, weight
    record: dict           # SAMPLE_JSON: rule, seed, strata columns, per scenario groups and strata

    @classmethod
    def load(cls, root: str | Path) -> "Design | None":
        """None when no sample was drawn (evaluation.sample off): everyone is evaluated."""
        path = Path(root) / SAMPLE_FILE
        if not path.is_file():
            return None
        return cls(pd.read_parquet(path), json.loads((Path(root) / SAMPLE_JSON).read_text(encoding="utf-8")))

    def sampled(self, scenario: str) -> pd.DataFrame:
        f = self.frame[(self.frame.scenario == scenario) & self.frame.sampled]
        return f[["user_id", "stratum", "weight"]].reset_index(drop=True)

    def weights(self) -> pd.DataFrame:
        """scenario, user_id, weight of the sampled users (for joining with per-user tables)."""
        return self.frame[self.frame.sampled][["scenario", "user_id", "weight"]].reset_index(drop=True)

    def population(self, scenario: str) -> pd.Series:
        """stratum -> N_h of one scenario."""
        return self.frame[self.frame.scenario == scenario].groupby("stratum").size()


# Metrics computed over the users' pooled predictions or lists rather than averaged per user.
POOLED = ("auc", "precision", "recall", "coverage", "gini")


# Record kinds of fairness.json whose group means are stratified (audit.fairness.group_comparison).
STRATIFIED_KINDS = ("group_metric", "gap", "gap_to_rest", "miscalibration")
UNWEIGHTED = {"estimator": "over the sampled users as they are, without design weights",
              "interval": "as without sampling, over the sampled users"}
POOLED_NOTES = {
    "coverage": {"estimator": "share of the catalogue in the sampled users' lists: a union over users, which design "
                              "weights cannot scale, so a lower bound of the coverage with everyone evaluated",
                 "interval": "as without sampling, over seeds"},
    **{m: {"estimator": "pooled over the sampled users' ratings or lists, each counted at its user's design weight",
           "interval": "as without sampling, over seeds"} for m in ("auc", "precision", "recall", "gini")},
}
CONDITIONAL_TEST = "permutation of the sampled users' group labels, valid conditionally on the sample; n counts sampled users"
# What the other sampled records estimate (audit.fairness, audit.counterfactual).
WEIGHTED_KINDS = {
    "ugf": {"estimator": "advantaged users: the most active top_frac of the represented population (cumulative "
                         "design weight); both sides design-weighted domain means",
            "interval": "|t interval of the signed difference|, linearised stratified standard error with "
                        "Satterthwaite df capped at the smaller side's sampled users less one",
            "test": CONDITIONAL_TEST},
    "parity": {"estimator": "group rates from design-weighted counts (ratios of weighted totals)",
               "test": "permutation of the sampled users' group labels, each user's weighted counts moving with the "
                       "user; valid conditionally on the sample; n counts sampled users"},
    "exposure": {"estimator": "item exposure with each list counted at its user's design weight"},
    "curve": {"estimator": "design-weighted means over the sampled users (a demographic shift re-weights the "
                           "represented population's mix); n counts sampled users"},
    "most_damaging": {"estimator": "the worst design-weighted curve value (curve records say how)"},
    "shilling": {"estimator": "prediction shift and hit ratio over the sampled users, each at its design weight"},
    "counterfactual": {"estimator": "design-weighted means over the sampled users (attributes ranked by the "
                                    "weighted mean); n counts sampled users"},
}


def sample_note(design: Design, scenario: str, metric: str = "", kind: str = "accuracy") -> dict:
    """The `sample` field of a record on a sampled scenario: population and sample sizes, the rule,
    and what the estimate, its interval and its test account for."""
    rec = design.record["scenarios"].get(scenario, {})
    note = {"n_population": rec.get("population"), "n_sampled": rec.get("sampled"), "n_strata": rec.get("n_strata"),
            "rule": design.record["rule"], "seed": design.record["seed"]}
    stratified = "stratified mean over the sampled users (design weights N_h / n_h)"
    if kind in ("accuracy", "comparison", "best_baseline_comparison", "winner") and metric in POOLED:
        return {**note, **POOLED_NOTES.get(metric, UNWEIGHTED)}
    if kind in ("accuracy", "comparison", "best_baseline_comparison", "winner"):
        return {**note, "estimator": stratified,
                "interval": "users bootstrap resampled within sampling strata with design weights: it covers the "
                            "population the users represent (the design variance with the finite population "
                            "correction plus the population part)"}
    if kind in STRATIFIED_KINDS:
        return {**note, "estimator": f"group means: {stratified}",
                "interval": "Student t / Welch with stratified standard errors (about the population the users "
                            "represent)",
                "test": CONDITIONAL_TEST}
    return {**note, **WEIGHTED_KINDS.get(kind, UNWEIGHTED)}


def stratified_mean(values, strata, population: Mapping | pd.Series, level: float = 0.95) -> dict:
    """Stratified mean of sampled values, with both variances and a Student-t interval for each.

    `strata`: each value's stratum; `population`: stratum -> N_h for every stratum of the domain
    (a stratum without finite values is an error: its mean is unknown). Keys: estimate; variance
    and ci_low/ci_high about the population the users represent (sum W^2 s^2 / n); var_sampling
    and ci_sampling_low/high about the full evaluation's value (finite population correction);
    df: Satterthwaite's effective degrees of freedom for the sampling interval (Cochran 5A.42);
    n, N. Strata with one finite value out of several users leave the variances NaN.
    """
    v = np.asarray(values, dtype=float)
    h = pd.Series(np.asarray(strata)).to_numpy()
    ok = np.isfinite(v)
    f = pd.DataFrame({"h": h[ok], "v": v[ok]}).groupby("h")["v"].agg(["mean", "var", "count"])
    pop = pd.Series(population, dtype=float)
    missing = sorted(set(pop.index) - set(f.index))
    if missing:
        raise ValueError(f"stratum {missing[0]!r} has no finite sampled value; its mean is unknown.")
    f = f.reindex(pop.index)
    big_n, n, s2 = pop.to_numpy(), f["count"].to_numpy(float), f["var"].to_numpy()
    s2 = np.where(n >= big_n, np.nan_to_num(s2), s2)          # a stratum taken whole: no sampling variance
    w = big_n / big_n.sum()
    est = float((w * f["mean"].to_numpy()).sum())
    a_samp = w ** 2 * (1.0 - n / big_n) / n
    a_pop = w ** 2 / n
    var_samp, var_pop = float((a_samp * s2).sum()), float((a_pop * s2).sum())
    out = {"estimate": est, "variance": var_pop, "var_sampling": var_samp, "n": int(n.sum()), "N": int(big_n.sum()),
           "n_strata": int(len(pop))}
    for name, var, a in (("", var_pop, a_pop), ("_sampling", var_samp, a_samp)):
        terms = a * s2
        with np.errstate(divide="ignore", invalid="ignore"):
            df = var ** 2 / np.nansum(np.where(n > 1, terms ** 2 / (n - 1), 0.0)) if var > 0 else np.inf
        half = float(_st.t.ppf(0.5 + level / 2.0, df)) * math.sqrt(var) if np.isfinite(var) else np.nan
        out[f"df{name}"] = float(df)
        out[f"ci{name}_low"], out[f"ci{name}_high"] = est - half, est + half
    return out


def domain_contrast(values, strata, weights, domains, coefs=(1.0,)) -> tuple[float, float, float]:
    """(estimate, standard error, df) of sum_j c_j ybar_j over the sampled users of one scenario,
    ybar_j the design-weighted mean sum w y / sum w over domain j (a bool mask: a group that need not
    be a union of strata, such as the most active 5% of users).

    Why a linearised variance: a domain that cuts across strata has a random number of sampled
    users in each, so the stratified formula (fixed N_h) does not apply. The ratio estimator's
    Taylor linearisation does (Lohr, Sampling, 2nd ed., 4.3 and 9.1): with z_i = sum_j c_j 1_j(i)
    (y_i - ybar_j) / Nhat_j, the variance is sum_h N_h^2 s_h^2(z) / n_h over every sampled user of
    stratum h (z = 0 outside the domains), the reading "about the population the users represent"
    of `stratified_mean` (no finite population correction), to which it reduces when each domain is
    a union of strata. Contrasts of domains drawn from the same strata are correlated; one z for
    the contrast carries that covariance. df: Satterthwaite over the strata's terms, capped at the
    smallest domain's sampled users less one: a domain of a dozen users spread over many strata
    otherwise gets a df its own size cannot support, and null simulations (tests/test_sampling.py)
    showed the uncapped interval under-covering there (0.93 where the cap gives 0.95). `values`,
    `strata`, `weights`: every sampled user of the scenario (NaN values count as outside every
    domain); N_h is the sum of the stratum's weights. A stratum with one sampled user out of
    several leaves the variance NaN, as in `stratified_mean`.
    """
    v = np.asarray(values, dtype=float)
    h = np.asarray(strata)
    w = np.asarray(weights, dtype=float)
    ok = np.isfinite(v)
    z = np.zeros(v.size)
    est, smallest = 0.0, v.size
    for mask, c in zip(domains, coefs):
        m = np.asarray(mask, dtype=bool) & ok
        total = float(w[m].sum())
        if not m.any() or total <= 0:
            return np.nan, np.nan, np.nan
        smallest = min(smallest, int(m.sum()))
        mean = float((w[m] * v[m]).sum() / total)
        est += c * mean
        z[m] += c * (v[m] - mean) / total
    f = pd.DataFrame({"h": h, "z": z, "w": w}).groupby("h").agg(n=("z", "size"), s2=("z", "var"), N=("w", "sum"))
    n, s2, big_n = f["n"].to_numpy(float), f["s2"].to_numpy(), f["N"].to_numpy()
    s2 = np.where(n >= big_n * (1 - 1e-9), np.nan_to_num(s2), s2)   # a stratum taken whole (one user)
    terms = big_n ** 2 * s2 / n
    var = float(terms.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        df = var ** 2 / np.nansum(np.where(n > 1, terms ** 2 / (n - 1), 0.0)) if var > 0 else np.inf
    return est, math.sqrt(var) if var >= 0 else np.nan, float(min(df, max(smallest - 1, 1)))


def stratified_user_weights(strata: np.ndarray, design_weights: np.ndarray, n_boot: int,
                            seed: int | list[int]) -> np.ndarray:
    """(n_boot, n_users) bootstrap weights: in each replicate every stratum's n_h users are drawn
    with replacement from that stratum, and each draw counts its design weight N_h / n_h.

    Why within strata: the sample's stratum sizes are fixed by design, so a replicate that let them
    vary would add variance the estimator does not have. A replicate's weighted mean is the
    stratified mean of the resampled users (the audit.hierarchical users part, stratified)."""
    h = np.asarray(strata)
    n_users = h.size
    rng = np.random.default_rng(seed)
    if n_users == 0:
        return np.zeros((n_boot, 0))
    order = np.argsort(h, kind="stable")
    codes, start, size = np.unique(h[order], return_index=True, return_counts=True)
    slot = np.repeat(np.arange(codes.size), size)     # the stratum of each sorted position
    picks = order[start[slot] + np.floor(rng.random((n_boot, n_users)) * size[slot]).astype(np.int64)]
    flat = picks + (np.arange(n_boot) * n_users)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_boot * n_users).reshape(n_boot, n_users)
    return counts * np.asarray(design_weights, dtype=np.float64)[None, :]
