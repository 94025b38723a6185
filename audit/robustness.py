"""Robustness of a recommender to degraded inputs: perturb the evaluation tasks, ask again, and
measure how far the metrics move from the unperturbed numbers, overall and per user group.

The model is seen only through `predict(tasks) -> list[np.ndarray]` (metarec.models.base
.Recommender), so any model, ours or a user's, can be audited.

Perturbations (pure functions; each takes a numpy Generator and returns a new list of tasks; the
no-change level returns the input tasks themselves, so it reproduces the unperturbed numbers
exactly):

- `perturb_support_size(tasks, k, rng)`: keep a random subset of min(k, n) support ratings
  (original order kept). k = None ("none") is the full, unperturbed support; k = 0 is an empty
  support (the pure cold-start extreme).
- `perturb_rating_noise(tasks, p, rng)`: pool all support ratings of all tasks, choose exactly
  round_half_up(p * N) positions without replacement and redraw them uniformly from the integer
  scale rating_min..rating_max (a redraw may coincide with the old value).
- `perturb_attribute_noise(tasks, p, rng, attribute=...)`: choose exactly round_half_up(p * U) of
  the U users that have a value of the attribute; each gets a different value (categorical: uniform
  over the other observed values; numeric: drawn from the observed per-user values that differ from
  its own, so the marginal stays realistic). All tasks of a chosen user get the same new value;
  nothing else changes.
- `demographic_shift(per_user, labels, target)`: not a perturbation of inputs but of the user
  population: the per-user metric values re-weighted to another group mix (weight of a user in
  group g = target[g] / observed[g]).

`plan_attribute_perturbations` resolves params `robustness.attribute_noise` and
`robustness.demographic_shift` against the declared schema (defaults: the first sensitive
attribute; an equal mix of its groups), so a name the data lacks stops the run at prepare.

`robustness_curve` runs one perturbation over several levels and emits `curve` records;
`most_damaging` picks the worst one (`most_damaging` records). Both formats are in docs/DESIGN.md
(robustness.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Number
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from audit.metrics import design_weights_of
from audit.strata import available_strata, derive_strata
from metarec.errors import ConfigError

if TYPE_CHECKING:  # the audit only needs the Task dataclass and the predict protocol
    from metarec.data.schema import RatingData
    from metarec.models.base import Recommender
    from metarec.tasks import Task

PERTURBATIONS = ("support_size", "rating_noise", "attribute_noise", "demographic_shift")

# Metric direction by base name (the part before "@", lower-cased): +1 higher is better, -1 lower.
ERROR_METRICS = ("mae", "rmse", "mse", "error", "loss", "miscalibration", "gini")
ACCURACY_METRICS = ("ndcg", "precision", "recall", "hit", "hr", "mrr", "map", "auc", "accuracy", "f1",
                    "coverage", "aplt")

Evaluate = Callable[[pd.DataFrame], pd.DataFrame]


# --------------------------------------------------------------------------------------- helpers
def round_half_up(x: float) -> int:
    """Rounding used for 'a fraction p of n' counts: 0.5 rounds up (Python's round would go to even)."""
    return int(math.floor(x + 0.5))


def _is_missing(v: object) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _is_number(v: object) -> bool:
    return isinstance(v, (Number, np.number)) and not isinstance(v, (bool, np.bool_))


def _sorted_values(values: Iterable[object]) -> list[object]:
    """Distinct values in a stable order (sorted; by str when types do not compare)."""
    uniq: list[object] = []
    for v in values:
        if not any(v == u for u in uniq):
            uniq.append(v)
    try:
        return sorted(uniq)
    except TypeError:
        return sorted(uniq, key=str)


def _level_label(level: object) -> object:
    """JSON-friendly level: None -> 'none', numpy scalars -> Python, mixes -> 'F=0.5,M=0.5'."""
    if level is None:
        return "none"
    if isinstance(level, Mapping):
        return ",".join(f"{k}={float(v):g}" for k, v in level.items())
    if isinstance(level, np.generic):
        return level.item()
    return level


def _is_noop(perturbation: str, level: object) -> bool:
    if level is None or (isinstance(level, str) and level == "none"):
        return True
    if perturbation in ("rating_noise", "attribute_noise") and _is_number(level) and float(level) == 0.0:
        return True
    return False


# ---------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class AttributePerturbations:
    """Which attribute each attribute-level perturbation uses, resolved against the schema."""

    noise_attribute: str
    noise_levels: tuple[float, ...]
    shift_attribute: str
    shift_mix: dict[str, float]


def _section(cfg: Mapping, key: str) -> Mapping:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"params.yaml: robustness.{key} is {value!r}; expected a mapping with attribute and "
                          f"{'levels' if key == 'attribute_noise' else 'mix'}")
    return value


def _attribute(section: Mapping, where: str, known: Sequence[str], default: Sequence[str]) -> str:
    name = section.get("attribute")
    if name is None:
        if not default:
            raise ConfigError(f"params.yaml: {where} is not set and data.schema declares no sensitive attribute; "
                              f"expected one of {', '.join(known)}")
        return default[0]
    if name not in known:
        raise ConfigError(f"params.yaml: {where} names {name!r}, which is not an attribute of this dataset; "
                          f"expected one of {', '.join(known)}")
    return str(name)


def plan_attribute_perturbations(cfg: Mapping | None, data: "RatingData", *, min_size: int = 1) -> AttributePerturbations:
    """Resolve the attribute-noise and demographic-shift params against the data's schema.

    Why: the attributes are the data's, not MovieLens's; a name or group the data lacks is a
    configuration error to report before training, not a crash after it. Attribute noise needs a
    declared user attribute (a model input); the shift may use any stratum (derived ones and
    activity too). Its mix names groups as the strata label them (small groups merged into "other"
    at `min_size`); an unset mix is an equal share of every group.
    """
    cfg = cfg or {}
    spec = data.spec
    noise = _section(cfg, "attribute_noise")
    shift = _section(cfg, "demographic_shift")
    declared = [a.name for a in spec.user_attributes]
    noise_attr = _attribute(noise, "robustness.attribute_noise.attribute", declared, spec.sensitive)
    shift_attr = _attribute(shift, "robustness.demographic_shift.attribute", available_strata(spec), spec.sensitive)
    levels = noise.get("levels", [])
    if not isinstance(levels, (list, tuple)) or not all(_is_number(v) and 0 <= v <= 1 for v in levels):
        raise ConfigError(f"params.yaml: robustness.attribute_noise.levels is {levels!r}; expected a list of "
                          f"fractions between 0 and 1")
    counts = data.ratings.groupby("user_id").size()
    labels = derive_strata(data.users, [shift_attr], spec=spec, counts=counts, min_size=min_size).frame[shift_attr]
    groups = _sorted_values(labels.tolist())
    mix = shift.get("mix")
    if mix is None:
        mix = {g: 1.0 / len(groups) for g in groups}
    elif not isinstance(mix, Mapping) or not all(_is_number(v) and v >= 0 for v in mix.values()) \
            or sum(mix.values()) <= 0:
        raise ConfigError(f"params.yaml: robustness.demographic_shift.mix is {mix!r}; expected group: share "
                          f"pairs with non-negative shares and a positive sum")
    unknown = [g for g in mix if str(g) not in groups]
    if unknown:
        raise ConfigError(f"params.yaml: robustness.demographic_shift.mix names group {unknown[0]!r} of "
                          f"{shift_attr!r}, which no user is in; expected groups among {', '.join(groups)}")
    return AttributePerturbations(noise_attr, tuple(float(v) for v in levels), shift_attr,
                                  {str(g): float(v) for g, v in mix.items()})


# ---------------------------------------------------------------------------------- perturbations
def perturb_support_size(tasks: Sequence["Task"], k: int | None, rng: np.random.Generator) -> list["Task"]:
    """Keep k support ratings per task (a seeded random subset, original order kept).

    Why: cold-start quality hinges on how many ratings a new user gives; this traces the curve.
    k None is the unperturbed support; k >= n keeps all n (the task object itself is returned).
    """
    if k is None or (isinstance(k, str) and k == "none"):
        return list(tasks)
    k = int(k)
    if k < 0:
        raise ValueError(f"support size must be >= 0, got {k}")
    out = []
    for t in tasks:
        n = len(t.support_items)
        if k >= n:
            out.append(t)
            continue
        keep = np.sort(rng.choice(n, size=k, replace=False))
        out.append(t.replace(support_items=np.asarray(t.support_items)[keep].copy(),
                             support_ratings=np.asarray(t.support_ratings)[keep].copy()))
    return out


def perturb_rating_noise(tasks: Sequence["Task"], p: float, rng: np.random.Generator, *,
                         rating_min: int = 1, rating_max: int = 5) -> list["Task"]:
    """Replace a fraction p of all support ratings by uniform random ratings on the integer scale.

    Why: real users rate carelessly or mis-click; a robust model should degrade gracefully.
    Exactly round_half_up(p * N) positions of the pooled N support ratings are redrawn (without
    replacement); tasks with no redrawn rating are returned unchanged (same object).
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"noise fraction must be in [0, 1], got {p}")
    if rating_min > rating_max:
        raise ValueError(f"rating_min {rating_min} > rating_max {rating_max}")
    sizes = np.array([len(t.support_ratings) for t in tasks], dtype=np.int64)
    total = int(sizes.sum())
    n_noisy = round_half_up(float(p) * total)
    if n_noisy == 0:
        return list(tasks)
    pos = rng.choice(total, size=n_noisy, replace=False)
    new_vals = rng.integers(int(rating_min), int(rating_max) + 1, size=n_noisy)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(offsets, pos, side="right") - 1
    out = list(tasks)
    for i in np.unique(owner):
        t = tasks[i]
        sel = owner == i
        r = np.array(t.support_ratings, copy=True)
        r[pos[sel] - offsets[i]] = new_vals[sel].astype(r.dtype)
        out[i] = t.replace(support_ratings=r)
    return out


def perturb_attribute_noise(tasks: Sequence["Task"], p: float, rng: np.random.Generator, *,
                            attribute: str, values: Sequence[object] | None = None) -> list["Task"]:
    """Give a fraction p of users a random different value of one attribute.

    Why: self-reported demographics are often wrong or withheld; a model that leans on them should
    not collapse when they are noisy. Exactly round_half_up(p * U) users change (U = users with a
    value of `attribute`, at least two distinct values needed); only `attribute` changes.
    `values` overrides the observed categorical values to draw from.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"noise fraction must be in [0, 1], got {p}")
    own: dict[int, object] = {}
    for t in tasks:
        v = t.user_attrs.get(attribute)
        if not _is_missing(v) and t.user_id not in own:
            own[t.user_id] = v
    users = sorted(own)
    n_change = round_half_up(float(p) * len(users))
    if n_change == 0:
        return list(tasks)
    observed = list(values) if values is not None else [own[u] for u in users]
    distinct = _sorted_values(observed)
    if len(distinct) < 2:
        raise ValueError(f"attribute {attribute!r} has fewer than two observed values; cannot add noise")
    numeric = values is None and all(_is_number(v) for v in distinct)
    chosen = rng.choice(len(users), size=n_change, replace=False)
    new_value: dict[int, object] = {}
    for idx in np.sort(chosen):
        u = users[idx]
        pool = [v for v in (observed if numeric else distinct) if not v == own[u]]
        new_value[u] = pool[int(rng.integers(len(pool)))]
    out = []
    for t in tasks:
        if t.user_id in new_value:
            attrs = dict(t.user_attrs)
            attrs[attribute] = new_value[t.user_id]
            out.append(t.replace(user_attrs=attrs))
        else:
            out.append(t)
    return out


def shift_weights(labels: pd.Series, target: Mapping[Hashable, float] | None,
                  base: pd.Series | None = None) -> pd.Series:
    """Per-user weights base * target[g] / observed[g] that turn the observed group mix into `target`.

    Why: test populations rarely match deployment; re-weighting shows what the headline metric
    would be for another mix without re-sampling. Target shares are normalised to sum to 1; groups
    absent from `target` get weight 0; a positive share for an unobserved group is an error.
    target None gives the base weight (1 without `base`) for everyone (the observed mix). `base`
    (aligned with `labels`): design weights of a stratified sample (audit.sampling); the observed
    mix is then the represented population's, and each group's mean stays design-weighted.
    """
    labels = labels.dropna()
    base = pd.Series(1.0, index=labels.index) if base is None else base.reindex(labels.index).astype(float)
    if target is None:
        return base
    total = float(sum(target.values()))
    if total <= 0 or any(v < 0 for v in target.values()):
        raise ValueError(f"target mix must have non-negative shares with a positive sum, got {dict(target)}")
    observed = base.groupby(labels).sum() / float(base.sum())
    missing = [g for g, s in target.items() if s > 0 and g not in observed.index]
    if missing:
        raise ValueError(f"target mix names groups with no users: {missing}")
    factor = {g: (float(target.get(g, 0.0)) / total) / float(observed[g]) for g in observed.index}
    return labels.map(factor).astype(float) * base


def demographic_shift(per_user: pd.DataFrame, labels: pd.Series,
                      target: Mapping[Hashable, float] | None) -> pd.DataFrame:
    """Metric means re-weighted to another group mix.

    per_user: columns user_id, metric, value (one row per user and metric); labels: group label
    per user (index user_id); target: {group: share} or None for the observed mix (plain mean).
    Returns columns metric, value, n (users with a label and a non-missing value). The observed mix
    is computed per metric among those users, so the weighted mean equals sum_g target_g * mean_g.
    """
    rows = []
    for metric, g in per_user.dropna(subset=["value"]).groupby("metric", sort=True):
        g = g[g["user_id"].isin(labels.dropna().index)]
        if g.empty:
            rows.append({"metric": metric, "value": float("nan"), "n": 0})
            continue
        vals = g["value"].to_numpy(float)
        if target is None:
            rows.append({"metric": metric, "value": float(np.mean(vals)), "n": int(len(g))})
            continue
        lab = labels.loc[g["user_id"].to_numpy()]
        lab.index = range(len(lab))
        w = shift_weights(lab, target).to_numpy(float)
        rows.append({"metric": metric, "value": float(np.sum(w * vals) / np.sum(w)), "n": int(len(g))})
    return pd.DataFrame(rows, columns=["metric", "value", "n"])


def perturb(tasks: Sequence["Task"], perturbation: str, level: object, rng: np.random.Generator,
            **params: Any) -> list["Task"]:
    """Dispatch by name ('support_size', 'rating_noise', 'attribute_noise[:attr]')."""
    name, _, suffix = perturbation.partition(":")
    if name == "support_size":
        return perturb_support_size(tasks, None if _is_noop(name, level) else int(level), rng)
    if name == "rating_noise":
        if _is_noop(name, level):
            return list(tasks)
        return perturb_rating_noise(tasks, float(level), rng, rating_min=params.get("rating_min", 1),
                                    rating_max=params.get("rating_max", 5))
    if name == "attribute_noise":
        if _is_noop(name, level):
            return list(tasks)
        attribute = suffix or params.get("attribute")
        if not attribute:
            raise ValueError("attribute_noise needs an attribute: 'attribute_noise:<name>' or attribute=...")
        return perturb_attribute_noise(tasks, float(level), rng, attribute=attribute, values=params.get("values"))
    if name == "demographic_shift":
        return list(tasks)
    raise ValueError(f"unknown perturbation {perturbation!r}; expected one of {PERTURBATIONS}")


# ------------------------------------------------------------------------------------------ runner
def prediction_frame(tasks: Sequence["Task"], truth: Sequence[np.ndarray],
                     predictions: Sequence[np.ndarray]) -> pd.DataFrame:
    """Long frame user_id, item_id, scenario, y_true, y_pred (the predictions/ file layout)."""
    if not (len(tasks) == len(truth) == len(predictions)):
        raise ValueError(f"{len(tasks)} tasks, {len(truth)} truth arrays and {len(predictions)} prediction arrays")
    parts = []
    for t, y, p in zip(tasks, truth, predictions):
        p = np.asarray(p, dtype=float).reshape(-1)
        if len(p) != len(t.candidates) or len(y) != len(t.candidates):
            raise ValueError(f"user {t.user_id} ({t.scenario}): {len(t.candidates)} candidates but "
                             f"{len(p)} predictions and {len(y)} truth values")
        n = len(t.candidates)
        parts.append(pd.DataFrame({"user_id": np.full(n, t.user_id, dtype=np.int64),
                                   "item_id": np.asarray(t.candidates, dtype=np.int64),
                                   "scenario": np.full(n, t.scenario, dtype=object),
                                   "y_true": np.asarray(y, dtype=float), "y_pred": p}))
    if not parts:
        return pd.DataFrame({"user_id": pd.Series(dtype=np.int64), "item_id": pd.Series(dtype=np.int64),
                             "scenario": pd.Series(dtype=object), "y_true": pd.Series(dtype=float),
                             "y_pred": pd.Series(dtype=float)})
    return pd.concat(parts, ignore_index=True)


def _evaluate_by_scenario(pred: pd.DataFrame, evaluate: Evaluate) -> pd.DataFrame:
    """Per-user metric values per scenario (the callback sees one scenario at a time)."""
    out = []
    for scenario, g in pred.groupby("scenario", sort=True):
        m = evaluate(g.reset_index(drop=True))
        missing = {"user_id", "metric", "value"} - set(m.columns)
        if missing:
            raise ValueError(f"evaluate() must return columns user_id, metric, value; missing {sorted(missing)}")
        m = m[["user_id", "metric", "value"]].copy()
        m["scenario"] = scenario
        out.append(m)
    if not out:
        return pd.DataFrame(columns=["user_id", "metric", "value", "scenario"])
    return pd.concat(out, ignore_index=True)


def _summaries(per_user: pd.DataFrame, groups: pd.DataFrame | None,
               shift: tuple[pd.Series, Mapping[Hashable, float]] | None = None,
               weights: pd.Series | None = None) -> dict[tuple, tuple[float, int]]:
    """{(scenario, metric, attribute, group): (value, n)}: means over users, overall and per group.

    With `shift` = (labels by user_id, target mix) the means are weighted by `shift_weights`,
    computed per scenario and metric among the users that have a value there; a target naming a
    group absent from that population gives NaN (n 0) rather than an invented number. `weights`
    (user_id -> design weight; audit.sampling): the users are a stratified sample and every mean is
    design-weighted (n counts sampled users).
    """
    res: dict[tuple, tuple[float, int]] = {}
    pu = per_user.dropna(subset=["value"])
    gi = groups.set_index("user_id") if groups is not None else None
    attrs = [c for c in groups.columns if c != "user_id"] if groups is not None else []

    for (scenario, metric), g in pu.groupby(["scenario", "metric"], sort=True):
        v = g["value"].to_numpy(float)
        dw = design_weights_of(g["user_id"], weights, "a value", f" ({scenario})")
        if shift is None:
            w = dw
        else:
            labels, target = shift
            lab = labels.reindex(g["user_id"].to_numpy())
            lab.index = range(len(lab))
            keep = lab.notna().to_numpy()
            try:
                w = np.zeros(len(g))
                w[keep] = shift_weights(lab[keep], target, pd.Series(dw[keep], index=lab.index[keep])).to_numpy(float)
            except ValueError:
                res[(scenario, metric, "all", "all")] = (float("nan"), 0)
                continue
            g, v, w = g[keep], v[keep], w[keep]

        def mean(mask: np.ndarray) -> tuple[float, int]:
            n = int(mask.sum())
            sw = float(np.sum(w[mask]))
            if n == 0 or sw <= 0:
                return float("nan"), n
            if shift is None and weights is None:
                return float(np.mean(v[mask])), n
            return float(np.sum(w[mask] * v[mask]) / sw), n

        res[(scenario, metric, "all", "all")] = mean(np.ones(len(g), dtype=bool))
        for attr in attrs:
            lab = gi[attr].reindex(g["user_id"].to_numpy())
            present = lab.notna().to_numpy()
            labs = lab.to_numpy()
            for grp in _sorted_values(labs[present]):
                res[(scenario, metric, attr, str(grp))] = mean(present & (labs == grp))
    return res


def robustness_curve(model: "Recommender", tasks: Sequence["Task"], truth: Sequence[np.ndarray],
                     perturbation: str, levels: Sequence[object], *, evaluate: Evaluate,
                     groups: pd.DataFrame | None = None, seed: int = 0, model_name: str | None = None,
                     weights: pd.Series | None = None, **params: Any) -> list[dict]:
    """Metric values and their change from the unperturbed run, per perturbation level.

    Why: a single accuracy number hides how quickly a cold-start model breaks when the support set
    shrinks or gets noisy, and whether some user groups break first.

    - perturbation: 'support_size', 'rating_noise' (params rating_min, rating_max),
      'attribute_noise:<attr>' (or attribute=...), 'demographic_shift' (params attribute and
      levels = target mixes {group: share}, re-weighting users by that attribute of `groups`).
    - levels: the no-change level (None / 'none', or 0 for the noise perturbations) reuses the
      unperturbed predictions, so its values equal the unperturbed numbers exactly.
    - truth: query ratings aligned with each task's candidates.
    - evaluate: per-scenario prediction frame (user_id, item_id, scenario, y_true, y_pred) ->
      per-user metrics (user_id, metric, value); results are means over users.
    - groups: user_id plus attribute columns (bucketed labels); records per group use the user's
      original labels even when attributes are perturbed.
    - seed: level i is perturbed with np.random.default_rng([seed, i]).
    - weights: user_id -> design weight when the tasks' users are a stratified sample
      (audit.sampling): every mean is design-weighted.

    Returns `curve` records: perturbation, model, scenario, metric, level, attribute, group, value,
    delta (value - unperturbed value of the same scenario, metric, attribute, group), n.
    """
    name = model_name or getattr(model, "name", None) or type(model).__name__
    base_name = perturbation.partition(":")[0]
    if base_name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {perturbation!r}; expected one of {PERTURBATIONS}")
    tasks = list(tasks)
    base_pred = prediction_frame(tasks, truth, model.predict(tasks))
    base_per_user = _evaluate_by_scenario(base_pred, evaluate)
    base = _summaries(base_per_user, groups, weights=weights)

    shift_attr = params.get("attribute") if base_name == "demographic_shift" else None
    if base_name == "demographic_shift":
        if groups is None or not shift_attr or shift_attr not in groups.columns:
            raise ValueError("demographic_shift needs groups with the column named by attribute=...")

    records: list[dict] = []
    for i, level in enumerate(levels):
        if base_name == "demographic_shift":
            if level is None or (isinstance(level, str) and level == "none"):
                summ = base
            else:
                labels = groups.set_index("user_id")[shift_attr]
                summ = _summaries(base_per_user, groups, (labels, level), weights)
        elif _is_noop(base_name, level):
            summ = base
        else:
            rng = np.random.default_rng([int(seed), i])
            perturbed = perturb(tasks, perturbation, level, rng, **params)
            pred = prediction_frame(perturbed, truth, model.predict(perturbed))
            summ = _summaries(_evaluate_by_scenario(pred, evaluate), groups, weights=weights)
        for (scenario, metric, attr, grp), (value, n) in summ.items():
            ref = base.get((scenario, metric, attr, grp), (float("nan"), 0))[0]
            records.append({"kind": "curve", "perturbation": perturbation, "model": name,
                            "scenario": str(scenario), "metric": str(metric), "level": _level_label(level),
                            "attribute": attr, "group": grp, "value": value, "delta": value - ref, "n": n})
    return records


def metric_direction(metric: str, directions: Mapping[str, int] | None = None) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when unknown."""
    if directions and metric in directions:
        return int(np.sign(directions[metric]))
    base = metric.split("@")[0].lower()
    if any(base.startswith(m) for m in ERROR_METRICS):
        return -1
    if any(base.startswith(m) for m in ACCURACY_METRICS):
        return 1
    return 0


def most_damaging(records: Iterable[Mapping], *, directions: Mapping[str, int] | None = None) -> dict | None:
    """The overall curve record that hurts most, as a `most_damaging` record (None if none qualify).

    Why: one headline number for the report and the gates. Damage is the change in the bad direction
    (increase of an error metric, drop of an accuracy metric) relative to the unperturbed value,
    |delta| / |unperturbed|, so that metrics in different units compare; metrics of unknown direction
    (see `metric_direction`) and per-group records are ignored. The record carries perturbation,
    model, scenario, metric, level, delta, plus value, relative_delta (signed delta / |unperturbed|)
    and damage.
    """
    best: dict | None = None
    for r in records:
        if r.get("kind") != "curve" or r.get("attribute") != "all" or r.get("group") != "all":
            continue
        d = metric_direction(str(r["metric"]), directions)
        delta, value = float(r["delta"]), float(r["value"])
        if d == 0 or not np.isfinite(delta):
            continue
        ref = abs(value - delta)
        rel = delta / ref if ref > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
        damage = -d * rel
        if best is None or damage > best["damage"]:
            best = {"kind": "most_damaging", "perturbation": r["perturbation"], "model": r["model"],
                    "scenario": r["scenario"], "metric": r["metric"], "level": r["level"], "delta": delta,
                    "value": value, "relative_delta": rel, "damage": damage}
    return best


def most_damaging_by(records: Iterable[Mapping], keys: Sequence[str] = ("model", "scenario"), *,
                     directions: Mapping[str, int] | None = None) -> list[dict]:
    """`most_damaging` per combination of `keys` (e.g. one per model and scenario, for gates)."""
    buckets: dict[tuple, list[Mapping]] = {}
    for r in records:
        buckets.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key in sorted(buckets, key=str):
        m = most_damaging(buckets[key], directions=directions)
        if m is not None:
            out.append(m)
    return out
